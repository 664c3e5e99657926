"""What every backend consumes and produces.

Input (one row per question still to do): `question_id`, `question`, `options`, `answer`, `dataset`,
`samples` (the sample numbers still missing) and `messages_json` (the chat prompt as JSON).
Output (one row per sample): GEN_SCHEMA — the RATIONALES fields a backend knows, plus the question
fields the scoring stage needs. A backend returns a row for every requested sample: a sample it
could not produce carries its `error` instead of text.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

GEN_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("sample", pa.int64()),
    ("text", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("error", pa.string()),
    ("teacher", pa.string()),
    ("question", pa.string()),
    ("options", pa.list_(pa.string())),
    ("answer", pa.int64()),
])

QUESTION_FIELDS = ("question_id", "question", "options", "answer")


def gen_row(q: dict, sample: int, text: str | None, teacher: str, prompt_tokens: int | None = None,
            completion_tokens: int | None = None, error: str | None = None) -> dict:
    """One output row for sample `sample` of question row `q`."""
    return {"question_id": q["question_id"], "sample": int(sample), "text": text if error is None else (text or ""),
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "error": error,
            "teacher": teacher, "question": q["question"], "options": list(q["options"]),
            "answer": int(q["answer"])}


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=GEN_SCHEMA)


def messages_of(row: dict) -> list[dict]:
    return json.loads(row["messages_json"])


def stable_seed(base: int, question_id: str, sample: int) -> int:
    """A per-(question, sample) seed that is the same in every process and every rerun."""
    h = int.from_bytes(hashlib.sha1(f"{question_id}\0{sample}".encode()).digest()[:4], "big")
    return (base * 1_000_003 + h) % (2**31 - 1)
