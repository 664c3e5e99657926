"""The `questions` stage: validated train/test questions into the run directory.

For the synthetic task it also writes the task's corpus and teacher rationales as plain input files
(`<run>/inputs/`), which the knowledge and teacher stages then read like any user's files.
"""

from __future__ import annotations

import json

import pyarrow as pa

from kard_ray import io
from kard_ray.config import KardConfig
from kard_ray.data import schemas
from kard_ray.data.questions import enforce_rejected_share, load_questions, write_rejected


def synthetic_inputs(run: io.RunDir) -> dict[str, str]:
    """Where the synthetic task's raw inputs are written inside the run directory."""
    return {
        "corpus": run.path("inputs", "synthetic_corpus.jsonl"),
        "rationales": run.path("inputs", "synthetic_rationales.jsonl"),
        "test_rationales": run.path("inputs", "synthetic_test_rationales.jsonl"),
    }


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_synthetic_inputs(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.data.synthetic import make_task

    task = make_task(cfg.data.synthetic)
    paths = synthetic_inputs(run)
    io.write_bytes(paths["corpus"], _jsonl(task.passages))
    by_q: dict[str, list[str]] = {}
    for r in task.rationales:
        by_q.setdefault(r["question_id"], []).append(r["text"])
    io.write_bytes(paths["rationales"], _jsonl([{"id": k, "rationales": v} for k, v in by_q.items()]))
    by_q = {}
    for r in task.test_rationales:
        by_q.setdefault(r["question_id"], []).append(r["text"])
    io.write_bytes(paths["test_rationales"], _jsonl([{"id": k, "rationales": v} for k, v in by_q.items()]))
    counts = {}
    for split, rows in (("train", task.train_questions), ("test", task.test_questions)):
        limit = cfg.data.max_train_questions if split == "train" else cfg.data.max_test_questions
        rows = rows[:limit] if limit else rows
        io.write_table(pa.Table.from_pylist(rows, schema=schemas.QUESTIONS), run.questions(split))
        counts[f"{split}_questions"] = len(rows)
    counts["passages_raw"] = len(task.passages)
    return counts


def prepare_questions(cfg: KardConfig, run: io.RunDir) -> dict:
    """Write `<run>/questions/{train,test}.parquet`; returns row counts for the manifest."""
    if cfg.data.dataset == "synthetic" and cfg.data.train_path is None:
        return write_synthetic_inputs(cfg, run)
    counts: dict = {}
    for split, path, limit in (("train", cfg.data.train_path, cfg.data.max_train_questions),
                               ("test", cfg.data.test_path, cfg.data.max_test_questions)):
        if path is None:
            continue
        table, rejected = load_questions(path, cfg.data.format, cfg.data.dataset, split, limit)
        where = write_rejected(run.rejected, f"questions_{split}", rejected)
        enforce_rejected_share(f"questions/{split}", table.num_rows, len(rejected), cfg.data.max_rejected_fraction, where)
        io.write_table(table, run.questions(split))
        counts[f"{split}_questions"] = table.num_rows
        counts[f"{split}_rejected"] = len(rejected)
    return counts


def read_questions(run: io.RunDir, split: str) -> dict[str, dict]:
    """The split's questions by id, each checked for an id, a question, options and an answer index."""
    path = run.questions(split)
    if not io.exists(path):
        raise FileNotFoundError(f"{path}: {split} questions not found (run the questions stage first)")
    out = {}
    for i, q in enumerate(io.read_table(path).to_pylist()):
        if not q.get("id") or not isinstance(q.get("question"), str) or not q.get("options"):
            raise ValueError(f"{path}: row {i}: needs fields 'id', 'question' and 'options' (got id {q.get('id')!r})")
        n = len(q["options"])
        if q.get("answer") is None or not (0 <= q["answer"] < n):
            raise ValueError(f"{path}: row {i} (id {q.get('id')!r}): field 'answer' {q.get('answer')!r} is not an "
                             f"index into its {n} options")
        out[q["id"]] = q
    return out


def test_rationales_path(cfg: KardConfig, run: io.RunDir) -> str | None:
    """Test-time teacher rationales ({id, rationales} JSONL or raw responses) when the run has some:
    `eval.oracle_rationales_path`, or the synthetic task's own. Used by the oracle method and to decide
    whether the reranker's Hits@k needs held-out training questions."""
    path = cfg.eval.oracle_rationales_path
    if not path and cfg.data.dataset == "synthetic":
        path = synthetic_inputs(run)["test_rationales"]
    return path if path and io.exists(path) else None


def validation_group(question_id: str, dataset: str) -> str:
    """What a validation split holds out as a whole: for the synthetic task an entity (its question ids
    are `<split>-<entity>-<attribute>`, so every question of a held-out entity goes together and none of
    its facts is trained on), for a real dataset the question."""
    return question_id.rsplit("-", 1)[0] if dataset == "synthetic" else question_id


def validation_ids(question_ids, fraction: float, dataset: str) -> set[str]:
    """The training questions held out for validation: groups whose stable hash falls under `fraction`
    (the same ids for the same fraction, whatever else is in the split)."""
    import hashlib

    if fraction <= 0:
        return set()
    out = set()
    for qid in question_ids:
        digest = hashlib.blake2b(validation_group(qid, dataset).encode(), digest_size=8).digest()
        if int.from_bytes(digest, "big") / 2 ** 64 < fraction:
            out.add(qid)
    return out
