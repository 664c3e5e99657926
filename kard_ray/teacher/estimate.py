"""`kard-ray generate-rationales --estimate`: requests, tokens and dollars of the teacher stage, before
anything is spent.

The to-do list is what a real run would ask for (rows already written are skipped). Prompt tokens are
counted on a sample of the to-do prompts (`teacher.tokenizer`, else the model's tokenizer, else ~4
characters per token); completion tokens are measured on rows already written when there are some,
else assumed (`teacher.estimate_completion_tokens`, default `max_tokens`: an upper bound).
"""

from __future__ import annotations

from kard_ray.config import KardConfig
from kard_ray.io import RunDir
from kard_ray.teacher.backends import make_backend
from kard_ray.teacher.cost import (TokenCounter, completion_tokens_per_row, mean_prompt_tokens, price_factor,
                                   price_for, requests_per_question, rows_cost, usd)
from kard_ray.teacher.generate import GENERATIVE, build_todo, read_train_questions
from kard_ray.teacher.store import RationaleStore


def estimate_rationales(cfg: KardConfig, run: RunDir, sample: int = 200) -> dict:
    """The estimate as a dict (see `format_estimate`)."""
    t = cfg.teacher
    questions = read_train_questions(run)
    store = RationaleStore(run.rationales)
    existing = store.index()
    written = store.read().to_pylist() if existing else []
    todo = build_todo(cfg, questions, make_backend(cfg, run).expected(questions), existing)
    rows = sum(len(q["samples"]) for q in todo)
    est = {"backend": t.backend, "model": t.model, "questions": len(questions), "questions_to_do": len(todo),
           "rows_to_do": rows, "rows_written": len(existing), "spent_usd": round(rows_cost(written, t), 6),
           "max_cost_usd": t.max_cost_usd}
    if t.backend not in GENERATIVE:
        return {**est, "requests": 0, "cost_usd": 0.0}
    counter = TokenCounter.for_config(t)
    per_request = mean_prompt_tokens(todo, counter, sample=sample)
    requests = sum(requests_per_question(t.backend, len(q["samples"])) for q in todo)
    completion, basis = completion_tokens_per_row(t, written)
    price = price_for(t.prices, t.model)
    factor = price_factor(t)
    est.update(requests=requests, prompt_tokens_per_request=round(per_request, 1),
               prompts_sampled=min(sample, len(todo)), token_counting=counter.method,
               prompt_tokens=round(requests * per_request), completion_tokens_per_row=round(completion, 1),
               completion_basis=basis, completion_tokens=round(rows * completion), price=price,
               price_factor=factor)
    if price is not None:
        est["input_usd"] = round(usd(est["prompt_tokens"], 0, price, factor), 6)
        est["output_usd"] = round(usd(0, est["completion_tokens"], price, factor), 6)
        est["cost_usd"] = round(est["input_usd"] + est["output_usd"], 6)
    else:
        est["cost_usd"] = None
    if t.max_cost_usd is not None and est["cost_usd"] is not None:
        est["fits_budget"] = est["spent_usd"] + est["cost_usd"] <= t.max_cost_usd
    return est


def format_estimate(est: dict) -> str:
    """A few lines for the terminal."""
    head = (f"teacher estimate: backend={est['backend']} model={est['model']}\n"
            f"  questions      {est['questions_to_do']:,} of {est['questions']:,} to do "
            f"({est['rows_to_do']:,} rationales; {est['rows_written']:,} already written)")
    if est["requests"] == 0:
        return head + f"\n  requests       0 (backend={est['backend']} reads existing rationales: nothing to pay)"
    lines = [head,
             f"  requests       {est['requests']:,}",
             f"  prompt tokens  {est['prompt_tokens']:,} ({est['prompt_tokens_per_request']:,} per request: mean of "
             f"{est['prompts_sampled']} sampled prompts, {est['token_counting']})",
             f"  output tokens  {est['completion_tokens']:,} ({est['completion_tokens_per_row']:,} per rationale, "
             f"{est['completion_basis']})"]
    if est["cost_usd"] is None:
        lines.append(f"  cost           unknown: teacher.prices has no price for {est['model']!r}")
    else:
        p = est["price"]
        factor = f" x {est['price_factor']:g} (Batch API)" if est["price_factor"] != 1 else ""
        lines.append(f"  cost           ${est['cost_usd']:,.4f} = ${est['input_usd']:,.4f} input + "
                     f"${est['output_usd']:,.4f} output (${p['input']:g} / ${p['output']:g} per 1M tokens{factor})")
    if est["max_cost_usd"] is not None:
        verdict = ("fits" if est.get("fits_budget") else "does NOT fit: the stage will stop when it is reached"
                   if est.get("fits_budget") is not None else "cannot be checked without a price")
        lines.append(f"  budget         teacher.max_cost_usd=${est['max_cost_usd']:g}, ${est['spent_usd']:,.4f} already "
                     f"spent: {verdict}")
    return "\n".join(lines)


def print_estimate(cfg: KardConfig) -> dict:
    """Print the estimate for `cfg`'s run directory (its questions stage must have run)."""
    from kard_ray.config import resolve_local_paths

    cfg = resolve_local_paths(cfg)
    est = estimate_rationales(cfg, RunDir(cfg.run_dir))
    print(format_estimate(est), flush=True)
    return est
