"""Statistics of a rationales table against the questions' gold answers."""

from __future__ import annotations

import pyarrow as pa


def _rates(rows: list[dict], gold: dict[str, int]) -> dict:
    """Parse / agreement / keep counts and rates over rows without an error."""
    parsed = [r for r in rows if r["parsed_answer"] is not None]
    agree = sum(1 for r in parsed if gold.get(r["question_id"]) == r["parsed_answer"])
    kept = sum(1 for r in rows if r["consistent"])
    n = len(rows)
    return {"n_rationales": n, "parsed": len(parsed), "parse_rate": len(parsed) / n if n else 0.0,
            "agreement_rate": agree / len(parsed) if parsed else 0.0, "kept": kept,
            "consistency_rate": kept / n if n else 0.0}


def per_dataset_rates(rows: list[dict], gold: dict[str, int], datasets: dict[str, str]) -> dict[str, dict]:
    """`_rates` per dataset of the question (a mixed training set reports each source apart)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(datasets.get(r["question_id"]) or "unknown", []).append(r)
    return {name: _rates(rs, gold) for name, rs in sorted(groups.items())}


def rationale_stats(table: pa.Table, gold: dict[str, int], verifier: bool = False,
                    datasets: dict[str, str] | None = None) -> dict:
    """Counts and rates over every written row (so a resumed run reports the whole set).

    parse_rate: parsed / rationales; agreement_rate: parsed answers equal to gold / parsed;
    consistency_rate: kept (`consistent`) / rationales; per_question_consistency: mean over questions
    with rationales of their kept share; per_dataset: those rates per dataset of the question (when
    `datasets`, {question id: dataset}, is given). Error rows are counted apart and excluded from the rates.
    """
    rows = table.select(["question_id", "parsed_answer", "consistent", "prompt_tokens",
                         "completion_tokens", "error", "teacher"]).to_pylist()
    ok = [r for r in rows if r["error"] is None]
    parsed = [r for r in ok if r["parsed_answer"] is not None]
    agree = sum(1 for r in parsed if gold.get(r["question_id"]) == r["parsed_answer"])
    kept_per_q: dict[str, list[int]] = {}
    for r in ok:
        kept_per_q.setdefault(r["question_id"], []).append(1 if r["consistent"] else 0)
    n_ok = len(ok)
    stats = {
        "n_questions": len(gold),
        "questions_with_rationales": len(kept_per_q),
        "n_rationales": n_ok,
        "parsed": len(parsed),
        "unparsed": n_ok - len(parsed),
        "parse_rate": len(parsed) / n_ok if n_ok else 0.0,
        "agreement_rate": agree / len(parsed) if parsed else 0.0,
        "kept": sum(sum(v) for v in kept_per_q.values()),
        "consistency_rate": sum(sum(v) for v in kept_per_q.values()) / n_ok if n_ok else 0.0,
        "per_question_consistency": (sum(sum(v) / len(v) for v in kept_per_q.values()) / len(kept_per_q)
                                     if kept_per_q else 0.0),
        "questions_without_kept_rationale": sum(1 for q in gold if sum(kept_per_q.get(q, [])) == 0),
        "questions_without_rationales": sum(1 for q in gold if q not in kept_per_q),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
        "errors": sum(1 for r in rows if r["error"] is not None),
        "teachers": sorted({r["teacher"] for r in rows if r["teacher"]}),
    }
    if datasets is not None:
        stats["per_dataset"] = per_dataset_rates(ok, gold, datasets)
    if verifier:
        stats["unparsed_kept_by_verifier"] = sum(1 for r in ok if r["parsed_answer"] is None and r["consistent"])
    return stats
