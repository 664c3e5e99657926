"""`eval.engine: vllm`: a decoder-only student evaluated through Ray Data's LLM processor (vLLM).

vLLM itself needs a GPU, so on CPU these tests hold everything around the engine to the HF engine: the
prompt token ids and per-vote seeds vLLM is given are exactly what `StudentGenerator` generates from, and
the reading of generated token ids (decode, truncation, self-consistency vote) gives the HF engine's
prediction columns. The `gpu` test runs both engines on the same questions and compares the answers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kard_ray.config import ConfigError, load_config
from kard_ray.inference.formats import answer_letter, encode_completions, format_target
from kard_ray.inference.generator import StudentGenerator, prediction_columns, question_key, sample_seed
from kard_ray.inference.vllm_engine import VllmPrompts, VllmReading, processor_config, vllm_predictions

EVAL = {"decoding": "sample", "n_votes": 3, "temperature": 1.5, "max_new_tokens": 12, "score_by": "letter_or_text",
        "batch_size": 4, "num_actors": 1, "vllm_engine_kwargs": {"gpu_memory_utilization": 0.3}}


def _batch(task, n: int = 5, passages: bool = True) -> dict:
    """A Ray Data batch of test questions as evaluation hands it to an engine (numpy columns)."""
    qs = task.test_questions[:n]
    batch = {"id": np.array([q["id"] for q in qs]), "question": np.array([q["question"] for q in qs]),
             "options": np.array([np.array(q["options"]) for q in qs] + [None], dtype=object)[:-1],
             "answer": np.array([q["answer"] for q in qs])}
    if passages:
        ps = task.passages
        batch["passage_ids"] = np.array([np.array([ps[i]["id"], ps[i + 1]["id"]]) for i in range(n)])
        batch["passage_titles"] = np.array([np.array([ps[i]["title"], ps[i + 1]["title"]]) for i in range(n)])
        batch["passage_texts"] = np.array([np.array([ps[i]["text"], ps[i + 1]["text"]]) for i in range(n)])
    return batch


def _hf(model_dir: str, eval_cfg: dict) -> StudentGenerator:
    return StudentGenerator(model_dir, "synthetic", max_new_tokens=eval_cfg["max_new_tokens"],
                            decoding=eval_cfg["decoding"], n_votes=eval_cfg["n_votes"],
                            temperature=eval_cfg["temperature"], max_source_length=96, score_by=eval_cfg["score_by"],
                            seed=7, device="cpu")


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_vllm_is_given_the_hf_engines_prompt_ids_and_per_question_seeds(synthetic_task, tiny_causal_dir, decoding):
    from kard_ray.inference.passages import batch_passages

    eval_cfg = {**EVAL, "decoding": decoding}
    batch = _batch(synthetic_task)
    rows = VllmPrompts(tiny_causal_dir, "synthetic", eval_cfg, 96, seed=7)(batch)
    hf = _hf(tiny_causal_dir, eval_cfg)
    passages, _ = batch_passages(batch)
    sources = [hf.source(q, list(o), p) for q, o, p in zip(batch["question"], batch["options"], passages)]
    votes = 3 if decoding == "sample" else 1
    assert rows["question_id"] == [qid for qid in batch["id"] for _ in range(votes)]
    assert rows["tokenized_prompt"] == [ids for ids in hf.encode(sources) for _ in range(votes)]
    assert any(len(ids) == 96 for ids in rows["tokenized_prompt"])  # the knowledge was cut, as in training
    params = rows["sampling_params"]
    assert all(p["max_tokens"] == 12 and p["detokenize"] is False for p in params)
    if decoding == "greedy":
        assert all(p["temperature"] == 0.0 and "seed" not in p for p in params)
        return
    keys = [question_key(q, list(o)) for q, o in zip(batch["question"], batch["options"])]
    assert [p["seed"] for p in params] == [sample_seed(7, k, j) for k in keys for j in range(3)]
    assert len({p["seed"] for p in params}) == len(params)
    assert all(p["temperature"] == 1.5 and p["top_k"] == 50 for p in params)  # what HF generate samples with


def _as_vllm_returns(rows: list[int], eos: set[int]) -> list[int]:
    """vLLM stops a sequence at its EOS (kept) and pads nothing after it."""
    for i, t in enumerate(rows):
        if t in eos:
            return rows[: i + 1]
    return rows


def test_reading_vllm_token_ids_gives_the_hf_engines_predictions(synthetic_task, tiny_causal_dir):
    batch = _batch(synthetic_task, n=6, passages=False)
    hf = _hf(tiny_causal_dir, EVAL)
    questions, options = list(batch["question"]), [list(o) for o in batch["options"]]
    sources = [hf.source(q, o, None) for q, o in zip(questions, options)]
    generated = hf.generate_ids(sources, [question_key(q, o) for q, o in zip(questions, options)])
    # one question whose three votes state an answer, one of them cut at the token limit mid-rationale
    tok = hf.tokenizer
    stated = [encode_completions(tok, [format_target("Rationale.", answer_letter(a, 4))])[0] for a in (2, 1, 2)]
    stated[1] = (stated[1] * 12)[:12]
    generated[0] = stated
    rows = {k: [] for k in ("question_id", "vote", "generated_tokens", "options", "answer", "passage_ids")}
    order = [(i, j) for i in range(len(questions)) for j in range(3)]
    random.Random(0).shuffle(order)  # a group's rows arrive in any order
    for i, j in order:
        rows["question_id"].append(batch["id"][i])
        rows["vote"].append(j)
        rows["generated_tokens"].append(np.array(_as_vllm_returns(generated[i][j], hf.eos)))
        rows["options"].append(np.array(options[i]))
        rows["answer"].append(batch["answer"][i])
        rows["passage_ids"].append(np.array([], dtype=object))
    reader = VllmReading(tiny_causal_dir, EVAL)
    by_question = {}
    for qid in batch["id"]:  # map_groups hands the reader one question's rows
        idx = [n for n, q in enumerate(rows["question_id"]) if q == qid]
        by_question[qid] = reader({k: [v[n] for n in idx] for k, v in rows.items()})
    got = {c: [by_question[qid][c][0] for qid in batch["id"]] for c in by_question[batch["id"][0]]}

    from kard_ray.inference.generator import read_prediction

    expected = [read_prediction(o, _decoded(hf, g), EVAL["score_by"]) for o, g in zip(options, generated)]
    assert got == {**prediction_columns(expected), "question_id": list(batch["id"]), "passage_ids": [[]] * 6,
                   "answer": [int(a) for a in batch["answer"]]}
    assert got["pred_index"][0] == 2 and got["truncated"][0] is False  # majority of (C, cut, C)
    # the HF engine's own predictions on the other questions (its generate + read) are the same columns
    own = prediction_columns(hf.predict(questions[1:], options[1:], [None] * 5))
    assert {c: v[1:] for c, v in got.items() if c in own} == own


def _decoded(hf: StudentGenerator, rows: list[list[int]]):
    from kard_ray.inference.generator import decode_generations

    return decode_generations(hf.tokenizer, rows, hf.eos, hf.max_new_tokens)


def test_a_vllm_evaluation_is_refused_where_vllm_cannot_run_it(tiny_t5_dir):
    base = ["eval.engine=vllm", "eval.num_gpus_per_actor=1"]
    for overrides, key in ((["eval.engine=vllm"], "eval.num_gpus_per_actor"),
                           ([*base, "eval.score_by=likelihood"], "eval.score_by"),
                           ([*base, "student.architecture=seq2seq"], "eval.engine"),
                           (base, "eval.engine")):  # the demo's tiny student is a T5
        with pytest.raises(ConfigError, match=key):
            load_config("configs/demo.yaml", overrides)
    assert load_config("configs/demo_causal.yaml", base).eval.engine == "vllm"
    with pytest.raises(ValueError, match="encoder-decoder"):  # a T5 directory given anyway, before any work
        vllm_predictions(None, tiny_t5_dir, "synthetic", {**EVAL, "decoding": "greedy"}, 96, 0)


def test_the_engine_is_ray_data_llms_vllm_processor_with_tokenized_prompts(ray_session, tiny_causal_dir):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    cfg = processor_config(tiny_causal_dir, EVAL, 96, seed=7)
    assert isinstance(cfg, vLLMEngineProcessorConfig) and cfg.model_source == tiny_causal_dir
    assert (cfg.chat_template_stage, cfg.tokenize_stage, cfg.detokenize_stage) == (False, False, False)
    assert cfg.engine_kwargs["max_model_len"] == 96 + 12 and cfg.engine_kwargs["seed"] == 7
    assert cfg.engine_kwargs["gpu_memory_utilization"] == 0.3  # eval.vllm_engine_kwargs over the defaults
    processor = build_processor(cfg)  # builds without vLLM (it is imported on the GPU actor)
    assert [type(s).__name__ for s in processor.stages.values()] == ["vLLMEngineStage"]


@pytest.mark.timeout(300)
def test_the_evaluation_stage_writes_the_generators_predictions_through_ray_data(ray_session, synthetic_task,
                                                                                 tiny_causal_dir, tmp_path):
    """`student_predictions` (the evaluation stage's engine switch) on the HF engine: Ray Data's rows are the
    generator's own predictions plus method, retrieval and correct, and the parquet keeps passage ids as lists."""
    import pyarrow.parquet as pq
    import ray

    from kard_ray.evaluation.evaluate import PREDICTION_TABLE, student_predictions

    qs = synthetic_task.test_questions[:8]
    questions = ray.data.from_items([{k: q[k] for k in ("id", "question", "options", "answer")} for q in qs])
    cfg = load_config("configs/demo_causal.yaml", ["eval.max_new_tokens=12", "student.max_source_length=96"])
    student_predictions(questions, tiny_causal_dir, "rd", cfg, len(qs)).write_parquet(str(tmp_path / "pred"))
    table = pq.read_table(str(tmp_path / "pred"))
    assert tuple(table.column_names) == PREDICTION_TABLE and table.num_rows == len(qs)
    rows = {r["question_id"]: r for r in table.to_pylist()}
    own = StudentGenerator(tiny_causal_dir, "synthetic", max_new_tokens=12, max_source_length=96).predict(
        [q["question"] for q in qs], [q["options"] for q in qs], [None] * len(qs))
    for q, p in zip(qs, own):
        r = rows[q["id"]]
        assert {c: r[c] for c in prediction_columns([p])} == {c: v[0] for c, v in prediction_columns([p]).items()}
        assert (r["method"], r["retrieval"], r["passage_ids"], r["correct"]) == ("rd", "none", [],
                                                                                p.pred_index == q["answer"])


def test_serves_vllm_only_where_it_is_installed(tiny_causal_dir):
    """Serve's Generator builds `VllmStudent` on a GPU replica with eval.engine: vllm; without vllm it says
    what to install instead of failing somewhere inside."""
    import importlib.util

    from kard_ray.inference.vllm_engine import VllmStudent

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match=r"\[gpu\]"):
        VllmStudent(tiny_causal_dir, "synthetic", {**EVAL, "decoding": "greedy"}, 96, 0)


@pytest.fixture(scope="module")
def gpu_causal_student(ray_session, synthetic_task, tiny_causal_dir, tmp_path_factory) -> str:
    """The tiny causal student trained briefly on the GPU (RD targets: answers worth comparing)."""
    import ray

    from kard_ray.config import StudentConfig
    from kard_ray.training.core import train
    from kard_ray.training.student import student_task, tokenize_examples
    from oracle_examples import oracle_examples

    tmp = tmp_path_factory.mktemp("gpu_causal")
    ds = tokenize_examples(ray.data.from_items(oracle_examples(synthetic_task, "rd")), tiny_causal_dir, 128, None)
    out = str(tmp / "student")
    train(student_task(tiny_causal_dir), ds.materialize(), StudentConfig(batch_size=16, lr=3e-3, max_steps=150,
          num_workers=0, use_gpu=True), out, str(tmp / "ckpt"), "vllm", {"init_model": tiny_causal_dir}, resume=False)
    return out


def _agreement(hf: dict, vllm: dict) -> tuple[float, float]:
    """Shares of questions with the same answer and with the same generation."""
    return (float(np.mean([hf[q]["pred_index"] == vllm[q]["pred_index"] for q in hf])),
            float(np.mean([hf[q]["generation"] == vllm[q]["generation"] for q in hf])))


GPU_OVERRIDES = ["eval.num_gpus_per_actor=1", "eval.max_new_tokens=48", "eval.vllm_engine_kwargs={dtype: float32}"]


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_vllm_answers_equal_hf_greedy_answers_on_the_same_questions(synthetic_task, gpu_causal_student):
    """Both engines through `student_predictions` (what the evaluation stage runs): the same answers up to
    numerical ties (fp32 on both sides)."""
    pytest.importorskip("vllm")
    import ray

    from kard_ray.evaluation.evaluate import student_predictions

    qs = synthetic_task.test_questions
    questions = ray.data.from_items([{k: q[k] for k in ("id", "question", "options", "answer")} for q in qs])
    got = {}
    for engine in ("hf", "vllm"):
        cfg = load_config("configs/demo_causal.yaml", [f"eval.engine={engine}", *GPU_OVERRIDES])
        got[engine] = {r["question_id"]: r for r in student_predictions(questions, gpu_causal_student, "rd", cfg,
                                                                        len(qs)).take_all()}
    assert set(got["hf"]) == set(got["vllm"]) == {q["id"] for q in qs}
    same_answer, same_text = _agreement(got["hf"], got["vllm"])
    assert same_answer >= 0.95 and same_text >= 0.9, (same_answer, same_text)


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_serves_generator_engine_on_vllm_answers_as_hf_and_streams_the_same_text(synthetic_task, gpu_causal_student):
    """`VllmStudent` (Serve's Generator with eval.engine: vllm on a GPU replica) against `StudentGenerator`."""
    pytest.importorskip("vllm")
    import asyncio

    from kard_ray.inference.vllm_engine import VllmStudent

    cfg = load_config("configs/demo_causal.yaml", ["eval.engine=vllm", *GPU_OVERRIDES])
    eval_cfg = cfg.to_dict()["eval"]
    qs = synthetic_task.test_questions[:64]
    items = [(q["question"], q["options"], [], True) for q in qs]
    hf = StudentGenerator(gpu_causal_student, "synthetic", max_new_tokens=48, max_source_length=cfg.student.max_source_length)
    own = hf.predict([q["question"] for q in qs], [q["options"] for q in qs], [[] for _ in qs])
    engine = VllmStudent(gpu_causal_student, "synthetic", eval_cfg, cfg.student.max_source_length, cfg.seed)

    async def both():
        rows = await engine.predict_items(items)
        events = [ev async for ev in engine.stream(qs[0]["question"], qs[0]["options"], [])]
        return rows, events

    rows, events = asyncio.run(both())
    same_answer, same_text = _agreement({i: {"pred_index": p.pred_index, "generation": p.generation} for i, p in enumerate(own)},
                                        dict(enumerate(rows)))
    assert same_answer >= 0.95 and same_text >= 0.9, (same_answer, same_text)
    assert all(r["usage"]["prompt_tokens"] > 0 for r in rows)
    streamed = "".join(ev["text"] for ev in events if "text" in ev)
    assert streamed.strip() == events[-1]["answer"]["generation"] == rows[0]["generation"]
