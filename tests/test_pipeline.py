"""End to end: the demo shows the KARD effect, stages skip and rerun by fingerprint, a failed stage keeps
what came before it, and the StrategyQA smoke config runs on real data (and is recorded in MLflow).
`ray job submit` of jobs/distill.py on a real multi-node cluster is tests/test_distributed.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kard_ray import io
from kard_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]

KARD_MINUS_RD_MARGIN = 0.30  # KARD-reranker - RD, asserted below; measured margins are in the README
BM25_MINUS_RD_MARGIN = 0.25  # the bar, on both task families

LOOP = re.compile(r"(.{1,12}?)\1{3,}")  # a piece repeated 4+ times in a row: a degenerate, looping generation

DESIGN_ARTIFACTS = ["manifest.json", "config.yaml", "questions/train.parquet", "questions/test.parquet", "passages",
                    "index/bm25", "rationales", "examples/student_kard", "examples/student_rd", "models/student_kard",
                    "models/student_rd", "eval/metrics.json", "eval/results.md", "eval/accuracy.png",
                    "eval/predictions/kard_bm25", "eval/predictions/rd"]


def _assert_kard_ordering(cfg, manifest, methods: tuple[str, ...]) -> dict:
    """The KARD effect on unseen entities, and generations long enough to be read; returns the metrics."""
    run = io.RunDir(cfg.run_dir)
    assert all(s["status"] == "done" for s in manifest["stages"].values()), manifest["stages"]
    metrics = io.read_json(run.path("eval", "metrics.json"))["methods"]
    rd, bm25, rerank = (metrics[m]["accuracy"] for m in ("rd", "kard_bm25", "kard_reranker"))
    print(f"\n{cfg.data.synthetic.family}: RD {rd:.3f}  KARD-BM25 {bm25:.3f}  KARD-reranker {rerank:.3f}  "
          f"(n={metrics['rd']['n']} unseen-entity questions)")
    assert bm25 - rd >= BM25_MINUS_RD_MARGIN, metrics
    assert rerank > bm25, metrics  # the reranker adds on top of BM25 (the paper's ordering)
    counts = manifest["stages"]["student"]["counts"]
    assert counts["kard"]["steps"] == counts["rd"]["steps"] == cfg.student.max_steps
    # the generations were long enough to be read (eval.max_new_tokens: null, what the training targets
    # need): almost none cut; where one was, it was looping (RD spelling an unseen name it cannot copy,
    # "Gathkathkathkath..."), which no token limit cures; and the KARD answers are readable
    for name in methods:
        cut = [r["generation"] for r in io.read_table(run.path("eval", "predictions", name)).to_pylist()
               if r["truncated"]]
        assert len(cut) == metrics[name]["truncated"]
        not_looping = [g for g in cut if not LOOP.search(g)]
        assert len(not_looping) <= 0.05 * metrics[name]["n"], (name, not_looping[:5])
    for name in ("kard_bm25", "kard_reranker"):
        assert metrics[name]["truncated"] <= 0.05 * metrics[name]["n"], (name, metrics[name])
        assert metrics[name]["unreadable"] <= 0.05 * metrics[name]["n"], (name, metrics[name])
    return metrics


def _hits_at_1(cfg) -> tuple[float, float]:
    """(BM25 order, distilled reranker) Hits@1 of the rationale's passage for the held-out test entities."""
    hits = io.read_json(io.RunDir(cfg.run_dir).path("eval", "reranker_metrics.json"))
    assert hits["source"].startswith("test split") and hits["n_questions"] == 4 * cfg.data.synthetic.n_test_entities
    print("Hits@1: bm25", hits["bm25"]["hits@1"], "reranker", hits["reranker"]["hits@1"])
    return hits["bm25"]["hits@1"], hits["reranker"]["hits@1"]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_demo_kard_beats_rd_on_unseen_entities(demo_run):
    """The demo's distractors are written in the facts' own templates, so the tiny reranker beats BM25 only
    by reading whose fact a passage states (no template to spot), and KARD-reranker > KARD-BM25 > RD."""
    cfg, manifest = demo_run
    run = io.RunDir(cfg.run_dir)
    for rel in DESIGN_ARTIFACTS:
        assert io.exists(run.path(rel)), f"missing artifact {rel}"
    assert cfg.data.synthetic.distractor_templates == "facts" and cfg.data.synthetic.listing_distractor_rate == 0
    metrics = _assert_kard_ordering(cfg, manifest, ("ft", "rd", "kard_bm25", "kard_reranker"))
    assert metrics["kard_reranker"]["accuracy"] - metrics["rd"]["accuracy"] >= KARD_MINUS_RD_MARGIN, metrics
    bm25, reranker = _hits_at_1(cfg)
    assert reranker > bm25, (bm25, reranker)


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_second_task_family_with_decoder_only_students_keeps_the_ordering_and_serves_what_it_evaluated(
        people_run, ray_session):
    """configs/demo_people.yaml (people: two-word names, other attributes, rationales of ~30 words, half the
    training entities) with everything outside its data section equal to the demo's, and decoder-only
    students (student.architecture: causal, a tiny Llama-style LM; configs/demo_causal.yaml is the demo with
    them): the same recipe keeps KARD-reranker > KARD-BM25 >= RD + 25 points on unseen people, the demo's
    reranker settings do not lose to BM25, and Ray Serve answers as the evaluation stage did."""
    from kard_ray.models import is_causal_lm

    cfg, manifest = people_run
    assert cfg.data.synthetic.family == "people" and cfg.student.architecture == "causal"
    assert all(is_causal_lm(io.RunDir(cfg.run_dir).model(f"student_{v}")) for v in ("rd", "kard"))
    _assert_kard_ordering(cfg, manifest, ("rd", "kard_bm25", "kard_reranker"))
    bm25, reranker = _hits_at_1(cfg)
    assert reranker >= bm25, (bm25, reranker)
    _assert_served_answers_equal_offline(cfg.run_dir)


def _assert_served_answers_equal_offline(run_dir: str, n: int = 20) -> None:
    """The run's KARD-reranker service (Ray Serve on the test session's Ray, real HTTP) answers its first n
    test questions with the evaluation stage's passages, generations and answers."""
    import httpx
    from ray import serve

    from kard_ray.serve import load_run_config, start

    run = io.RunDir(run_dir)
    offline = {r["question_id"]: r for r in io.read_table(run.path("eval", "predictions", "kard_reranker")).to_pylist()}
    questions = io.read_table(run.questions("test")).to_pylist()[:n]
    cfg = load_run_config(run_dir, ["serve.port=8125", "serve.route_prefix=/causal", "serve.request_timeout_s=60"])
    start(cfg, name="kard_causal")
    try:
        with httpx.Client(base_url="http://127.0.0.1:8125/causal", timeout=120) as client:
            for q in questions:
                r = client.post("/v1/answer", json={"question": q["question"], "options": list(q["options"])})
                assert r.status_code == 200, r.text
                body, want = r.json(), offline[q["id"]]
                assert [p["id"] for p in body["passages"]] == list(want["passage_ids"]), q["id"]
                assert (body["generation"], body["answer_index"]) == (want["generation"], want["pred_index"]), q["id"]
        import openai

        oa = openai.OpenAI(base_url="http://127.0.0.1:8125/causal/v1", api_key="not-needed", max_retries=0)
        for q in questions[:2]:  # streamed token by token: the prompt is not echoed, the text is the generation
            stream = oa.chat.completions.create(model="kard_reranker", stream=True, extra_body={"options": list(q["options"])},
                                                messages=[{"role": "user", "content": q["question"]}])
            pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
            assert len(pieces) >= 2 and "".join(pieces).strip() == offline[q["id"]]["generation"], pieces
    finally:
        serve.shutdown()


def test_the_two_task_families_share_one_config_apart_from_data():
    demo = load_config(str(REPO / "configs" / "demo.yaml")).to_dict()
    people = load_config(str(REPO / "configs" / "demo_people.yaml")).to_dict()
    for c in (demo, people):
        c.pop("data"), c.pop("run_dir")
    assert demo == people


def test_the_causal_demo_is_the_demo_with_a_decoder_only_student():
    demo = load_config(str(REPO / "configs" / "demo.yaml")).to_dict()
    causal = load_config(str(REPO / "configs" / "demo_causal.yaml")).to_dict()
    assert causal["student"].pop("architecture") == "causal" and demo["student"].pop("architecture") == "auto"
    for c in (demo, causal):
        c.pop("run_dir")
    assert demo == causal


# A line of kard-ray's own: "[stage] ..." (stage names, student/evaluation names: letters, digits, _ . -)
OWN_LINE = re.compile(r"^\[[a-z][\w.-]*( [a-z][\w.-]*)?\] ")


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_demo_console_is_quiet_and_the_run_logs_keep_the_detail(demo_run, demo_console):
    """`python jobs/distill.py` at default verbosity: only kard-ray's own lines and the results table, under
    80 lines, a progress line per training; Ray's internals are in <run>/logs/ (driver and workers)."""
    cfg, _ = demo_run
    run = io.RunDir(cfg.run_dir)
    lines = demo_console.splitlines()
    table = set(io.read_bytes(run.path("eval", "results.md")).decode().splitlines())
    foreign = [l for l in lines if l.strip() and not OWN_LINE.match(l) and l not in table]
    assert not foreign, foreign
    assert len(lines) < 80, demo_console
    for student in ("student_ft", "student_rd", "student_kard"):
        steps = [l for l in lines if l.startswith(f"[{student}] step ")]
        assert steps and "(100%)" in steps[-1] and " eta " in steps[0], (student, steps)
    assert any(l.startswith("[evaluate kard_reranker] ") and "questions/s" in l for l in lines), lines
    logs = Path(run.path("logs"))
    driver = (logs / "driver.log").read_text()
    assert "Execution plan of Dataset" in driver  # Ray Data's plans: in the log, not on the console
    assert "Execution plan" not in demo_console
    worker_logs = list(logs.glob("ray/session_*/worker-*.out")) + list(logs.glob("ray/session_*/worker-*.err"))
    assert worker_logs and list(logs.glob("ray/session_*/raylet.out")), sorted(p.name for p in logs.rglob("*"))[:40]


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_demo_student_vocabulary_has_no_test_only_name_pieces(demo_run):
    """Every token the student must copy out of a test entity's passage was trained.

    The tiny tokenizer is fitted on the run's corpus, which holds the test entities' passages too. Too large
    a vocabulary gives test names tokens of their own that no training example contains: their embeddings
    keep their random init and copying them breaks (measured at vocab 4,000: 39% of test-name pieces
    untrained, the KARD student at 23% with the right passage in hand; at 2,000: 1%).
    """
    import collections

    from kard_ray.models import load_tokenizer

    cfg, _ = demo_run
    run = io.RunDir(cfg.run_dir)
    tok = load_tokenizer(run.model("init_t5"))
    trained = collections.Counter()
    for batch in io.read_table(run.path("examples", "student_kard"), columns=["source", "target"]).to_batches():
        for col in ("source", "target"):
            for ids in tok(batch.column(col).to_pylist()).input_ids:
                trained.update(ids)
    names = {q.rstrip("?").split()[-1] for q in io.read_table(run.questions("test")).column("question").to_pylist()}
    pieces = [i for n in names for i in tok(" " + n, add_special_tokens=False).input_ids]
    untrained = [tok.convert_ids_to_tokens(i) for i in pieces if trained[i] == 0]
    assert len(untrained) / len(pieces) <= 0.05, (len(untrained), len(pieces), untrained[:20])


def test_demo_student_tokenizer_knows_the_prompt_template(demo_run):
    """The student's tokenizer was fitted on the prompt as the student reads it: the instruction and the
    field names are whole words, not letters (unfitted, the demo's instruction alone took 72 tokens of an
    RD source of 105, and every training step paid for them)."""
    from kard_ray.inference.formats import format_source
    from kard_ray.models import load_tokenizer

    cfg, _ = demo_run
    tok = load_tokenizer(io.RunDir(cfg.run_dir).model("init_t5"))
    template = format_source("", ["", ""], [""], cfg.data.dataset)
    words = set(re.findall(r"[A-Za-z]{2,}", template))
    pieces = tok.tokenize(template)
    split = words - {p.lstrip("Ġ") for p in pieces}  # a word in several pieces is no piece of its own
    assert len(words) >= 15 and not split, (split, pieces)
    for field in ("Question", "Knowledge", "Explanation"):
        assert tok.tokenize("\n" + field + ":")[-2:] == [field, ":"], tok.tokenize("\n" + field + ":")


@pytest.mark.slow
@pytest.mark.timeout(3000)  # includes building the shared demo run when this test runs alone
def test_rerun_of_the_demo_skips_every_finished_stage(demo_run, capsys, tmp_path, monkeypatch):
    """(What a changed setting reruns, and only that, is test_retrain's, on a tiny run.)"""
    import shutil

    from kard_ray import pipeline

    cfg0, first = demo_run
    # Work on a copy: the Serve tests use the original run as it is. A *relative* run_dir, as the demo's
    # default `runs/demo` is.
    shutil.copytree(cfg0.run_dir, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("run/config.yaml", ["run_dir=run"])  # the resolved config the run recorded
    again = pipeline.run(cfg)
    out = capsys.readouterr().out
    for stage in first["stages"]:
        assert f"{stage:10s} skipped" in out, out
        assert again["stages"][stage]["finished"] == first["stages"][stage]["finished"]


@pytest.mark.timeout(300)
def test_failed_stage_keeps_earlier_artifacts(ray_session, tmp_path):
    from kard_ray import pipeline

    cfg = load_config(str(REPO / "configs/demo.yaml"), [
        f"run_dir={tmp_path}", "data.synthetic.n_train_entities=10", "data.synthetic.n_test_entities=3",
        "methods=[rd]", "student.model=/nonexistent/student"])
    with pytest.raises(Exception):
        pipeline.run(cfg)
    manifest = io.read_json(str(tmp_path / "manifest.json"))
    assert manifest["stages"]["student"]["status"] == "failed"
    assert "/nonexistent/student" in manifest["stages"]["student"]["error"]
    for stage in ("questions", "knowledge", "teacher", "examples"):
        assert manifest["stages"][stage]["status"] == "done"
    assert io.exists(str(tmp_path / "questions/train.parquet")) and io.exists(str(tmp_path / "examples/student_rd"))


# A changed setting reruns the stage that reads it and everything downstream, and nothing upstream.
# (test_retrain shows the CLI acting on it; this covers the settings a tiny run cannot afford to rerun.)
RERUNS = {
    "data.synthetic.seed=14": ["questions", "knowledge", "teacher", "examples", "mine", "reranker", "student", "evaluate"],
    "knowledge.words_per_passage=60": ["knowledge", "examples", "mine", "reranker", "student", "evaluate"],
    "teacher.n_samples=2": ["teacher", "examples", "mine", "reranker", "student", "evaluate"],
    "eval.k=2": ["examples", "student", "evaluate"],
    "student.validation_fraction=0.1": ["examples", "student", "evaluate"],
    "reranker.eval_on=holdout": ["mine", "reranker", "evaluate"],
    "reranker.holdout_fraction=0.3": ["mine", "reranker", "evaluate"],
    "reranker.candidates_k=16": ["mine", "reranker", "evaluate"],
    "reranker.lr=2e-3": ["reranker", "evaluate"],
    "student.lr=2e-3": ["student", "evaluate"],
    "eval.score_by=likelihood": ["evaluate"],
    "student.architecture=causal": ["student", "evaluate"],
    "eval.vllm_engine_kwargs={dtype: float32}": ["evaluate"],  # the eval section, eval.engine with it  # a causal student reuses everything up to the reranker
    "seed=1": ["mine", "reranker", "student", "evaluate"],
}


@pytest.mark.parametrize("override", sorted(RERUNS))
def test_a_changed_setting_changes_its_stage_and_downstream_fingerprints_only(override):
    from kard_ray import pipeline

    before = pipeline.fingerprints(load_config(str(REPO / "configs/demo.yaml")))
    after = pipeline.fingerprints(load_config(str(REPO / "configs/demo.yaml"), [override]))
    assert [s for s in pipeline.STAGES if before[s] != after[s]] == RERUNS[override]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_strategyqa_smoke_config_runs_on_real_data(ray_session, shared_data, tmp_path):
    from kard_ray import pipeline

    d = shared_data
    cfg = load_config(str(REPO / "configs/strategyqa_smoke.yaml"), [
        f"run_dir={tmp_path}", f"data.train_path={d / 'train.jsonl'}", f"data.test_path={d / 'test.jsonl'}",
        f"knowledge.corpus_paths=[{d / 'wiki_passages.jsonl.gz'}]", f"teacher.import_path={d / 'teacher_gpt35_responses.jsonl.gz'}",
        "tracking.mlflow=true", "tracking.experiment=kard-smoke",
        # The three models (10-20 steps each) train in this process, Ray Train's local mode: a worker group costs
        # ~20 s to start and stop here, three of them more than the training. The worker path is test_training_ray's,
        # test_retrain's and test_distributed's.
        "student.num_workers=0", "reranker.num_workers=0"])
    manifest = pipeline.run(cfg)
    st = manifest["stages"]
    assert st["questions"]["counts"]["train_questions"] == 100 and st["questions"]["counts"]["test_questions"] == 50
    assert st["teacher"]["counts"]["n_rationales"] == 1000
    assert st["knowledge"]["counts"]["passages"] >= 11_000
    metrics = io.read_json(str(tmp_path / "eval" / "metrics.json"))["methods"]
    assert set(metrics) >= {"rd", "kard_bm25", "kard_reranker"} and all(m["n"] == 50 for m in metrics.values())

    _assert_recorded_in_mlflow(cfg, tmp_path, metrics)


def _assert_recorded_in_mlflow(cfg, run_dir: Path, metrics: dict) -> None:
    """The run, read back from its MLflow store with mlflow's own client: the resolved config as params,
    every logged training step exactly once, the evaluation metrics, the results as artifacts."""
    from mlflow.tracking import MlflowClient

    from kard_ray.tracking import flat_params

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("kard-smoke").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["kard.run_dir"] == str(run_dir)
    assert mlrun.data.params == flat_params(cfg.to_dict()) and mlrun.data.params["student.lr"] == str(cfg.student.lr)
    for model in ("student_kard", "student_rd", "reranker"):
        logged = [json.loads(l) for l in (run_dir / "models" / model / "train_log.jsonl").read_text().splitlines()]
        history = client.get_metric_history(mlrun.info.run_id, f"{model}/loss")
        assert sorted((h.step, h.value) for h in history) == [(e["step"], pytest.approx(e["loss"])) for e in logged]
    for method, m in metrics.items():
        assert mlrun.data.metrics[f"eval/{method}/accuracy"] == pytest.approx(m["accuracy"])
    eval_files = {a.path for a in client.list_artifacts(mlrun.info.run_id, "eval")}
    assert eval_files == {"eval/results.md", "eval/metrics.json", "eval/accuracy.png"}
    results = client.download_artifacts(mlrun.info.run_id, "eval/results.md", str(run_dir / "dl"))
    assert Path(results).read_text() == (run_dir / "eval" / "results.md").read_text()
