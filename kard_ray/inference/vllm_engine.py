"""`eval.engine: vllm`: a decoder-only student's batch inference on Ray Data's LLM processor (vLLM on GPU
actors), read exactly as the HF engine reads it.

The two engines share everything but the decoding loop: the prompt is `StudentGenerator.encode`'s token ids
(the same chat template and knowledge truncation, given to vLLM as `tokenized_prompt`, so vLLM never
re-tokenizes), the generated token ids are decoded by `decode_generations` and read by `read_prediction`.
Greedy decoding is one row per question at temperature 0; self-consistency is `eval.n_votes` rows per
question, each with its own seed `sample_seed(seed, question, vote)` (the HF engine's per-question seeds),
then grouped back by question. vLLM removed encoder-decoder support, so a T5 student stays on HF.

    ds = vllm_predictions(questions_with_passages, model_dir, dataset, eval_cfg, max_source_length, seed)
"""

from __future__ import annotations

from typing import Any

from kard_ray.inference.formats import format_source
from kard_ray.inference.passages import batch_passages
from kard_ray.inference.generator import (decode_generations, eos_ids, prediction_columns, question_key,
                                          read_prediction, resolve_max_new_tokens, sample_seed)

# What vLLM is given unless eval.vllm_engine_kwargs says otherwise: the student's own dtype (a fp32 tiny
# student stays fp32, so greedy answers match HF's), and a seed for anything vLLM samples without one.
ENGINE_DEFAULTS = {"dtype": "auto", "enable_prefix_caching": True}
# What HF `generate` samples with when the student's generation_config leaves top_k unset (transformers'
# own default); vLLM's default is no top-k at all.
HF_TOP_K = 50


def sampling_params(eval_cfg: dict, generation: dict, max_new_tokens: int, seed: int, key: str, vote: int) -> dict:
    """vLLM SamplingParams of one vote: greedy (temperature 0), or a sample seeded like the HF engine's,
    with the student's generation_config top-k/top-p (what HF `generate` samples with)."""
    params: dict[str, Any] = {"max_tokens": max_new_tokens, "detokenize": False, "skip_special_tokens": True}
    if eval_cfg["decoding"] != "sample":
        return {**params, "temperature": 0.0}
    top_k, top_p = generation.get("top_k"), generation.get("top_p")
    return {**params, "temperature": float(eval_cfg["temperature"]), "seed": sample_seed(seed, key, vote),
            "top_k": HF_TOP_K if top_k is None else int(top_k), "top_p": 1.0 if top_p is None else float(top_p)}


class VllmPrompts:
    """Ray Data stage before the engine: each question's prompt token ids (`StudentGenerator.encode`'s)
    and sampling params, one row per vote, carrying what the reading needs."""

    def __init__(self, model_dir: str, dataset: str, eval_cfg: dict, max_source_length: int, seed: int):
        from transformers import GenerationConfig

        from kard_ray.inference.formats import encode_prompts
        from kard_ray.models import load_tokenizer, model_path

        self.tokenizer, self.encode_prompts = load_tokenizer(model_dir), encode_prompts
        self.dataset, self.eval_cfg, self.max_source_length, self.seed = dataset, eval_cfg, max_source_length, seed
        self.generation = GenerationConfig.from_pretrained(model_path(model_dir)).to_dict()
        self.max_new_tokens = resolve_max_new_tokens(model_dir, eval_cfg["max_new_tokens"])
        self.votes = int(eval_cfg["n_votes"]) if eval_cfg["decoding"] == "sample" else 1

    def __call__(self, batch: dict) -> dict:
        passages, ids = batch_passages(batch)
        options = [[str(o) for o in opts] for opts in batch["options"]]
        sources = [format_source(q, o, p, self.dataset) for q, o, p in zip(batch["question"], options, passages)]
        prompts = self.encode_prompts(self.tokenizer, sources, self.max_source_length)
        rows: dict[str, list] = {k: [] for k in ("question_id", "options", "answer", "passage_ids", "vote",
                                                 "tokenized_prompt", "sampling_params")}
        for i, prompt in enumerate(prompts):
            key = question_key(str(batch["question"][i]), options[i])
            for vote in range(self.votes):
                rows["question_id"].append(batch["id"][i])
                rows["options"].append(options[i])
                rows["answer"].append(int(batch["answer"][i]))
                rows["passage_ids"].append(ids[i])
                rows["vote"].append(vote)
                rows["tokenized_prompt"].append(prompt)
                rows["sampling_params"].append(sampling_params(self.eval_cfg, self.generation, self.max_new_tokens,
                                                               self.seed, key, vote))
        return rows


class VllmReading:
    """Ray Data stage after the engine: a question's votes (all its rows) decoded and read into the
    columns `PredictBatch` writes (the evaluation adds method, retrieval and correct)."""

    def __init__(self, model_dir: str, eval_cfg: dict):
        from transformers import GenerationConfig

        from kard_ray.models import load_tokenizer, model_path

        self.tokenizer, self.score_by = load_tokenizer(model_dir), eval_cfg["score_by"]
        self.eos = eos_ids(GenerationConfig.from_pretrained(model_path(model_dir)))
        self.max_new_tokens = resolve_max_new_tokens(model_dir, eval_cfg["max_new_tokens"])

    def __call__(self, rows: dict) -> dict:
        """`rows`: one question's votes (a group), or a batch of greedy questions (one row each)."""
        order: dict[str, list[int]] = {}
        for i, qid in enumerate(rows["question_id"]):
            order.setdefault(str(qid), []).append(i)
        out: dict[str, list] = {k: [] for k in ("question_id", "passage_ids", "answer")}
        preds = []
        for qid, idx in order.items():
            idx = sorted(idx, key=lambda i: int(rows["vote"][i]))
            tokens = [[int(t) for t in rows["generated_tokens"][i]] for i in idx]
            gens = decode_generations(self.tokenizer, tokens, self.eos, self.max_new_tokens)
            first = idx[0]
            out["question_id"].append(qid)
            out["passage_ids"].append([str(p) for p in rows["passage_ids"][first]])
            out["answer"].append(int(rows["answer"][first]))
            preds.append(read_prediction([str(o) for o in rows["options"][first]], gens, self.score_by))
        return {**out, **prediction_columns(preds)}


def processor_config(model_dir: str, eval_cfg: dict, max_source_length: int, seed: int):
    """Ray Data LLM's vLLMEngineProcessorConfig for a student directory: prompts arrive tokenized and
    leave as token ids, so its chat-template, tokenize and detokenize stages are off."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from kard_ray.models import model_path

    max_new = resolve_max_new_tokens(model_dir, eval_cfg["max_new_tokens"])
    engine = {**ENGINE_DEFAULTS, "seed": seed, "max_model_len": max_source_length + max_new,
              **(eval_cfg.get("vllm_engine_kwargs") or {})}
    return vLLMEngineProcessorConfig(
        model_source=model_path(model_dir), engine_kwargs=engine, batch_size=int(eval_cfg["batch_size"]),
        concurrency=int(eval_cfg["num_actors"]), chat_template_stage=False, tokenize_stage=False,
        detokenize_stage=False)


def vllm_predictions(ds, model_dir: str, dataset: str, eval_cfg: dict, max_source_length: int, seed: int):
    """Questions (with their passages) → rows {question_id, passage_ids, answer, generation, pred_index, ...}
    through vLLM: the HF engine's prediction columns."""
    import ray
    from ray.data.llm import build_processor

    from kard_ray.models import is_causal_lm

    if not is_causal_lm(model_dir):
        raise ValueError(f"eval.engine: vllm needs a decoder-only student, and {model_dir} is encoder-decoder "
                         "(vLLM has no encoder-decoder models); evaluate it with eval.engine: hf")
    prompts = ds.map_batches(VllmPrompts, fn_constructor_kwargs=dict(
        model_dir=model_dir, dataset=dataset, eval_cfg=eval_cfg, max_source_length=max_source_length, seed=seed),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=int(eval_cfg["batch_size"]), batch_format="numpy")
    keep = ("question_id", "options", "answer", "passage_ids", "vote")
    processor = build_processor(processor_config(model_dir, eval_cfg, max_source_length, seed),
                                postprocess=lambda row: {**{k: row[k] for k in keep},
                                                         "generated_tokens": list(row["generated_tokens"])})
    generated = processor(prompts)
    reading = dict(fn_constructor_kwargs=dict(model_dir=model_dir, eval_cfg=eval_cfg),
                   compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")
    if eval_cfg["decoding"] == "sample" and int(eval_cfg["n_votes"]) > 1:
        return generated.groupby("question_id").map_groups(VllmReading, **reading)
    return generated.map_batches(VllmReading, batch_size=int(eval_cfg["batch_size"]), **reading)
