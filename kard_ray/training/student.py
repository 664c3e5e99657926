"""Student distillation: examples (KARD / RD / FT), tokenisation, and the seq2seq `TrainTask`.

KARD (KARD.md §3): the student reads the question, its options and the passages BM25 retrieved with
the teacher's *rationale* as the query, and learns to write that rationale and the answer letter.
RD drops the Knowledge field; FT learns the answer alone.

    path = build_student_examples(cfg, run, "kard")       # parquet {question_id, sample, source, target}
    result = train_student(cfg, run, "kard", init_model)  # trains, exports run.model("student_kard")

Inference must tokenise sources with `encode_sources` (the same suffix-preserving truncation as
training), so a long Knowledge field is cut while "\\nExplanation:" stays at the end.
"""

from __future__ import annotations

import dataclasses

import functools
import string
from typing import Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from kard_ray import io
from kard_ray.config import KardConfig
from kard_ray.io import RunDir
from kard_ray.training.core import TrainTask, train

VARIANTS = ("kard", "rd", "ft")
SOURCE_SUFFIX = "\nExplanation:"
PASSAGE_SEPARATOR = "\t"  # the authors join several passages with a tab (preprocess_cot_grounded.py)

# The authors' instructions. MedQA names the domain; StrategyQA/OBQA (and our synthetic/generic
# tasks) drop the domain words. RD has no knowledge, so "with given medical knowledge" goes too.
_INSTRUCTION = {
    "medqa": ("The following are multiple-choice questions about medical knowledge. Generate a step-by-step "
              "explanations for each question with given medical knowledge."),
    "medqa_rd": ("The following are multiple-choice questions about medical knowledge. Generate a step-by-step "
                 "explanations for each question."),
    "default": "The following are multiple-choice questions. Generate a step-by-step explanations for each question.",
}


# ------------------------------------------------------------------------------------------------
# formatting


def _clean(text: str) -> str:
    """One line: newlines inside a field would read as the prompt's own field separators."""
    return " ".join(str(text).split())


def answer_letter(index: int, n_options: Optional[int] = None) -> str:
    if index < 0 or index >= 26 or (n_options is not None and index >= n_options):
        raise ValueError(f"answer index {index} out of range for {n_options} options")
    return string.ascii_uppercase[index]


def format_question(question: str, options: Sequence[str]) -> str:
    """`{q} A. {o1} B. {o2} ...` (the authors' data template)."""
    if len(options) < 2 or len(options) > 26:
        raise ValueError(f"a question needs 2-26 options, got {len(options)}")
    opts = " ".join(f"{string.ascii_uppercase[i]}. {_clean(o)}" for i, o in enumerate(options))
    return f"{_clean(question)} {opts}"


def format_source(question: str, options: list[str], passages: list[str] | None, dataset: str) -> str:
    """The student's input, KARD.md §3:

    "<instruction>\\nQuestion: {q} A. {o1} B. {o2} ...\\nKnowledge: {passages}\\nExplanation:"

    passages=None gives RD's input (no Knowledge field). Several passages are joined with a tab.
    """
    if passages is None:
        instruction = _INSTRUCTION["medqa_rd" if dataset == "medqa" else "default"]
        return f"{instruction}\nQuestion: {format_question(question, options)}{SOURCE_SUFFIX}"
    instruction = _INSTRUCTION["medqa" if dataset == "medqa" else "default"]
    knowledge = PASSAGE_SEPARATOR.join(_clean(p) for p in passages)
    return f"{instruction}\nQuestion: {format_question(question, options)}\nKnowledge: {knowledge}{SOURCE_SUFFIX}"


def format_target(rationale: str | None, answer_letter: str, answer_text: str | None = None) -> str:
    """"{rationale}\\nAnswer: {letter}" (KARD, RD); rationale=None gives FT's answer-only target.

    FT's target is the answer alone — the option's text, then "Answer: {letter}" — so one parser reads
    every method's output and FT can be scored by text as well as by letter (tiny from-scratch students
    are scored by text, KARD.md §5). Without `answer_text` it is just "Answer: {letter}".
    """
    if rationale is None:
        return f"{answer_text.strip()}\nAnswer: {answer_letter}" if answer_text else f"Answer: {answer_letter}"
    return f"{rationale.strip()}\nAnswer: {answer_letter}"


# ------------------------------------------------------------------------------------------------
# tokenisation


def encode_sources(tokenizer, sources: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each source, at most `max_length`, truncating the *middle*.

    A source that fits is tokenised exactly as `tokenizer(source)` would. A longer one loses the end
    of its question/knowledge text while the "\\nExplanation:" suffix and the end-of-sequence token
    survive — truncating the tail instead would delete the cue that makes the student explain.
    """
    enc = tokenizer(list(sources), add_special_tokens=True, truncation=False,
                    return_offsets_mapping=tokenizer.is_fast, verbose=False)
    out = []
    for i, (src, ids) in enumerate(zip(sources, enc["input_ids"])):
        if len(ids) <= max_length:
            out.append(list(ids))
            continue
        cut = src.rfind(SOURCE_SUFFIX)
        if cut < 0 or not tokenizer.is_fast:
            out.append(list(ids[: max_length - 1]) + [ids[-1]])  # keep EOS at least
            continue
        # first token that starts inside the suffix (special tokens have empty (0, 0) offsets)
        offsets = enc["offset_mapping"][i]
        first_tail = next((j for j, (a, b) in enumerate(offsets) if b > a and a >= cut), len(ids) - 1)
        tail = list(ids[first_tail:])
        head = list(ids[:first_tail])[: max(0, max_length - len(tail))]
        out.append((head + tail)[-max_length:] if len(tail) > max_length else head + tail)
    return out


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


def _tokenize_batch(batch: pa.Table, tokenizer_path: str, max_source_length: int,
                    max_target_length: Optional[int]) -> pa.Table:
    tok = _tokenizer(tokenizer_path)
    src = encode_sources(tok, batch.column("source").to_pylist(), max_source_length)
    tgt = encode_targets(tok, batch.column("target").to_pylist(), max_target_length)
    ids = pa.list_(pa.int32())
    return pa.table({"question_id": batch.column("question_id"), "sample": batch.column("sample"),
                     "input_ids": pa.array(src, type=ids), "labels": pa.array(tgt, type=ids)})


def tokenize_examples(ds, tokenizer_path: str, max_source_length: int, max_target_length: Optional[int]):
    """Ray Data: {question_id, sample, source, target} -> {question_id, sample, input_ids, labels}."""
    return ds.map_batches(_tokenize_batch, batch_format="pyarrow", batch_size=256, num_cpus=0.5,
                          fn_kwargs={"tokenizer_path": tokenizer_path, "max_source_length": max_source_length,
                                     "max_target_length": max_target_length})


# ------------------------------------------------------------------------------------------------
# the seq2seq TrainTask


class Seq2SeqCollate:
    """Dynamic padding: pad to the longest sequence of the batch; labels padded with -100."""

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

        model = load_seq2seq(model_config["init_model"])
        model.config.use_cache = False  # no KV cache while training
        return model


class Seq2SeqExport:
    """save_pretrained of the model plus the tokenizer it was trained with."""

    def __init__(self, tokenizer_path: str):
        self.tokenizer_path = tokenizer_path

    def __call__(self, model: torch.nn.Module, directory: str) -> None:
        model.config.use_cache = True  # generation wants the cache back
        model.save_pretrained(directory)
        _tokenizer(self.tokenizer_path).save_pretrained(directory)


def seq2seq_task(init_model: str) -> TrainTask:
    tok = _tokenizer(init_model)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer of {init_model} has no pad token")
    return TrainTask(build_model=Seq2SeqBuild(), loss_fn=seq2seq_loss, collate_fn=Seq2SeqCollate(tok.pad_token_id),
                     export_fn=Seq2SeqExport(init_model), count_fn=count_target_tokens,
                     flops_per_token=seq2seq_flops_per_token)


# ------------------------------------------------------------------------------------------------
# examples


def _read_questions(run: RunDir) -> dict[str, dict]:
    path = run.questions("train")
    if not io.exists(path):
        raise FileNotFoundError(f"{path}: training questions not found (run the questions stage first)")
    rows = io.read_table(path).to_pylist()
    out = {}
    for i, q in enumerate(rows):
        n = len(q.get("options") or [])
        if q.get("answer") is None or not (0 <= q["answer"] < n):
            raise ValueError(f"{path}: row {i} (id {q.get('id')!r}): field 'answer' {q.get('answer')!r} is not an "
                             f"index into its {n} options")
        out[q["id"]] = q
    return out


def read_kept_rationales(run: RunDir, questions: dict[str, dict], cap: Optional[int] = None,
                         require_any: bool = False) -> list[dict]:
    """Answer-consistent, non-empty rationales without a generation error, ordered by (question, sample);
    at most `cap` per question. Shared by the student's and the reranker's example builders."""
    path = run.rationales
    if not io.exists(path):
        raise FileNotFoundError(f"{path}: rationales not found (run the teacher stage first)")
    table = io.read_table(path)
    for col in ("question_id", "sample", "text", "consistent"):
        if col not in table.column_names:
            raise ValueError(f"{path}: missing column {col!r} (have {table.column_names})")
    rows = table.to_pylist()
    kept: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        if r["question_id"] not in questions:
            raise ValueError(f"{path}: row {i}: question_id {r['question_id']!r} is not in {run.questions('train')}")
        if not r["consistent"] or r.get("error") or not (r["text"] or "").strip():
            continue
        kept.setdefault(r["question_id"], []).append(r)
    out = []
    for qid in sorted(kept):
        rs = sorted(kept[qid], key=lambda r: r["sample"])
        out.extend(rs[:cap] if cap else rs)
    if require_any and not out:
        raise ValueError(f"{path}: no answer-consistent rationale to train on ({len(rows)} rows)")
    return out


def kept_rationales(cfg: KardConfig, run: RunDir, questions: dict[str, dict]) -> list[dict]:
    """Answer-consistent rationales, at most `student.max_rationales_per_question` per question."""
    return read_kept_rationales(run, questions, cfg.student.max_rationales_per_question, require_any=True)


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
    questions = _read_questions(run)
    if variant == "ft":
        base = [{"question_id": qid, "sample": 0, "rationale": None, **_q_fields(q)} for qid, q in questions.items()]
    else:
        base = [{"question_id": r["question_id"], "sample": int(r["sample"]), "rationale": r["text"],
                 **_q_fields(questions[r["question_id"]])} for r in kept_rationales(cfg, run, questions)]
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
    ds = ray.data.read_parquet(path)
    ds = tokenize_examples(ds, init_model, cfg.student.max_source_length, cfg.student.max_target_length)
    # one global shuffle (small data), then a local shuffle buffer per epoch in the loop;
    # materialised so epochs do not re-read and re-tokenise
    return ds.random_shuffle(seed=cfg.seed).materialize()


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
    result = train(seq2seq_task(init_model), ds, train_cfg, output_dir=run.model(name),
                   storage_path=cfg.resources.storage_path or run.checkpoints, name=name,
                   model_config={"init_model": init_model}, seed=cfg.seed, resume=resume, fail_at_step=fail_at_step)
    result.update({"variant": variant, "examples": ds.count(), "model_dir": run.model(name)})
    return result
