"""Question readers, converters and row validation.

Every supported input format becomes the QUESTIONS schema: id, dataset, split, question,
options (list of strings), answer (index into options). A row that cannot be converted is never
dropped silently: it is returned as a rejection (source file, 1-based line, reason, raw text), the
stage writes it to `<run>/rejected/` and fails when the rejected share exceeds the threshold.

Formats:
    kard        {id, sent1, ending0..ending3, label}           (KARD authors' StrategyQA/MedQA/OBQA)
    medqa       {question, options: {A: .., B: ..}, answer_idx: "B"}   (MedQA-USMLE original)
    obqa        {id, question: {stem, choices: [{text, label}]}, answerKey}  (OpenBookQA original)
    strategyqa  {qid, question, answer: bool, facts}            (StrategyQA original)
    generic     {id, question, options: [..], answer: int | letter | option text}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from kard_ray import io
from kard_ray.data import schemas
from kard_ray.console import say

LETTERS = "ABCDEFGHIJ"
FORMATS = ("kard", "medqa", "obqa", "strategyqa", "generic")


class RowError(ValueError):
    """A row that cannot become a valid question; `field` names the culprit."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RejectedShareError(RuntimeError):
    """More input rows were rejected than the configured threshold allows."""


@dataclass
class Rejection:
    source: str
    line: int
    reason: str
    raw: str

    def as_row(self, stage: str) -> dict:
        return {"stage": stage, "source": self.source, "line": self.line, "reason": self.reason, "raw": self.raw[:2000]}


# ----------------------------------------------------------------------------------------------
# raw rows


def iter_raw_rows(path: str) -> Iterator[tuple[str, int, Any]]:
    """(source, line, dict-or-RowError) for JSONL(.gz), JSON and parquet files (or a directory)."""
    for f in io.list_files(path, suffixes=(".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")):
        if f.endswith(".parquet"):
            for i, row in enumerate(io.read_table(f).to_pylist(), start=1):
                yield f, i, row
        elif f.endswith((".json", ".json.gz")):
            try:
                obj = json.loads(io.read_bytes(f))
            except json.JSONDecodeError as e:
                yield f, e.lineno, RowError("json", f"invalid JSON file: {e.msg}")
                continue
            rows = obj.get("data", obj.get("questions")) if isinstance(obj, dict) else obj
            if not isinstance(rows, list):
                yield f, 1, RowError("json", "expected a list of objects (or {'data': [...]})")
                continue
            for i, row in enumerate(rows, start=1):
                yield f, i, row
        else:
            for line_no, line in io.iter_text_lines(f):
                if not line.strip():
                    continue
                try:
                    yield f, line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    yield f, line_no, RowError("json", f"invalid JSON line ({e.msg} at column {e.colno})")


# ----------------------------------------------------------------------------------------------
# converters


def detect_format(row: dict) -> str:
    if "sent1" in row and any(k.startswith("ending") for k in row):
        return "kard"
    if "answer_idx" in row and isinstance(row.get("options"), dict):
        return "medqa"
    if isinstance(row.get("question"), dict) and "answerKey" in row:
        return "obqa"
    if "qid" in row and isinstance(row.get("answer"), bool):
        return "strategyqa"
    if "question" in row and "options" in row and "answer" in row:
        return "generic"
    raise RowError("format", f"cannot detect the format from keys {sorted(row)[:12]}; set data.format")


def _text(row: dict, key: str, label: str | None = None) -> str:
    label = label or key
    if key not in row or row[key] is None:
        raise RowError(label, "missing")
    v = row[key]
    if not isinstance(v, str):
        raise RowError(label, f"expected a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError(label, "empty")
    return v.strip()


def _int(v: Any, label: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise RowError(label, f"expected an integer, got {type(v).__name__} {v!r}")
    try:
        return int(v)
    except ValueError:
        raise RowError(label, f"expected an integer, got {v!r}") from None


def _letter_index(v: Any, options: list[str], label: str) -> int:
    if not isinstance(v, str) or len(v.strip()) != 1 or v.strip().upper() not in LETTERS:
        raise RowError(label, f"expected an option letter, got {v!r}")
    return LETTERS.index(v.strip().upper())


def _from_kard(row: dict) -> tuple[str, str, list[str], int]:
    qid = _text(row, "id")
    q = _text(row, "sent1")
    endings = sorted((k for k in row if k.startswith("ending") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    options = [row[k].strip() for k in endings if isinstance(row[k], str) and row[k].strip()]
    if "label" not in row:
        raise RowError("label", "missing")
    return qid, q, options, _int(row["label"], "label")


def _from_medqa(row: dict) -> tuple[str, str, list[str], int]:
    q = _text(row, "question")
    opts = row["options"]
    keys = sorted(opts)
    options = [str(opts[k]).strip() for k in keys]
    ans = row.get("answer_idx")
    if ans not in keys:
        raise RowError("answer_idx", f"{ans!r} is not one of the option keys {keys}")
    qid = str(row.get("id") or row.get("qid") or "")
    return qid, q, options, keys.index(ans)


def _from_obqa(row: dict) -> tuple[str, str, list[str], int]:
    qid = _text(row, "id")
    qd = row["question"]
    q = _text(qd, "stem", "question.stem")
    choices = qd.get("choices")
    if not isinstance(choices, list):
        raise RowError("question.choices", "missing or not a list")
    choices = sorted(choices, key=lambda c: str(c.get("label", "")))
    labels = [str(c.get("label", "")).strip() for c in choices]
    options = [str(c.get("text", "")).strip() for c in choices]
    key = str(row.get("answerKey", "")).strip()
    if key not in labels:
        raise RowError("answerKey", f"{key!r} is not one of the choice labels {labels}")
    return qid, q, options, labels.index(key)


def _from_strategyqa(row: dict) -> tuple[str, str, list[str], int]:
    qid = _text(row, "qid")
    q = _text(row, "question")
    if not isinstance(row.get("answer"), bool):
        raise RowError("answer", f"expected true/false, got {row.get('answer')!r}")
    return qid, q, ["yes", "no"], 0 if row["answer"] else 1


def _from_generic(row: dict) -> tuple[str, str, list[str], int]:
    qid = _text(row, "id") if not isinstance(row.get("id"), int) else str(row["id"])
    q = _text(row, "question")
    options = row.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise RowError("options", "expected a list of strings")
    options = [o.strip() for o in options]
    ans = row.get("answer")
    if isinstance(ans, int) and not isinstance(ans, bool):
        idx = ans
    elif isinstance(ans, str) and ans.strip() in options:
        idx = options.index(ans.strip())
    else:
        idx = _letter_index(ans, options, "answer")
    return qid, q, options, idx


_CONVERTERS = {"kard": _from_kard, "medqa": _from_medqa, "obqa": _from_obqa,
               "strategyqa": _from_strategyqa, "generic": _from_generic}


def convert_row(row: Any, fmt: str, dataset: str, split: str, line: int) -> dict:
    """One raw row → a QUESTIONS row; raises RowError naming the field."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError("row", f"expected a JSON object, got {type(row).__name__}")
    try:
        qid, q, options, answer = _CONVERTERS[fmt](row)
    except KeyError as e:
        raise RowError(str(e).strip("'"), "missing") from None
    except (AttributeError, TypeError) as e:
        raise RowError("row", f"malformed ({e})") from None
    if not qid:
        qid = f"{split}-{line:06d}"
    if len(options) < 2:
        raise RowError("options", f"fewer than two non-empty options ({len(options)})")
    if any(not o for o in options):
        raise RowError("options", "an option is empty")
    if not 0 <= answer < len(options):
        raise RowError("answer", f"index {answer} out of range for {len(options)} options")
    return {"id": qid, "dataset": dataset, "split": split, "question": q, "options": options, "answer": answer}


def load_questions(path: str, fmt: str = "auto", dataset: str = "generic", split: str = "train",
                   max_rows: int | None = None) -> tuple[pa.Table, list[Rejection]]:
    """Read, convert and validate a question file; returns (valid table, rejections).

    Duplicate ids: the first occurrence is kept, later ones are rejected with the line of the first.
    """
    good: list[dict] = []
    rejected: list[Rejection] = []
    seen: dict[str, tuple[str, int]] = {}
    for source, line, raw in iter_raw_rows(path):
        if max_rows is not None and len(good) >= max_rows:
            break
        try:
            if fmt == "auto" and not isinstance(raw, RowError):
                if not isinstance(raw, dict):
                    raise RowError("row", f"expected a JSON object, got {type(raw).__name__}")
                fmt = detect_format(raw)
            row = convert_row(raw, fmt if fmt != "auto" else "generic", dataset, split, line)
            if row["id"] in seen:
                s, l = seen[row["id"]]
                raise RowError("id", f"duplicate id {row['id']!r} (first at {s}:{l})")
            seen[row["id"]] = (source, line)
            good.append(row)
        except RowError as e:
            rejected.append(Rejection(source, line, str(e), raw_text(raw)))
    return pa.Table.from_pylist(good, schema=schemas.QUESTIONS), rejected


def raw_text(raw: Any) -> str:
    if isinstance(raw, RowError):
        return ""
    try:
        return json.dumps(raw, default=str)[:2000]
    except (TypeError, ValueError):
        return repr(raw)[:2000]


def write_rejected(rejected_dir: str, stage: str, rejected: list[Rejection]) -> str | None:
    """Write rejections as `<rejected_dir>/<stage>.parquet` (replacing an older file of that stage)."""
    path = io.join(rejected_dir, f"{stage}.parquet")
    if not rejected:
        if io.exists(path):
            io.remove(path)
        return None
    io.write_table(pa.Table.from_pylist([r.as_row(stage) for r in rejected], schema=schemas.REJECTED), path)
    return path


def enforce_rejected_share(stage: str, n_good: int, n_rejected: int, max_fraction: float,
                           where: str | None = None) -> None:
    """Print the counts; raise when the rejected share is above `max_fraction`."""
    total = n_good + n_rejected
    share = n_rejected / total if total else 0.0
    say(f"[{stage}] {n_good} rows kept, {n_rejected} rejected ({share:.2%})" + (f" -> {where}" if where else ""))
    if total == 0:
        raise RejectedShareError(f"[{stage}] no input rows")
    if share > max_fraction:
        raise RejectedShareError(
            f"[{stage}] {n_rejected}/{total} rows rejected ({share:.2%}) > data.max_rejected_fraction="
            f"{max_fraction:.2%}; see {where or 'rejected/'} for each row's file, line and reason")
