"""`eval.engine: vllm`: a decoder-only student's batch inference on Ray Data's LLM processor (vLLM on GPU
actors), read exactly as the HF engine reads it.

The two engines share everything but the decoding loop: the prompt is `StudentGenerator.encode`'s token ids
(the same chat template and knowledge truncation, given to vLLM as `tokenized_prompt`, so vLLM never
re-tokenizes), the generated token ids are decoded by `decode_generations` and read by `read_prediction`.
Greedy decoding is one row per question at temperature 0; self-consistency is `eval.n_votes` rows per
question, each with its own seed `sample_seed(seed, question, vote)` (the HF engine's per-question seeds),
then grouped back by question. vLLM removed encoder-decoder support, so a T5 student stays on HF.
Serve's Generator on a GPU replica runs the same requests and reading on vLLM's async engine (`VllmStudent`).

    ds = vllm_predictions(questions_with_passages, model_dir, dataset, eval_cfg, max_source_length, seed)
"""

from __future__ import annotations

from typing import Any

from kard_ray.inference.formats import format_source
from kard_ray.inference.passages import batch_passages
from kard_ray.inference.generator import (Prediction, decode_generations, eos_ids, prediction_columns, question_key,
                                          read_prediction, resolve_max_new_tokens, sample_seed)

# What vLLM is given unless eval.vllm_engine_kwargs says otherwise: the student's own dtype (a fp32 tiny
# student stays fp32, so greedy answers match HF's) and prefix caching (a question's votes share a prompt);
# `engine_kwargs` adds the run's seed and the context length.
ENGINE_DEFAULTS = {"dtype": "auto", "enable_prefix_caching": True}
# What HF `generate` samples with when the student's generation_config leaves top_k unset (transformers'
# own default); vLLM's default is no top-k at all.
HF_TOP_K = 50


def sampling_params(eval_cfg: dict, generation: dict, max_new_tokens: int, seed: int, key: str, vote: int) -> dict:
    """vLLM SamplingParams of one vote: greedy (temperature 0), or a sample seeded like the HF engine's,
    with the student's generation_config top-k/top-p (what HF `generate` samples with)."""
    params: dict[str, Any] = {"max_tokens": max_new_tokens, "detokenize": False}  # token ids: we decode them
    if eval_cfg["decoding"] != "sample":
        return {**params, "temperature": 0.0}
    top_k, top_p = generation.get("top_k"), generation.get("top_p")
    return {**params, "temperature": float(eval_cfg["temperature"]), "seed": sample_seed(seed, key, vote),
            "top_k": HF_TOP_K if top_k is None else int(top_k), "top_p": 1.0 if top_p is None else float(top_p)}


def _student_files(model_dir: str, eval_cfg: dict):
    """(tokenizer, generation config, max_new_tokens) of a student directory: what building requests and
    reading outputs both need."""
    from transformers import GenerationConfig

    from kard_ray.models import load_tokenizer, model_path

    return (load_tokenizer(model_dir), GenerationConfig.from_pretrained(model_path(model_dir)),
            resolve_max_new_tokens(model_dir, eval_cfg["max_new_tokens"]))


class VllmRequests:
    """What vLLM is asked for each question: `StudentGenerator.encode`'s prompt token ids and one
    SamplingParams dict per vote."""

    def __init__(self, model_dir: str, dataset: str, eval_cfg: dict, max_source_length: int, seed: int,
                 files: tuple | None = None):
        """`files`: `_student_files`' result when the caller has loaded them already."""
        self.tokenizer, generation, self.max_new_tokens = files or _student_files(model_dir, eval_cfg)
        self.generation = generation.to_dict()
        self.dataset, self.eval_cfg, self.max_source_length, self.seed = dataset, eval_cfg, max_source_length, seed
        self.votes = int(eval_cfg["n_votes"]) if eval_cfg["decoding"] == "sample" else 1

    def build(self, questions: list[str], options: list[list[str]], passages: list) -> list[tuple[list[int], list[dict]]]:
        """(prompt ids, [sampling params of each vote]) per question; `passages`: the student's passage
        strings per question (None: a method without retrieval)."""
        from kard_ray.inference.formats import encode_prompts

        sources = [format_source(q, o, p, self.dataset) for q, o, p in zip(questions, options, passages)]
        prompts = encode_prompts(self.tokenizer, sources, self.max_source_length)
        out = []
        for q, o, prompt in zip(questions, options, prompts):
            key = question_key(q, o)
            out.append((prompt, [sampling_params(self.eval_cfg, self.generation, self.max_new_tokens, self.seed, key, v)
                                 for v in range(self.votes)]))
        return out


class VllmPrompts(VllmRequests):
    """Ray Data stage before the engine: each question's requests as rows, one per vote, carrying what
    the reading needs."""

    def __call__(self, batch: dict) -> dict:
        passages, ids = batch_passages(batch)
        questions = [str(q) for q in batch["question"]]
        options = [[str(o) for o in opts] for opts in batch["options"]]
        rows: dict[str, list] = {k: [] for k in ("question_id", "options", "answer", "passage_ids", "vote",
                                                 "tokenized_prompt", "sampling_params")}
        for i, (prompt, params) in enumerate(self.build(questions, options, passages)):
            for vote, p in enumerate(params):
                rows["question_id"].append(batch["id"][i])
                rows["options"].append(options[i])
                rows["answer"].append(int(batch["answer"][i]))
                rows["passage_ids"].append(ids[i])
                rows["vote"].append(vote)
                rows["tokenized_prompt"].append(prompt)
                rows["sampling_params"].append(p)
        return rows


class VllmReading:
    """Ray Data stage after the engine: a question's votes (all its rows) decoded and read into the
    columns `PredictBatch` writes (the evaluation adds method, retrieval and correct)."""

    def __init__(self, model_dir: str, eval_cfg: dict, files: tuple | None = None):
        """`files`: `_student_files`' result when the caller has loaded them already."""
        self.tokenizer, generation, self.max_new_tokens = files or _student_files(model_dir, eval_cfg)
        self.eos, self.score_by = eos_ids(generation), eval_cfg["score_by"]

    def read(self, options: list[str], token_rows: list[list[int]]) -> Prediction:
        """One question's prediction from its votes' generated token ids (in vote order)."""
        return read_prediction(options, decode_generations(self.tokenizer, token_rows, self.eos, self.max_new_tokens),
                               self.score_by)

    def __call__(self, rows: dict) -> dict:
        """`rows`: one question's votes (a group), or a batch of greedy questions (one row each)."""
        order: dict[str, list[int]] = {}
        for i, qid in enumerate(rows["question_id"]):
            order.setdefault(str(qid), []).append(i)
        out: dict[str, list] = {k: [] for k in ("question_id", "passage_ids", "answer")}
        preds = []
        for qid, idx in order.items():
            idx = sorted(idx, key=lambda i: int(rows["vote"][i]))
            first = idx[0]
            out["question_id"].append(qid)
            out["passage_ids"].append([str(p) for p in rows["passage_ids"][first]])
            out["answer"].append(int(rows["answer"][first]))
            preds.append(self.read([str(o) for o in rows["options"][first]],
                                   [[int(t) for t in rows["generated_tokens"][i]] for i in idx]))
        return {**out, **prediction_columns(preds)}


def engine_kwargs(model_dir: str, eval_cfg: dict, max_source_length: int, seed: int) -> dict:
    """vLLM engine arguments: the defaults, the context the prompts and generations need, the user's."""
    max_new = resolve_max_new_tokens(model_dir, eval_cfg["max_new_tokens"])
    return {**ENGINE_DEFAULTS, "seed": seed, "max_model_len": max_source_length + max_new,
            **(eval_cfg.get("vllm_engine_kwargs") or {})}


class VllmStudent:
    """Serve's Generator on a GPU replica with eval.engine: vllm: the evaluation's requests and reading
    around vLLM's async engine (continuous batching replaces @serve.batch's batches)."""

    def __init__(self, model_dir: str, dataset: str, eval_cfg: dict, max_source_length: int, seed: int):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("eval.engine: vllm needs vllm on the Generator's GPU replica "
                              "(pip install -e '.[gpu]'), or eval.engine: hf") from e
        from kard_ray.models import model_path

        self.vllm = vllm
        files = _student_files(model_dir, eval_cfg)
        self.requests = VllmRequests(model_dir, dataset, eval_cfg, max_source_length, seed, files)
        self.reader = VllmReading(model_dir, eval_cfg, files)
        self.tokenizer = self.requests.tokenizer
        args = vllm.AsyncEngineArgs(model=model_path(model_dir),
                                    **engine_kwargs(model_dir, eval_cfg, max_source_length, seed))
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.requests_sent = 0

    async def _generate(self, prompt: list[int], params: dict):
        """vLLM's outputs of one request as they grow: (generated token ids so far, finished)."""
        self.requests_sent += 1
        stream = self.engine.generate(request_id=f"kard-{self.requests_sent}", prompt={"prompt_token_ids": prompt},
                                      sampling_params=self.vllm.SamplingParams(**params))
        async for out in stream:
            yield list(out.outputs[0].token_ids), out.finished

    async def _final(self, prompt: list[int], params: dict) -> list[int]:
        tokens: list[int] = []
        async for tokens, _ in self._generate(prompt, params):
            pass
        return tokens

    def _row(self, options: list[str], prompt: list[int], votes: list[list[int]], usage: bool) -> dict:
        p = self.reader.read(options, votes)
        row = {"generation": p.generation, "pred_index": int(p.pred_index)}
        if usage:
            row["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(votes[0]),
                            "finish_reason": "length" if p.truncated else "stop"}
        return row

    async def predict_items(self, items: list[tuple]) -> list[dict]:
        """Serve's (question, options, passage strings[, usage]) items -> {generation, pred_index[, usage]}."""
        import asyncio

        reqs = self.requests.build([it[0] for it in items], [list(it[1]) for it in items], [list(it[2]) for it in items])
        votes = await asyncio.gather(*[asyncio.gather(*[self._final(prompt, p) for p in params])
                                       for prompt, params in reqs])
        return [self._row(list(it[1]), prompt, list(v), len(it) > 3 and bool(it[3]))
                for it, (prompt, _), v in zip(items, reqs, votes)]

    async def stream(self, question: str, options: list[str], passages: list[str]):
        """{"text": piece}... as vLLM writes, then {"answer": {generation, pred_index, usage}}."""
        ((prompt, params),) = self.requests.build([question], [list(options)], [list(passages)])
        if len(params) > 1:  # a vote over samples: nothing to stream token by token
            row = (await self.predict_items([(question, options, passages, True)]))[0]
            yield {"text": row["generation"]}
            yield {"answer": row}
            return
        text, tokens = "", []
        async for tokens, _ in self._generate(prompt, params[0]):
            now = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(now) > len(text) and now.startswith(text):
                yield {"text": now[len(text):]}
                text = now
        yield {"answer": self._row(list(options), prompt, [tokens], True)}


def processor_config(model_dir: str, eval_cfg: dict, max_source_length: int, seed: int):
    """Ray Data LLM's vLLMEngineProcessorConfig for a student directory: prompts arrive tokenized and
    leave as token ids, so its chat-template, tokenize and detokenize stages are off."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from kard_ray.models import model_path

    return vLLMEngineProcessorConfig(
        model_source=model_path(model_dir), engine_kwargs=engine_kwargs(model_dir, eval_cfg, max_source_length, seed),
        batch_size=int(eval_cfg["batch_size"]), concurrency=int(eval_cfg["num_actors"]), chat_template_stage=False,
        tokenize_stage=False, detokenize_stage=False)


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
