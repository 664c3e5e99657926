"""Existing teacher output → rationales per question.

Two line formats (JSONL, optionally gzipped; local path or URI), detected per line:

* raw OpenAI responses: `{"id": <question id>, "response": <chat.completion object>}` — the format of
  the KARD authors' StrategyQA file; the rationales are `response.choices[i].message.content`;
* plain: `{"id": <question id>, "rationales": [str, ...]}` — what the synthetic task writes.

Several lines for one id are concatenated in file order (e.g. two requests of n=5 each).
Token usage of a raw response is kept: its prompt tokens are charged to the response's first
rationale and its completion tokens split evenly over its rationales, so sums equal the bill.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from kard_ray import io


@dataclass
class TeacherRecord:
    """All imported rationales of one question, in order, with per-rationale token counts."""

    texts: list[str] = field(default_factory=list)
    prompt_tokens: list[Optional[int]] = field(default_factory=list)
    completion_tokens: list[Optional[int]] = field(default_factory=list)
    teacher: Optional[str] = None


def _split_evenly(total: int, n: int) -> list[int]:
    base, rest = divmod(total, n)
    return [base + (1 if i < rest else 0) for i in range(n)]


def _from_response(resp: dict, where: str) -> tuple[list[str], list[Optional[int]], list[Optional[int]], Optional[str]]:
    if not isinstance(resp, dict):
        raise ValueError(f"{where}: field 'response': expected a chat.completion object")
    choices = resp.get("choices")
    if not isinstance(choices, list):
        raise ValueError(f"{where}: field 'response.choices': missing or not a list")
    # Choices carry an `index`; order by it so sample numbers follow the API's numbering.
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
    texts = []
    for k, ch in enumerate(choices):
        content = ch.get("message", {}).get("content") if isinstance(ch, dict) else None
        if not isinstance(content, str):
            raise ValueError(f"{where}: field 'response.choices[{k}].message.content': missing or not a string")
        texts.append(content)
    n = len(texts)
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    prompt = [pt if (k == 0 and isinstance(pt, int)) else (0 if isinstance(pt, int) else None) for k in range(n)]
    completion = _split_evenly(ct, n) if isinstance(ct, int) and n else [None] * n
    model = resp.get("model") if isinstance(resp.get("model"), str) else None
    return texts, prompt, completion, model


def load_teacher_records(path: str) -> dict[str, TeacherRecord]:
    """{question id: TeacherRecord} from either import format; bad lines raise naming file:line:field."""
    out: dict[str, TeacherRecord] = {}
    for where, row in io.iter_json_objects(path):
        qid = row.get("id", row.get("question_id"))
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
            raise ValueError(f"{where}: field 'id': missing or not a string")
        if "response" in row:
            texts, prompt, completion, model = _from_response(row["response"], where)
        elif "rationales" in row:
            r = row["rationales"]
            if not isinstance(r, list) or not all(isinstance(t, str) for t in r):
                raise ValueError(f"{where}: field 'rationales': expected a list of strings")
            texts, prompt, completion, model = list(r), [None] * len(r), [None] * len(r), row.get("teacher")
        else:
            raise ValueError(f"{where}: neither 'response' (raw chat.completion) nor 'rationales' present; "
                             f"keys: {sorted(row)[:8]}")
        rec = out.setdefault(str(qid), TeacherRecord())
        rec.texts += texts
        rec.prompt_tokens += prompt
        rec.completion_tokens += completion
        rec.teacher = rec.teacher or model
    return out


def load_teacher_rationales(path: str) -> dict[str, list[str]]:
    """{question id: [rationale texts]} from raw chat.completion JSONL or JSONL {id, rationales}."""
    return {qid: rec.texts for qid, rec in load_teacher_records(path).items()}
