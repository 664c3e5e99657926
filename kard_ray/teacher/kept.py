"""The rationales training uses: answer-consistent, non-empty, without a generation error.

One reader for the student's and the reranker's example builders, so both train on the same set.
"""

from __future__ import annotations

from typing import Optional

from kard_ray import io


def kept_rationales(run: io.RunDir, questions: dict[str, dict], cap: Optional[int] = None,
                    require_any: bool = False) -> list[dict]:
    """Kept rationale rows ordered by (question, sample), at most `cap` per question.

    Every row must belong to a training question: a rationale for an unknown id means the teacher
    ran on other questions than these, and training on it would be silently wrong."""
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
