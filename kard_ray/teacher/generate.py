"""The teacher stage: questions → rationales (parquet parts) + statistics, resumable and idempotent.

    questions(train) ─► todo (samples not yet written) ─► backend (Ray Data) ─► parse + consistency
        ─► [verifier actors] ─► driver: group rows by question ─► one part file per finished batch

Rows are written by the driver as Ray Data hands over finished blocks (in completion order), each
block's complete questions as one part file (store.py). A rerun reads what exists, asks the backend
only for the missing (question, sample) rows — and, with `teacher.retry_errors`, for rows recorded
with an error — and removes superseded rows at the end. Killing the process at any moment loses
only rows not yet written and never leaves a duplicate or a half-written file.

Tokens and dollars: every row carries its prompt/completion tokens (the API's `usage`, counted with a
tokenizer where absent); the stats' `cost` section prices them (`teacher.prices`). With
`teacher.max_cost_usd` the questions go out in waves that fit the budget left, and the stage stops
cleanly (rows kept) before a question that would pass it; a rerun with a higher budget continues.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from kard_ray import io
from kard_ray.config import KardConfig
from kard_ray.data.schemas import RATIONALES
from kard_ray.io import RunDir
from kard_ray.teacher.backends import make_backend
from kard_ray.teacher.parsing import parse_answer
from kard_ray.teacher.prompts import build_messages, load_few_shot
from kard_ray.teacher.stats import rationale_stats
from kard_ray.teacher.store import RationaleStore
from kard_ray.console import progress, say

SCORED_SCHEMA_EXTRA = [("parsed_answer", pa.int64()), ("consistent", pa.bool_()), ("needs_verifier", pa.bool_()),
                       ("verifier_answer", pa.int64())]


def _log(msg: str) -> None:
    say(f"[teacher] {msg}")


def read_train_questions(run: RunDir) -> list[dict]:
    path = run.questions("train")
    if not io.exists(path):
        raise FileNotFoundError(f"{path}: no training questions; run the questions stage first")
    table = io.read_table(path)
    missing = [c for c in ("id", "question", "options", "answer") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing (expected the QUESTIONS schema)")
    return table.to_pylist()


def score_batch(batch: pa.Table, filter: str, verifier: bool) -> pa.Table:
    """Parse each rationale's stated answer and decide `consistent` (the keep flag).

    parse: kept when the parsed answer is gold; unparsed rows go to the verifier when one is set.
    verifier: every row goes to the verifier. none: every produced row is kept.
    """
    rows = batch.to_pylist()
    for r in rows:
        ok = r["error"] is None
        parsed = parse_answer(r["text"], r["options"]) if ok else None
        r["parsed_answer"] = parsed
        r["verifier_answer"] = None
        if not ok:
            r["consistent"], r["needs_verifier"] = False, False
        elif filter == "none":
            r["consistent"], r["needs_verifier"] = True, False
        elif filter == "verifier":
            r["consistent"], r["needs_verifier"] = False, True
        else:
            r["consistent"] = parsed is not None and parsed == r["answer"]
            r["needs_verifier"] = verifier and parsed is None
    schema = batch.schema
    for name, typ in SCORED_SCHEMA_EXTRA:
        if name not in schema.names:
            schema = schema.append(pa.field(name, typ))
    return pa.Table.from_pylist(rows, schema=schema)


class QuestionBuffer:
    """Collects per-sample rows until each question has every sample this run asked for."""

    def __init__(self, needed: dict[str, set[int]]):
        self.needed = needed
        self.rows: dict[str, dict[int, dict]] = {}

    def add(self, batch: pa.Table) -> list[dict]:
        done = []
        for r in batch.select(RATIONALES.names).to_pylist():
            q = r["question_id"]
            self.rows.setdefault(q, {})[r["sample"]] = r
            if set(self.rows[q]) >= self.needed.get(q, set()):
                got = self.rows.pop(q)
                done.extend(got[s] for s in sorted(got))
        return done

    def leftover(self) -> list[dict]:
        out = [r for rows in self.rows.values() for r in rows.values()]
        self.rows.clear()
        return out


GENERATIVE = ("openai", "openai_batch", "vllm", "hf")


def build_todo(cfg: KardConfig, questions: list[dict], expected: dict[str, list[int]],
               existing: dict[tuple[str, int], bool]) -> list[dict]:
    """Question rows with the samples still missing (and, with retry_errors, those recorded as errors)."""
    t = cfg.teacher
    generative = t.backend in GENERATIVE
    few_shot = load_few_shot(t.few_shot_path, cfg.data.dataset, t.n_few_shot) if generative else []
    todo = []
    for q in questions:
        need = [s for s in expected.get(q["id"], [])
                if (q["id"], s) not in existing or (t.retry_errors and existing[(q["id"], s)])]
        if not need:
            continue
        row = {"question_id": q["id"], "question": q["question"], "options": list(q["options"]),
               "answer": int(q["answer"]), "samples": need}
        if generative:
            row["messages_json"] = json.dumps(build_messages(q, q.get("dataset") or cfg.data.dataset, few_shot))
        todo.append(row)
    return todo


def _run_wave(cfg: KardConfig, backend, store: RationaleStore, wave: list[dict], done_before: int,
              n_total: int) -> list[dict]:
    """Generate, score and write the rows of `wave`'s questions; returns the rows written."""
    t = cfg.teacher
    use_verifier = t.verifier_model is not None and t.filter != "none"
    ds = backend.dataset(wave)
    ds = ds.map_batches(score_batch, fn_kwargs=dict(filter=t.filter, verifier=use_verifier),
                        batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if use_verifier:
        from kard_ray.teacher.verifier import VerifierUDF, verifier_stage_kwargs

        ds = ds.map_batches(VerifierUDF, **verifier_stage_kwargs(cfg))
    buf = QuestionBuffer({r["question_id"]: set(r["samples"]) for r in wave})
    out: list[dict] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        done = buf.add(batch)
        if done:
            store.write_part(done)
            out.extend(done)
            written = done_before + len(out)
            progress("teacher", f"[teacher] wrote {written}/{n_total} rows", final=written >= n_total,
                     fraction=written / max(n_total, 1))
    rest = buf.leftover()
    if rest:  # a backend returned fewer rows than asked: keep what exists, report the gap
        _log(f"warning: {len(rest)} rows of incomplete questions written as they are")
        store.write_part(rest)
        out.extend(rest)
    return out


def _run_batch_wave(cfg: KardConfig, backend, store: RationaleStore, wave: list[dict], summary: dict) -> list[dict]:
    """The Batch API backend: rows arrive per finished batch (in the driver), scored and written at once."""
    from kard_ray.teacher.backends.common import to_table

    t = cfg.teacher
    use_verifier = t.verifier_model is not None and t.filter != "none"
    out: list[dict] = []

    def write(gen_rows: list[dict]) -> None:
        if not gen_rows:
            return
        scored = score_batch(to_table(gen_rows), t.filter, use_verifier)
        if use_verifier:
            import ray

            from kard_ray.teacher.verifier import VerifierUDF, verifier_stage_kwargs

            ds = ray.data.from_arrow(scored).map_batches(VerifierUDF, **verifier_stage_kwargs(cfg))
            scored = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
        rows = scored.select(RATIONALES.names).to_pylist()
        store.write_part(rows)
        out.extend(rows)
        _log(f"wrote {len(out)} rows of this wave")

    for k, v in backend.run_batches(wave, write).items():
        summary[k] = summary.get(k, 0) + v if k != "pending" else v
    return out


class Budget:
    """`teacher.max_cost_usd` over the run directory's rows: plans waves of questions that fit."""

    def __init__(self, cfg: KardConfig, todo: list[dict], rows_so_far: list[dict]):
        from kard_ray.teacher.cost import TokenCounter, mean_prompt_tokens, price_for, rows_cost

        t = self.t = cfg.teacher
        self.limit = t.max_cost_usd
        if price_for(t.prices, t.model) is None:
            raise ValueError(f"teacher.max_cost_usd is set but teacher.prices has no price for teacher.model="
                             f"{t.model!r}: add {{input: USD per 1M tokens, output: ...}} for it")
        self.rows = list(rows_so_far)
        self.spent = rows_cost(self.rows, t)
        self.spent_before = self.spent
        self.prompt_tokens = mean_prompt_tokens(todo, TokenCounter.for_config(t))
        self.stopped = False

    def add(self, rows: list[dict]) -> None:
        from kard_ray.teacher.cost import rows_cost

        self.rows.extend(rows)
        self.spent += rows_cost(rows, self.t)

    def plan(self, todo: list[dict]) -> tuple[list[dict], list[dict]]:
        """(the questions whose estimated cost fits what is left, the rest)."""
        from kard_ray.teacher.cost import completion_tokens_per_row, question_cost_estimate, row_cost

        costs = [c for c in (row_cost(r, self.t) for r in self.rows if r.get("error") is None) if c is not None]
        if len(costs) >= 10:  # measured: mean cost of the rows written so far
            per_row = sum(costs) / len(costs)
            estimate = lambda q: per_row * len(q["samples"])  # noqa: E731
        else:
            completion, _ = completion_tokens_per_row(self.t, self.rows)
            estimate = lambda q: question_cost_estimate(self.t, len(q["samples"]), self.prompt_tokens, completion)  # noqa: E731
        left, wave = self.limit - self.spent, []
        for k, q in enumerate(todo):
            c = estimate(q)
            if c > left:
                self.stopped = True
                return wave, todo[k:]
            left -= c
            wave.append(q)
        return wave, []

    def summary(self, todo_left: list[dict]) -> dict:
        return {"max_cost_usd": self.limit, "spent_usd": round(self.spent, 6),
                "spent_this_run_usd": round(self.spent - self.spent_before, 6), "stopped": self.stopped,
                "questions_not_requested": len(todo_left),
                "rows_not_requested": sum(len(q["samples"]) for q in todo_left)}


def generate_rationales(cfg: KardConfig, run: RunDir) -> dict:
    """Write `run.rationales` (parquet parts) and `rationales_stats.json`; return the stats.

    With `teacher.max_cost_usd` the questions go to the backend in waves sized to the budget left
    (estimated from sampled prompts and the assumed completion length, then from the measured cost of
    the rows written); once the next question would pass it, the stage stops with what is written.
    """
    t0 = time.time()
    t = cfg.teacher
    questions = read_train_questions(run)
    store = RationaleStore(run.rationales)
    store.clean_temporaries()
    repaired = store.repair()
    backend = make_backend(cfg, run)
    existing = store.index()
    todo = build_todo(cfg, questions, backend.expected(questions), existing)
    n_todo_rows = sum(len(r["samples"]) for r in todo)
    retried = sum(1 for r in todo for s in r["samples"] if (r["question_id"], s) in existing)
    _log(f"{len(questions)} questions; {len(existing)} rows already written ({retried} with errors to retry); "
         f"{n_todo_rows} rows of {len(todo)} questions to produce with backend={t.backend}")

    budget = None
    if t.max_cost_usd is not None and t.backend in GENERATIVE and todo:
        budget = Budget(cfg, todo, store.read().to_pylist() if existing else [])
    written, waves, batches = 0, 0, {}
    while todo:
        wave, todo = budget.plan(todo) if budget is not None else (todo, [])
        if not wave:
            break
        if hasattr(backend, "run_batches"):
            rows = _run_batch_wave(cfg, backend, store, wave, batches)
        else:
            rows = _run_wave(cfg, backend, store, wave, written, n_todo_rows)
        written += len(rows)
        waves += 1
        if budget is not None:
            budget.add(rows)
            _log(f"budget: ${budget.spent:.4f} of ${budget.limit:.4f} spent after wave {waves}")
    if waves:
        repaired += store.repair()  # drop error rows that retried successes replaced
    if budget is not None and budget.stopped:
        _log(f"budget: teacher.max_cost_usd=${budget.limit:g} reached (${budget.spent:.4f} spent): "
             f"{sum(len(q['samples']) for q in todo)} rows of {len(todo)} questions not requested; "
             "rerun with a higher teacher.max_cost_usd to continue")

    if not store.parts():  # readers of run.rationales get an empty table, not a missing directory
        store.write_empty()
    stats = _final_stats(cfg, store, questions)
    if budget is not None:
        stats["budget"] = budget.summary(todo)
    if batches:
        stats["batches"] = batches
    stats["this_run"] = {"rows_written": written, "rows_skipped": len(existing) - retried,
                         "rows_retried": retried, "rows_repaired": repaired, "waves": waves,
                         "seconds": round(time.time() - t0, 2)}
    io.write_json(run.path("rationales_stats.json"), stats)
    _log_summary(stats)
    return stats


def _log_summary(stats: dict) -> None:
    c = stats["cost"]
    _log(f"{stats['n_rationales']} rationales for {stats['questions_with_rationales']} questions; parse rate "
         f"{stats['parse_rate']:.2%}, agreement {stats['agreement_rate']:.2%}, kept {stats['consistency_rate']:.2%}; "
         f"{stats['questions_without_kept_rationale']} questions without a kept rationale; {stats['errors']} errors")
    if c["priced_rows"]:
        _log(f"cost ${c['total_usd']:.4f}: ${c['per_row_usd']:.6f} per row, "
             + (f"${c['per_kept_rationale_usd']:.6f} per kept rationale, " if c["per_kept_rationale_usd"] else "no kept rationale, ")
             + f"${c['per_question_usd']:.6f} per question "
             f"({stats['prompt_tokens']} prompt + {stats['completion_tokens']} completion tokens)")


def _final_stats(cfg: KardConfig, store: RationaleStore, questions: list[dict]) -> dict:
    from kard_ray.teacher.cost import cost_stats

    t = cfg.teacher
    table = store.read()
    gold = {q["id"]: int(q["answer"]) for q in questions}
    datasets = {q["id"]: q.get("dataset") or cfg.data.dataset for q in questions}
    stats = rationale_stats(table, gold, verifier=t.verifier_model is not None, datasets=datasets)
    stats["backend"] = t.backend
    stats["filter"] = t.filter
    rows = table.select(["question_id", "teacher", "prompt_tokens", "completion_tokens", "error"]).to_pylist()
    stats["cost"] = cost_stats(rows, t, kept=stats["kept"], n_questions=len(questions))
    return stats
