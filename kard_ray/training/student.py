"""Student distillation: examples (KARD / RD / FT), tokenisation, and the students' `TrainTask`s:
seq2seq (T5) and decoder-only (causal: Llama / Qwen / SmolLM style, the prompt masked out of the loss).

KARD (KARD.md §3): the student reads the question, its options and the passages BM25 retrieved with
the teacher's *rationale* as the query, and learns to write that rationale and the answer letter.
RD drops the Knowledge field; FT learns the answer alone.

    path = build_student_examples(cfg, run, "kard")       # parquet {question_id, sample, source, target}
    result = train_student(cfg, run, "kard", init_model)  # trains, exports run.model("student_kard")

The input/target strings and the suffix-preserving source truncation are the inference layer's
(`kard_ray.inference.formats`): training and inference read the same contract.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from kard_ray import io
from kard_ray.config import KardConfig
from kard_ray.data.stage import read_questions, validation_ids
from kard_ray.inference.formats import (VARIANTS, answer_letter, encode_completions, encode_prompts, encode_sources,
                                        format_source, format_target)
from kard_ray.inference.generator import StudentGenerator, generation_defaults, write_generation_defaults
from kard_ray.io import RunDir
from kard_ray.teacher.kept import kept_rationales
from kard_ray.training.core import TrainTask, ordered, train, tree_digest
from kard_ray.training.lora import apply_lora, lora_settings, merge_lora


# ------------------------------------------------------------------------------------------------
# tokenisation


def encode_targets(tokenizer, targets: Sequence[str], max_length: Optional[int] = None) -> list[list[int]]:
    """Token ids of each target (with EOS); cut to `max_length` (EOS kept) only when it is set."""
    ids = tokenizer(list(targets), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    if max_length is None:
        return [list(x) for x in ids]
    return [list(x) if len(x) <= max_length else list(x[: max_length - 1]) + [x[-1]] for x in ids]


@functools.lru_cache(maxsize=4)
def _tokenizer(name_or_path: str):
    from kard_ray.models import load_tokenizer

    return load_tokenizer(name_or_path)


@functools.lru_cache(maxsize=4)
def _is_causal(name_or_path: str) -> bool:
    from kard_ray.models import is_causal_lm

    return is_causal_lm(name_or_path)


def encode_causal_examples(tok, sources: Sequence[str], targets: Sequence[str], max_source_length: int,
                           max_target_length: Optional[int]) -> tuple[list[list[int]], list[list[int]]]:
    """A causal student's (input_ids, labels): prompt + completion, the prompt's labels -100 so the loss
    reads only the completion (the target and its EOS)."""
    prompts = encode_prompts(tok, sources, max_source_length)
    completions = encode_completions(tok, targets, max_target_length)
    return ([p + c for p, c in zip(prompts, completions)],
            [[-100] * len(p) + c for p, c in zip(prompts, completions)])


def _tokenize_batch(batch: pa.Table, tokenizer_path: str, max_source_length: int,
                    max_target_length: Optional[int]) -> pa.Table:
    tok = _tokenizer(tokenizer_path)
    sources, targets = batch.column("source").to_pylist(), batch.column("target").to_pylist()
    if _is_causal(tokenizer_path):
        src, tgt = encode_causal_examples(tok, sources, targets, max_source_length, max_target_length)
    else:
        src = encode_sources(tok, sources, max_source_length)
        tgt = encode_targets(tok, targets, max_target_length)
    ids = pa.list_(pa.int32())
    return pa.table({"question_id": batch.column("question_id"), "sample": batch.column("sample"),
                     "input_ids": pa.array(src, type=ids), "labels": pa.array(tgt, type=ids)})


def tokenize_examples(ds, tokenizer_path: str, max_source_length: int, max_target_length: Optional[int]):
    """Ray Data: {question_id, sample, source, target} -> {question_id, sample, input_ids, labels}
    (seq2seq: source ids and target ids; causal: prompt + completion ids and the masked labels).

    Batches of 4,096 rows: each batch is a task, and at 256 rows the tasks' overhead made the demo's
    21,588 examples take 15.6 s (6.1 s with warm workers) against 8.8 s (2.4 s) here, measured."""
    return ordered(ds.map_batches(_tokenize_batch, batch_format="pyarrow", batch_size=4096, num_cpus=0.5,
                                  fn_kwargs={"tokenizer_path": tokenizer_path, "max_source_length": max_source_length,
                                             "max_target_length": max_target_length}))


# ------------------------------------------------------------------------------------------------
# the seq2seq TrainTask


class Seq2SeqCollate:
    """Dynamic padding: pad to the longest sequence of the batch; labels padded with -100 (a causal
    student's labels are as long as its ids, so this pads them alike)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        srcs, tgts = batch["input_ids"], batch["labels"]
        n = len(srcs)
        s_len = max(len(x) for x in srcs)
        t_len = max(len(y) for y in tgts)
        input_ids = np.full((n, s_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, s_len), dtype=np.int64)
        labels = np.full((n, t_len), -100, dtype=np.int64)
        for i, (x, y) in enumerate(zip(srcs, tgts)):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
            labels[i, : len(y)] = y
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels)}


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The items a seq2seq loss averages over: non-padding target tokens."""
    return int((batch["labels"] != -100).sum())


def seq2seq_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int):
    """Token-mean cross-entropy (HF computes it from `labels`); n_tokens = source + target tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    n_tokens = batch["attention_mask"].sum() + (batch["labels"] != -100).sum()
    return out.loss, n_tokens


def seq2seq_flops_per_token(model: torch.nn.Module) -> float:
    """~6N/2 per processed token: a source token goes through the encoder, a target token through the
    decoder, each roughly half of an encoder-decoder's parameters (a rule of thumb, for MFU only)."""
    from kard_ray.models import flops_per_token

    return flops_per_token(model) / 2


class Seq2SeqBuild:
    def __call__(self, model_config: dict) -> torch.nn.Module:
        from kard_ray.models import load_seq2seq

        model = apply_lora(load_seq2seq(model_config["init_model"]), model_config.get("lora"), "SEQ_2_SEQ_LM")
        model.config.use_cache = False  # no KV cache while training
        return model


class Seq2SeqExport:
    """save_pretrained of the model (LoRA adapters merged in) plus the tokenizer it was trained with
    (either architecture: nothing here is seq2seq-specific)."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    def __call__(self, model: torch.nn.Module, directory: str) -> None:
        model = merge_lora(model)
        model.config.use_cache = True  # generation wants the cache back
        model.save_pretrained(directory)
        _tokenizer(self.tokenizer_path).save_pretrained(directory)


class Seq2SeqValidate:
    """Validation accuracy of the student in training, read as test time reads it: the same
    `StudentGenerator` (formatting, truncation, greedy decoding, answer reading) around the trainer's
    model. Rows: {question, options, passages (None for RD/FT), answer}."""

    def __init__(self, tokenizer_path: str, dataset: str, variant: str, max_new_tokens: int, max_source_length: int,
                 score_by: str):
        self.tokenizer_path, self.dataset, self.variant = tokenizer_path, dataset, variant
        self.max_new_tokens, self.max_source_length, self.score_by = max_new_tokens, max_source_length, score_by

    def __call__(self, model: torch.nn.Module, rows: list[dict]) -> tuple[int, int]:
        gen = StudentGenerator.wrap(model, _tokenizer(self.tokenizer_path), self.dataset, self.max_new_tokens,
                                    max_source_length=self.max_source_length, score_by=self.score_by,
                                    variant=self.variant)
        cache = model.config.use_cache
        model.config.use_cache = True  # off for training; generation wants it
        try:
            correct = 0
            for i in range(0, len(rows), 16):
                chunk = rows[i:i + 16]
                preds = gen.predict([r["question"] for r in chunk], [list(r["options"]) for r in chunk],
                                    [None if r["passages"] is None else list(r["passages"]) for r in chunk])
                correct += sum(p.pred_index == int(r["answer"]) for p, r in zip(preds, chunk))
        finally:
            model.config.use_cache = cache
        return correct, len(rows)


def seq2seq_task(init_model: str, validate_fn=None) -> TrainTask:
    tok = _tokenizer(init_model)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer of {init_model} has no pad token")
    return TrainTask(build_model=Seq2SeqBuild(), loss_fn=seq2seq_loss, collate_fn=Seq2SeqCollate(tok.pad_token_id),
                     export_fn=Seq2SeqExport(init_model), count_fn=count_target_tokens,
                     flops_per_token=seq2seq_flops_per_token, validate_fn=validate_fn)


# ------------------------------------------------------------------------------------------------
# the causal (decoder-only) TrainTask


class CausalPackedCollate:
    """Packing: the micro-batch's examples laid end to end in rows of up to `pack_tokens` tokens (first
    fit, in order; an example longer than that gets a row of its own), position ids restarting at 0 for
    each example. With no attention mask, transformers reads the restarts as packed sequences and builds a
    block-diagonal causal mask, so no example attends to another; the token after a boundary is a prompt
    token (label -100), so no loss crosses one either. Each row's tail is padding: a segment of its own."""

    def __init__(self, pad_id: int, pack_tokens: int):
        self.pad_id, self.pack_tokens = int(pad_id), int(pack_tokens)

    def _rows(self, lengths: list[int]) -> list[list[int]]:
        rows, used = [], []
        for i, n in enumerate(lengths):
            j = next((r for r, u in enumerate(used) if u + n <= self.pack_tokens), None)
            if j is None:
                rows.append([i])
                used.append(n)
            else:
                rows[j].append(i)
                used[j] += n
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        seqs, labs = batch["input_ids"], batch["labels"]
        rows = self._rows([len(x) for x in seqs])
        width = max(sum(len(seqs[i]) for i in row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), -100, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(seqs[i])
                input_ids[r, at:at + n], labels[r, at:at + n] = seqs[i], labs[i]
                positions[r, at:at + n] = np.arange(n)
                at += n
            positions[r, at:] = np.arange(width - at)  # the padding: one more segment, never in the loss
        return {"input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(positions),
                "labels": torch.from_numpy(labels), "n_tokens": torch.tensor(sum(len(x) for x in seqs))}


def count_completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The items a causal loss averages over: the predicted completion tokens (labels shift by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def causal_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int):
    """Token-mean cross-entropy over the completion tokens (HF shifts the labels); n_tokens = the
    sequence tokens processed. A packed batch has position ids instead of an attention mask."""
    if "position_ids" in batch:  # (transformers reads packed sequences only without a KV cache)
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    use_cache=False)
        return out.loss, batch["n_tokens"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, batch["attention_mask"].sum()


class CausalBuild:
    def __call__(self, model_config: dict) -> torch.nn.Module:
        from kard_ray.models import load_causal_lm

        model = apply_lora(load_causal_lm(model_config["init_model"]), model_config.get("lora"), "CAUSAL_LM")
        model.config.use_cache = False
        return model


def causal_task(init_model: str, validate_fn=None, pack_tokens: int = 0) -> TrainTask:
    tok = _tokenizer(init_model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # padding is masked anyway
    if pad is None:
        raise ValueError(f"tokenizer of {init_model} has neither a pad nor an eos token")
    collate = CausalPackedCollate(pad, pack_tokens) if pack_tokens else Seq2SeqCollate(pad)  # labels: as wide as the ids
    return TrainTask(build_model=CausalBuild(), loss_fn=causal_loss, collate_fn=collate,
                     export_fn=Seq2SeqExport(init_model), count_fn=count_completion_tokens, validate_fn=validate_fn)


def student_task(init_model: str, validate_fn=None, pack_tokens: int = 0) -> TrainTask:
    """The TrainTask for a student's architecture, read from its config (decoder-only: causal)."""
    if _is_causal(init_model):
        return causal_task(init_model, validate_fn, pack_tokens)
    if pack_tokens:
        raise ValueError(f"student.pack_tokens={pack_tokens}: packing is for decoder-only students; "
                         f"{init_model} is a seq2seq model")
    return seq2seq_task(init_model, validate_fn)


# ------------------------------------------------------------------------------------------------
# examples


def student_rationales(cfg: KardConfig, run: RunDir, questions: dict[str, dict]) -> list[dict]:
    """Answer-consistent rationales, at most `student.max_rationales_per_question` per question."""
    return kept_rationales(run, questions, cfg.student.max_rationales_per_question, require_any=True)


def _format_batch(batch: pa.Table, variant: str, dataset: str) -> pa.Table:
    rows = batch.to_pylist()
    sources, targets = [], []
    for r in rows:
        passages = None
        if variant == "kard":
            from kard_ray.knowledge import format_passage

            passages = [format_passage(t, x) for t, x in zip(r["passage_titles"], r["passage_texts"])]
        sources.append(format_source(r["question"], r["options"], passages, dataset))
        letter = answer_letter(r["answer"], len(r["options"]))
        targets.append(format_target(None if variant == "ft" else r["rationale"], letter, r["options"][r["answer"]]))
    return pa.table({"question_id": [r["question_id"] for r in rows], "sample": pa.array([r["sample"] for r in rows], pa.int64()),
                     "source": sources, "target": targets})


def build_student_examples(cfg: KardConfig, run: RunDir, variant: Literal["kard", "rd", "ft"]) -> str:
    """Write the student's training examples to `run.examples(f"student_{variant}")` and return it.

    kard: one example per kept rationale, with the `student.n_knowledge` passages BM25 (the knowledge
          layer's batch retrieval) returns for the rationale as the query;
    rd:   one example per kept rationale, no Knowledge field;
    ft:   one example per training question (the answer alone; rationales are not used).
    """
    import ray

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    questions = read_questions(run, "train")
    held = validation_ids(questions, cfg.student.validation_fraction, cfg.data.dataset)
    write_validation_rows(cfg, run, variant, {q: questions[q] for q in sorted(held)})
    if variant == "ft":
        base = [{"question_id": qid, "sample": 0, "rationale": None, **_q_fields(q)} for qid, q in questions.items()
                if qid not in held]
    else:
        base = [{"question_id": r["question_id"], "sample": int(r["sample"]), "rationale": r["text"],
                 **_q_fields(questions[r["question_id"]])} for r in student_rationales(cfg, run, questions)
                if r["question_id"] not in held]
    schema = pa.schema([("question_id", pa.string()), ("sample", pa.int64()), ("rationale", pa.string()),
                        ("question", pa.string()), ("options", pa.list_(pa.string())), ("answer", pa.int64())])
    ds = ray.data.from_arrow(pa.Table.from_pylist(base, schema=schema))
    if variant == "kard":
        from kard_ray.knowledge import retrieve

        ds = retrieve(ds, "rationale", cfg.student.n_knowledge, run.root, cfg.knowledge)
    ds = ds.map_batches(_format_batch, batch_format="pyarrow", batch_size=512, num_cpus=0.5,
                        fn_kwargs={"variant": variant, "dataset": cfg.data.dataset})
    out = run.examples(f"student_{variant}")
    if io.exists(out):
        io.remove(out)
    ds.write_parquet(out)
    return out


def validation_path(run: RunDir, variant: str) -> str:
    return run.examples(f"val_student_{variant}")


def write_validation_rows(cfg: KardConfig, run: RunDir, variant: str, held: dict[str, dict]) -> None:
    """The held-out questions as the variant's student sees them at test time: KARD with the `eval.k`
    passages BM25 retrieves by the question (what test time has; never the rationale's), RD and FT
    without passages. At most `student.validation_max_questions`, in id order."""
    import ray

    from kard_ray.inference.formats import question_query
    from kard_ray.inference.passages import passages_for
    from kard_ray.knowledge import format_passage

    path = validation_path(run, variant)
    if io.exists(path):
        io.remove(path)
    if not held:
        return
    rows = [{"question_id": qid, "query": question_query(q["question"], q["options"]), **_q_fields(q)}
            for qid, q in list(held.items())[: cfg.student.validation_max_questions]]
    if variant == "kard":
        got = {r["question_id"]: r for r in passages_for(ray.data.from_items(rows), "kard_bm25", cfg, run).take_all()}
        for r in rows:
            hit = got[r["question_id"]]
            r["passages"] = [format_passage(t, x) for t, x in zip(hit["passage_titles"], hit["passage_texts"])]
    else:
        for r in rows:
            r["passages"] = None
    schema = pa.schema([("question_id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                        ("answer", pa.int64()), ("passages", pa.list_(pa.string()))])
    io.write_table(pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema),
                   io.join(path, "part-0.parquet"))


def _q_fields(q: dict) -> dict:
    return {"question": q["question"], "options": list(q["options"]), "answer": int(q["answer"])}


# ------------------------------------------------------------------------------------------------
# training


def student_dataset(cfg: KardConfig, run: RunDir, variant: str, init_model: str):
    """The tokenised, shuffled, materialised examples of a variant (built first if missing)."""
    import ray

    path = run.examples(f"student_{variant}")
    if not io.exists(path):
        build_student_examples(cfg, run, variant)
    ds = ordered(ray.data.read_parquet(path))
    ds = tokenize_examples(ds, init_model, cfg.student.max_source_length, cfg.student.max_target_length)
    # one global shuffle (small data), then a local shuffle buffer per epoch in the loop;
    # materialised so epochs do not re-read and re-tokenise
    return ordered(ds.random_shuffle(seed=cfg.seed)).materialize()


def train_student(cfg: KardConfig, run: RunDir, variant: str, init_model: str, *, resume: bool = True,
                  fail_at_step: Optional[int] = None) -> dict:
    """Tokenise the variant's examples in Ray Data, train with the core, export to run.model(f"student_{variant}").

    init_model: HF name or a local/URI path of a seq2seq model with its tokenizer (for `student.model:
    tiny`, the pipeline first saves one with `kard_ray.models.save_tiny_model`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {VARIANTS}")
    if init_model == "tiny":
        raise ValueError("init_model='tiny': build it first (kard_ray.models.save_tiny_model) and pass its path")
    ds = student_dataset(cfg, run, variant, init_model)
    name = f"student_{variant}"
    train_cfg = cfg.student
    if variant == "ft" and cfg.student.ft_max_steps is not None:
        train_cfg = dataclasses.replace(cfg.student, max_steps=cfg.student.ft_max_steps)
    lengths = _target_lengths(run, variant, init_model)  # once: validation's token limit and the record
    task, rows = student_task(init_model, pack_tokens=cfg.student.pack_tokens), None
    if cfg.student.validate_every_steps:
        task, rows = _validation_task(cfg, run, variant, init_model, generation_defaults(lengths)["max_new_tokens"])
    result = train(task, ds, train_cfg, output_dir=run.model(name),
                   storage_path=cfg.resources.storage_path or run.checkpoints, name=name,
                   model_config=student_model_config(cfg, init_model, variant), seed=cfg.seed, resume=resume,
                   fail_at_step=fail_at_step, data_digest=tree_digest(run.examples(name)),
                   validation=rows, validate_every=cfg.student.validate_every_steps,
                   validation_key=None if rows is None else {"reading": task.validate_fn.score_by,
                                                             "max_new_tokens": task.validate_fn.max_new_tokens})
    result.update({"variant": variant, "examples": ds.count(), "model_dir": run.model(name)})
    # beside the exported student: what `eval.max_new_tokens: null` generates, so a whole target fits
    result["generation"] = write_generation_defaults(run.model(name), lengths)
    return result


def student_model_config(cfg: KardConfig, init_model: str, variant: str) -> dict:
    """What each training worker builds the student from (`Seq2SeqBuild` / `CausalBuild`); part of the
    weight fingerprint."""
    out = {"init_model": init_model, "variant": variant}
    if cfg.student.lora.r:
        out["lora"] = lora_settings(cfg.student.lora)
    return out


def _validation_task(cfg: KardConfig, run: RunDir, variant: str, init_model: str,
                     target_limit: int) -> tuple[TrainTask, list[dict]]:
    """The student's TrainTask with validation, and the held-out rows it scores (read as evaluation
    reads: eval.score_by; as many new tokens as evaluation generates). How it reads is part of which step
    gets exported, so `train` fingerprints it (`validation_key`)."""
    path = validation_path(run, variant)
    if not io.exists(path):
        raise FileNotFoundError(f"{path}: no held-out questions (student.validation_fraction="
                                f"{cfg.student.validation_fraction} held none out); rerun the examples stage")
    rows = io.read_table(path).to_pylist()
    max_new = cfg.eval.max_new_tokens or target_limit
    fn = Seq2SeqValidate(init_model, cfg.data.dataset, variant, max_new, cfg.student.max_source_length, cfg.eval.score_by)
    return student_task(init_model, fn, cfg.student.pack_tokens), rows


def _target_lengths(run: RunDir, variant: str, init_model: str) -> list[int]:
    targets = io.read_table(run.examples(f"student_{variant}"), columns=["target"]).column("target").to_pylist()
    encode = encode_completions if _is_causal(init_model) else encode_targets
    return [len(ids) for ids in encode(_tokenizer(init_model), targets)]

