"""The stage graph: questions → knowledge → teacher → examples → mine → reranker → student → evaluate.

Each stage is a function of (config, run directory, resume) that reads earlier stages' artifacts and
writes its own. `<run>/manifest.json` records, per stage, its status, a fingerprint (a hash of the config
sections and input files it depends on, chained through the stages it reads), row counts and timings.
On rerun a stage whose fingerprint is unchanged and whose status is `done` is skipped, so changing
`student.lr` reruns the student and evaluation and nothing before them. A failing stage is marked
`failed` and leaves every earlier artifact intact.

A stage named by `--from-stage` / `--only` runs even when unchanged, and its training starts from
scratch unless `resume=True` (`--resume`). Training itself only ever resumes the identical run: the
trainer core compares a checkpoint's full training fingerprint before restoring it
(`kard_ray.training.core`). `--only` refuses to run a stage whose upstream stages are stale or
missing, rather than train on outdated inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from typing import Callable

from kard_ray import console, io
from kard_ray.console import say
from kard_ray.config import KardConfig
from kard_ray.methods import variants as method_variants

STAGES = ["questions", "knowledge", "teacher", "examples", "mine", "reranker", "student", "evaluate"]

# Config sections each stage reads (beyond what it inherits from the stages it depends on).
DEPENDS_ON: dict[str, tuple[list[str], list[str]]] = {
    #  stage        upstream stages                          config sections
    "questions": ([], ["data"]),
    "knowledge": (["questions"], ["knowledge"]),
    "teacher": (["questions"], ["teacher"]),
    "examples": (["knowledge", "teacher"], ["student.n_knowledge", "student.max_rationales_per_question",
                                            "student.max_source_length", "student.max_target_length", "methods",
                                            "student.validation_fraction", "student.validation_max_questions",
                                            "eval.k"]),
    "mine": (["knowledge", "teacher"], ["reranker.candidates_k", "reranker.holdout_fraction", "reranker.eval_on", "seed",
                                         "eval.oracle_rationales_path"]),
    "reranker": (["mine"], ["reranker", "seed", "eval.oracle_rationales_path"]),
    "student": (["examples"], ["student", "seed"]),
    "evaluate": (["student", "reranker", "knowledge"], ["eval", "methods", "seed"]),
}


def variants(cfg: KardConfig) -> list[str]:
    """Student variants the configured methods need (both KARD methods share one student)."""
    return method_variants(cfg.methods)


def _file_stamp(path: str | None) -> list:
    """Size and mtime of input files, so a changed input file invalidates the stage that read it."""
    if not path:
        return []
    try:
        files = io.list_files(path)
    except FileNotFoundError:
        return [path, "missing"]
    stamps = []
    for f in files[:1000]:
        fs, p = io.resolve(f)
        info = fs.get_file_info(p)
        stamps.append([f, info.size, info.mtime_ns])
    return stamps


def _inputs(cfg: KardConfig, stage: str) -> list:
    if stage == "questions":
        return [_file_stamp(cfg.data.train_path), _file_stamp(cfg.data.test_path)]
    if stage == "knowledge":
        return [_file_stamp(p) for p in cfg.knowledge.corpus_paths]
    if stage == "teacher":
        return [_file_stamp(cfg.teacher.import_path), _file_stamp(cfg.teacher.few_shot_path)]
    if stage == "student" and cfg.student.validate_every_steps:
        # validation reads as evaluation does, and what it reads decides which step is exported
        return [{"validation reads": [cfg.eval.score_by, cfg.eval.max_new_tokens]}]
    return []


def fingerprint_parts(cfg: KardConfig) -> dict[str, dict]:
    """Per stage, what its fingerprint hashes: the upstream stages' fingerprints, its config sections' hash
    and its input files' stamps (each hashed), plus the fingerprint itself."""
    parts: dict[str, dict] = {}
    for stage in STAGES:
        upstream, sections = DEPENDS_ON[stage]
        inputs = hashlib.sha256(json.dumps(_inputs(cfg, stage), default=str).encode()).hexdigest()[:16]
        p = {"up": {u: parts[u]["fingerprint"] for u in upstream}, "cfg": cfg.section_hash(*sections), "inputs": inputs}
        blob = json.dumps({"up": list(p["up"].values()), "cfg": p["cfg"], "inputs": p["inputs"]}, sort_keys=True)
        parts[stage] = {**p, "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}
    return parts


def fingerprints(cfg: KardConfig) -> dict[str, str]:
    return {s: p["fingerprint"] for s, p in fingerprint_parts(cfg).items()}


def why_rerun(stage: str, entry: dict, now: dict) -> str:
    """Why a stage would run again under `cfg` ("" when it would be skipped)."""
    if entry.get("status") != "done":
        return f"status {entry.get('status', 'never run')}"
    if entry.get("fingerprint") == now["fingerprint"]:
        return ""
    old = entry.get("parts")
    if not old:
        return "fingerprint changed"
    reasons = [f"{u} changed" for u, fp in now["up"].items() if old.get("up", {}).get(u) != fp]
    if old.get("cfg") != now["cfg"]:
        reasons.append("config (" + ", ".join(DEPENDS_ON[stage][1]) + ") changed")
    if old.get("inputs") != now["inputs"]:
        reasons.append("input files changed")
    return "; ".join(reasons) or "fingerprint changed"


def stage_needed(cfg: KardConfig, stage: str) -> bool:
    if stage in ("mine", "reranker"):
        return "kard_reranker" in cfg.methods
    return True


# ----------------------------------------------------------------------------------------------
# stage bodies: thin calls into the library. `resume` only matters to the training stages.


def _stage_questions(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.data.stage import prepare_questions

    return prepare_questions(cfg, run)


def _corpus_paths(cfg: KardConfig, run: io.RunDir) -> list[str]:
    if cfg.knowledge.corpus_paths:
        return list(cfg.knowledge.corpus_paths)
    if cfg.data.dataset == "synthetic":
        from kard_ray.data.stage import synthetic_inputs

        return [synthetic_inputs(run)["corpus"]]
    raise ValueError("knowledge.corpus_paths is empty: name the corpus files (JSONL/parquet) to index")


def _stage_knowledge(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.knowledge import build_indexes, ingest_corpus

    counts = ingest_corpus(_corpus_paths(cfg, run), run, cfg.knowledge, cfg.data.max_rejected_fraction)
    counts.update(build_indexes(run, cfg.knowledge))
    return counts


def _stage_teacher(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.teacher import generate_rationales

    return generate_rationales(cfg, run)


def _stage_examples(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.training.student import build_student_examples

    counts = {}
    for v in variants(cfg):
        path = build_student_examples(cfg, run, v)
        counts[f"examples_{v}"] = io.read_table(path, columns=["question_id"]).num_rows
    return counts


def _stage_mine(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.training.reranker_mining import mine_candidates

    out = mine_candidates(cfg, run)
    return {k: out[k] for k in ("rationales", "examples", "dropped")}


def tiny_model_texts(run: io.RunDir, limit: int = 200_000, prompt_dataset: str | None = None) -> list[str]:
    """The run's own text (passages, questions, rationales) for a tiny model's tokenizer.

    With `prompt_dataset` (the student's tokenizer) each question comes as the student reads it: inside
    the prompt template of that dataset (instruction, "Question:", "Knowledge:", "Explanation:",
    "Answer:"), once per question as in the real inputs. A from-scratch BPE that never saw the template
    spells its ~20 words out in 72 pieces, two thirds of an RD source at the demo's vocabulary, which
    every training step then pays for."""
    from kard_ray.inference.formats import ANSWER_LINE, format_source
    from kard_ray.knowledge import format_passage

    texts: list[str] = []
    p = io.read_table(run.passages, columns=["title", "text"])
    texts += [format_passage(t, x) for t, x in zip(p.column("title").to_pylist()[:limit], p.column("text").to_pylist()[:limit])]
    for split in ("train", "test"):
        if io.exists(run.questions(split)):
            q = io.read_table(run.questions(split))
            for a, o in zip(q.column("question").to_pylist(), q.column("options").to_pylist()):
                texts.append(f"{a} {' '.join(o)}" if prompt_dataset is None
                             else format_source(a, list(o), [""], prompt_dataset) + ANSWER_LINE.rstrip())
    if io.exists(run.rationales):
        texts += io.read_table(run.rationales, columns=["text"]).column("text").to_pylist()[:limit]
    return texts


TINY_META = "kard_tiny.json"


def resolve_model(name: str, tiny_cfg, run: io.RunDir, kind: str, seed: int, prompt_dataset: str | None = None) -> str:
    """A HF name/path as given, a packaged model (`minilm`) as its directory, or for `tiny` a model built
    from scratch into the run directory.

    The tiny model is rebuilt whenever what it is built from changes — its `tiny` settings, the kind,
    the seed, or the text its tokenizer is fitted on (`kard_tiny.json` records a digest of all four) —
    so a changed `student.tiny.vocab_size` never trains on the old vocabulary."""
    if name != "tiny":
        from kard_ray.models import unpackaged

        return unpackaged(name)  # a packaged model as its directory: its files join the weight fingerprint
    import dataclasses

    from kard_ray.models import save_tiny_model

    out = run.model(f"init_{kind}")
    texts = tiny_model_texts(run, prompt_dataset=prompt_dataset)  # the digest below covers the template
    text_digest = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:16]
    want = {"kind": kind, "seed": seed, "tiny": dataclasses.asdict(tiny_cfg), "texts": text_digest}
    meta = io.join(out, TINY_META)
    if io.exists(io.join(out, "config.json")) and io.exists(meta) and io.read_json(meta) == want:
        return out
    if io.exists(out):
        say(f"[pipeline] init_{kind}: tiny model settings or texts changed; rebuilding {out}")
        io.remove(out)
    with io.staged_dir(out) as local:  # a local directory, uploaded when run_dir is a URI
        save_tiny_model(kind, texts, tiny_cfg, local, seed=seed)
    io.write_json(meta, want)
    return out


def _stage_reranker(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.evaluation.reranker import evaluate_reranker
    from kard_ray.training.reranker import train_reranker

    init = resolve_model(cfg.reranker.model, cfg.reranker.tiny, run, "bert", cfg.seed)
    result = train_reranker(cfg, run, init, resume=resume)
    metrics = evaluate_reranker(cfg, run, result["model_dir"])
    out = {k: result[k] for k in ("steps", "final_loss", "examples", "train_time_s") if k in result}
    out["hits"] = {k: metrics[k] for k in ("bm25", "reranker") if k in metrics}
    return out


def student_init(cfg: KardConfig, run: io.RunDir) -> str:
    """The student's starting model (built for `tiny`: a T5, or a Llama-style decoder when
    student.architecture is causal), checked against student.architecture."""
    kind = "causal" if cfg.student.architecture == "causal" else "t5"
    init = resolve_model(cfg.student.model, cfg.student.tiny, run, kind, cfg.seed, prompt_dataset=cfg.data.dataset)
    if cfg.student.architecture != "auto" and cfg.student.model != "tiny":
        from kard_ray.models import is_causal_lm

        found = "causal" if is_causal_lm(init) else "seq2seq"
        if found != cfg.student.architecture:
            raise ValueError(f"student.architecture={cfg.student.architecture} but {cfg.student.model} is a "
                             f"{found} model (set student.architecture: auto or {found})")
    return init


def _stage_student(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.training.student import train_student

    init = student_init(cfg, run)
    out = {}
    for v in variants(cfg):
        r = train_student(cfg, run, v, init, resume=resume)
        out[v] = {k: r[k] for k in ("steps", "final_loss", "samples_per_s", "train_time_s") if k in r}
    return out


def _stage_evaluate(cfg: KardConfig, run: io.RunDir, resume: bool) -> dict:
    from kard_ray.evaluation import evaluate

    metrics = evaluate(cfg, run)
    return {m: round(v["accuracy"], 4) for m, v in metrics["methods"].items()}


STAGE_FNS: dict[str, Callable[[KardConfig, io.RunDir, bool], dict]] = {
    "questions": _stage_questions, "knowledge": _stage_knowledge, "teacher": _stage_teacher,
    "examples": _stage_examples, "mine": _stage_mine, "reranker": _stage_reranker, "student": _stage_student,
    "evaluate": _stage_evaluate,
}


# ----------------------------------------------------------------------------------------------
# the runner


def load_manifest(run: io.RunDir) -> dict:
    if io.exists(run.manifest):
        return io.read_json(run.manifest)
    return {"stages": {}}


def check_stage_names(names, flag: str) -> None:
    """Unknown stage names fail with the closest match, as config keys do."""
    import difflib

    from kard_ray.config import ConfigError

    for s in names:
        if s not in STAGES:
            close = difflib.get_close_matches(s, STAGES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{flag}: unknown stage {s!r}{hint} (stages: {', '.join(STAGES)})")


def stale_upstream(cfg: KardConfig, manifest: dict, fps: dict, stage: str, running: set[str]) -> list[str]:
    """Upstream stages of `stage` (transitively) that are neither current in the manifest nor about to run."""
    out, todo = [], list(DEPENDS_ON[stage][0])
    while todo:
        up = todo.pop()
        if up in out or up in running or not stage_needed(cfg, up):
            continue
        entry = manifest["stages"].get(up, {})
        if entry.get("status") != "done" or entry.get("fingerprint") != fps[up]:
            out.append(up)
        todo.extend(DEPENDS_ON[up][0])
    return sorted(out, key=STAGES.index)


def _plan_stages(cfg: KardConfig, manifest: dict, fps: dict, from_stage, only) -> list[tuple[str, bool]]:
    """(stage, explicit) for every stage to run, in order; prints why each other stage is skipped."""
    forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    plan = []
    for stage in STAGES:
        if only is not None and stage not in only:
            continue
        if not stage_needed(cfg, stage):
            say(f"[pipeline] {stage:10s} not needed by methods {cfg.methods}")
            continue
        explicit = stage in forced or (only is not None and stage in only)
        entry = manifest["stages"].get(stage, {})
        if not explicit and entry.get("status") == "done" and entry.get("fingerprint") == fps[stage]:
            say(f"[pipeline] {stage:10s} skipped (finished, inputs and config unchanged)")
            continue
        plan.append((stage, explicit))
    if only is not None:
        running = {s for s, _ in plan}
        for stage, _ in plan:
            stale = stale_upstream(cfg, manifest, fps, stage, running)
            if stale:
                raise ValueError(f"--only {stage}: upstream stage(s) {', '.join(stale)} are missing or stale for this "
                                 f"config; run them too (--only {' '.join(stale)} {stage}) or use --from-stage")
    return plan


def _run_stage(cfg: KardConfig, run_dir: io.RunDir, manifest: dict, stage: str, parts: dict,
               resume: bool) -> None:
    say(f"[pipeline] {stage:10s} running ...")
    t0 = time.time()
    manifest["stages"][stage] = {"status": "running", "fingerprint": parts["fingerprint"], "parts": parts,
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    io.write_json(run_dir.manifest, manifest)
    try:
        counts = STAGE_FNS[stage](cfg, run_dir, resume)
    except BaseException as e:
        manifest["stages"][stage].update(status="failed", seconds=round(time.time() - t0, 1),
                                         error=f"{type(e).__name__}: {e}",
                                         traceback=traceback.format_exc(limit=20)[-4000:])
        io.write_json(run_dir.manifest, manifest)
        say(f"[pipeline] {stage:10s} FAILED after {time.time() - t0:.1f}s: {type(e).__name__}: {e}")
        raise
    manifest["stages"][stage].update(status="done", seconds=round(time.time() - t0, 1), counts=counts,
                                     finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    io.write_json(run_dir.manifest, manifest)
    say(f"[pipeline] {stage:10s} done in {time.time() - t0:.1f}s {json.dumps(counts, default=str)[:300]}")


def run(cfg: KardConfig, from_stage: str | None = None, only: list[str] | None = None,
        resume: bool = False) -> dict:
    """Run the pipeline; returns the manifest. Finished, unchanged stages are skipped.

    Stages named by `from_stage`/`only` run even when unchanged; their training starts from scratch
    unless `resume`. A stage that runs because its inputs changed resumes only an identical run."""
    check_stage_names([s for s in [from_stage, *(only or [])] if s is not None], "--only/--from-stage")
    from kard_ray.config import resolve_local_paths
    from kard_ray.runtime import init_ray, started_ray_here

    cfg = resolve_local_paths(cfg)  # Ray Train workers run in another directory
    run_dir = io.RunDir(cfg.run_dir)
    io.makedirs(run_dir.root)
    with _console_session(run_dir) as con:
        init_ray(cfg)
        con.keep_ray_logs = started_ray_here()
        con.start_relay()
        manifest = load_manifest(run_dir)
        parts = fingerprint_parts(cfg)
        fps = {s: p["fingerprint"] for s, p in parts.items()}
        plan = _plan_stages(cfg, manifest, fps, from_stage, only)
        io.write_bytes(run_dir.config, cfg.to_yaml().encode())
        manifest["config_hash"] = cfg.section_hash(*[f.name for f in cfg.__dataclass_fields__.values()])
        _run_plan(cfg, run_dir, manifest, plan, parts, resume)
    return manifest


def _console_session(run_dir: io.RunDir) -> console.session:
    """Quiet console for the run; Ray's and the libraries' logs in `<run>/logs/` (staged locally for a URI)."""
    logs = run_dir.path("logs")
    if io.is_uri(logs):
        return console.session(console.staging_dir(), upload_to=logs)
    return console.session(logs)


def _run_plan(cfg: KardConfig, run_dir: io.RunDir, manifest: dict, plan: list, parts: dict, resume: bool) -> None:
    t_start = time.time()
    say(f"[pipeline] run directory {run_dir.root} (logs in {run_dir.path('logs')})")
    try:
        for stage, explicit in plan:
            _run_stage(cfg, run_dir, manifest, stage, parts[stage], resume=resume or not explicit)
    except BaseException:
        _track(cfg, run_dir, manifest, "FAILED")
        raise
    say(f"[pipeline] finished in {time.time() - t_start:.1f}s")
    _track(cfg, run_dir, manifest, "FINISHED")
    if os.environ.get("KARD_PRINT_RESULTS", "1") == "1" and io.exists(run_dir.path("eval", "results.md")):
        say(io.read_bytes(run_dir.path("eval", "results.md")).decode().rstrip("\n"))


def _track(cfg: KardConfig, run_dir: io.RunDir, manifest: dict, status: str) -> None:
    """The run in MLflow (tracking.mlflow); a tracking failure is reported, never fails a finished run."""
    if not cfg.tracking.mlflow:
        return
    from kard_ray.tracking import record_run

    try:
        rid = record_run(cfg, run_dir, manifest, status)
        say(f"[pipeline] recorded in MLflow: run {rid} ({cfg.tracking.uri or 'sqlite store in the run directory'})")
    except Exception as e:  # noqa: BLE001 - the results are written; tracking is a copy of them
        say(f"[pipeline] WARNING: MLflow tracking failed: {type(e).__name__}: {e}")


def status_table(cfg: KardConfig) -> str:
    """The run's manifest as a Markdown table: per stage its status, time, counts, whether its fingerprint
    matches `cfg` and why it would run again; then the results table when evaluation has run."""
    run = io.RunDir(cfg.run_dir)
    if not io.exists(run.manifest):
        raise FileNotFoundError(f"{run.manifest} not found: is {run.root!r} a run directory written by `kard-ray distill`?")
    manifest = load_manifest(run)
    parts = fingerprint_parts(cfg)
    lines = [f"# {run.root}", "", "| stage | status | seconds | counts | fingerprint | would rerun because |",
             "|---|---|---|---|---|---|"]
    for stage in STAGES:
        entry = manifest["stages"].get(stage)
        if entry is None:
            needed = stage_needed(cfg, stage)
            lines.append(f"| {stage} | {'not run' if needed else 'not needed'} | | | | {'never run' if needed else ''} |")
            continue
        counts = json.dumps(entry.get("counts", {}), default=str)
        counts = counts if len(counts) <= 60 else counts[:57] + "..."
        match = "current" if entry.get("fingerprint") == parts[stage]["fingerprint"] else "changed"
        lines.append(f"| {stage} | {entry.get('status')} | {entry.get('seconds', '')} | `{counts}` | {match} | "
                     f"{why_rerun(stage, entry, parts[stage])} |")
    out = "\n".join(lines) + "\n"
    results = run.path("eval", "results.md")
    if io.exists(results):
        out += "\n" + io.read_bytes(results).decode()
    return out

