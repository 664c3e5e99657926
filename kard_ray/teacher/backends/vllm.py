"""`vllm` backend: `ray.data.llm.build_processor` with a `vLLMEngineProcessorConfig` (GPUs).

Ray 2.60's vLLM stage returns only `outputs[0]` of a request, so `n` samples of a question are sent
as n rows with `n=1` and a seed per (question, sample): the prompt prefix is shared (vLLM's prefix
cache makes the repeats cheap), a rerun regenerates the same text for the same sample. Rows the
engine fails on come back with `__inference_error__` (should_continue_on_error) and become error
rows instead of failing the dataset.

Building the config and the processor runs on CPU (the processor is lazy: nothing loads until the
dataset executes), so both are unit-tested without vLLM; running the engine needs GPUs and vllm.
"""

from __future__ import annotations

import json
from functools import partial

from kard_ray.teacher.backends.common import GEN_SCHEMA, stable_seed

ERROR_COLUMN = "__inference_error__"


def vllm_processor_config(cfg):
    """The vLLMEngineProcessorConfig for `cfg.teacher` (model, TP size, replicas, batch, context)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    t, v = cfg.teacher, cfg.teacher.vllm
    return vLLMEngineProcessorConfig(
        model_source=t.model,
        engine_kwargs={"tensor_parallel_size": v.tensor_parallel_size, "max_model_len": v.max_model_len,
                       "enable_prefix_caching": True},
        concurrency=v.concurrency,
        batch_size=v.batch_size,
        should_continue_on_error=True,
    )


def expand_samples(row: dict) -> list[dict]:
    """One question row (with `samples`) -> one row per sample (flat_map)."""
    base = {k: row[k] for k in ("question_id", "question", "options", "answer", "messages_json")}
    return [{**base, "sample": int(s)} for s in row["samples"]]


def vllm_preprocess(row: dict, temperature: float, max_tokens: int, seed: int) -> dict:
    """Row -> the processor's input: chat `messages` and per-row `sampling_params` (n=1, seeded)."""
    return {
        "question_id": row["question_id"], "sample": int(row["sample"]), "question": row["question"],
        "options": list(row["options"]), "answer": int(row["answer"]),
        "messages": json.loads(row["messages_json"]),
        "sampling_params": {"n": 1, "temperature": temperature, "max_tokens": max_tokens,
                            "seed": stable_seed(seed, row["question_id"], int(row["sample"]))},
    }


def vllm_postprocess(row: dict, teacher: str) -> dict:
    """Engine output row -> its columns plus the GEN_SCHEMA fields (text and token counts).

    The engine's columns are kept (`**row`) so success rows carry the same columns as the error rows
    that bypass postprocess; `normalize_row` then keeps GEN_SCHEMA's columns of both.
    """
    return {
        **row,
        "question_id": row["question_id"], "sample": int(row["sample"]),
        "text": row.get("generated_text") or "",
        "prompt_tokens": int(row["num_input_tokens"]) if row.get("num_input_tokens") is not None else None,
        "completion_tokens": int(row["num_generated_tokens"]) if row.get("num_generated_tokens") is not None else None,
        "error": None, "teacher": teacher, "question": row["question"], "options": list(row["options"]),
        "answer": int(row["answer"]),
    }


def normalize_row(row: dict, teacher: str) -> dict:
    """Success rows pass; error rows (which bypass postprocess and keep every column) become GEN rows."""
    err = row.get(ERROR_COLUMN) or None
    out = {k: row.get(k) for k in GEN_SCHEMA.names}
    if err:
        out.update(text="", prompt_tokens=None, completion_tokens=None, error=str(err)[:500], teacher=teacher)
    out["options"] = list(out["options"])
    return out


def build_vllm_processor(cfg):
    from ray.data.llm import build_processor

    t = cfg.teacher
    return build_processor(
        vllm_processor_config(cfg),
        preprocess=partial(vllm_preprocess, temperature=t.temperature, max_tokens=t.max_tokens, seed=cfg.seed),
        postprocess=partial(vllm_postprocess, teacher=t.model),
    )


def vllm_generate(ds, cfg):
    """Question rows -> one GEN row per sample through the vLLM processor."""
    processor = build_vllm_processor(cfg)
    out = processor(ds.flat_map(expand_samples))
    return out.map(partial(normalize_row, teacher=cfg.teacher.model))
