"""Tokens and dollars: counting tokens where an API reports none, pricing rows, estimating a run.

    counter = TokenCounter.for_config(cfg.teacher)        # the model's tokenizer, else ~4 chars/token
    counter.count_messages(messages)                      # prompt tokens of a chat request
    price = price_for(cfg.teacher.prices, "gpt-3.5-turbo-0301")   # -> {"input": 0.5, "output": 1.5}
    cost_stats(rows, cfg.teacher, ...)                    # the stats' "cost" section

Prices are USD per million tokens (`teacher.prices`); a row is priced by the model that wrote it
(its `teacher` column: the served model name), falling back to `teacher.model`. Rows made with the
Batch API are billed at `teacher.batch_price_factor` (half price).
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Optional

# OpenAI documents ~3 tokens of framing per chat message plus 3 priming the reply; a tokenizer
# without a chat template counts the contents and adds these.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_REPLY = 3
_CHARS_PER_TOKEN = 4.0
# Names of hosted API models: no HF tokenizer to look for (the hub lookup would only retry and fail).
_API_MODEL = re.compile(r"^(?:gpt-|o\d|chatgpt|text-|davinci|babbage|claude|gemini)", re.IGNORECASE)


class TokenCounter:
    """Counts tokens with an HF tokenizer (name or path) or, failing that, ~4 characters per token."""

    def __init__(self, name_or_path: Optional[str]):
        self.name = name_or_path
        self.tok = None
        self.method = f"~{_CHARS_PER_TOKEN:g} characters per token"
        if name_or_path and not _API_MODEL.match(name_or_path):
            try:
                from transformers import AutoTokenizer

                self.tok = AutoTokenizer.from_pretrained(name_or_path)
                self.method = f"tokenizer {name_or_path}"
            except Exception:  # an API model name (gpt-4o-mini) or no hub access: the heuristic
                self.tok = None

    @classmethod
    def for_config(cls, t) -> "TokenCounter":
        return cls(t.tokenizer or t.model)

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        if self.tok is None:
            return max(1, math.ceil(len(text) / _CHARS_PER_TOKEN))
        return len(self.tok.encode(text, add_special_tokens=False))

    def count_messages(self, messages: list[dict]) -> int:
        if self.tok is not None and getattr(self.tok, "chat_template", None):
            try:
                ids = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
                return len(ids["input_ids"] if isinstance(ids, dict) else ids)
            except Exception:  # a template that rejects e.g. the system role: count the contents
                pass
        return sum(self.count_text(m.get("content") or "") + _TOKENS_PER_MESSAGE for m in messages) + _TOKENS_PER_REPLY


def price_for(prices: dict, model: Optional[str]) -> Optional[dict]:
    """{input, output} USD per 1M tokens for `model`: exact key, else the longest key it starts with."""
    if not model:
        return None
    if model in prices:
        return prices[model]
    keys = [k for k in prices if model.startswith(k)]
    return prices[max(keys, key=len)] if keys else None


def usd(prompt_tokens: Optional[int], completion_tokens: Optional[int], price: Optional[dict],
        factor: float = 1.0) -> Optional[float]:
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6 * factor


def price_factor(t) -> float:
    return t.batch_price_factor if t.backend == "openai_batch" else 1.0


def row_cost(row: dict, t) -> Optional[float]:
    """USD of one rationale row (None when its tokens or its model's price are unknown)."""
    price = price_for(t.prices, row.get("teacher")) or price_for(t.prices, t.model)
    return usd(row.get("prompt_tokens"), row.get("completion_tokens"), price, price_factor(t))


def rows_cost(rows: list[dict], t) -> float:
    return sum(c for c in (row_cost(r, t) for r in rows) if c is not None)


def cost_stats(rows: list[dict], t, kept: int, n_questions: int) -> dict:
    """The stats' "cost" section over every written row (errors included: their tokens are billed)."""
    costs = [row_cost(r, t) for r in rows]
    priced = [c for c in costs if c is not None]
    total = sum(priced)
    ok = [r for r in rows if r.get("error") is None]
    return {
        "currency": "USD",
        "total_usd": round(total, 6),
        "per_row_usd": round(total / len(priced), 8) if priced else None,
        "per_kept_rationale_usd": round(total / kept, 8) if kept and priced else None,
        "per_question_usd": round(total / n_questions, 8) if n_questions and priced else None,
        "priced_rows": len(priced),
        "unpriced_rows": len(costs) - len(priced),
        "models": sorted({r.get("teacher") or t.model for r in rows if r.get("teacher") or t.model}),
        "price_factor": price_factor(t),
        "mean_completion_tokens": (round(sum(r["completion_tokens"] for r in ok if r.get("completion_tokens") is not None)
                                         / max(1, sum(1 for r in ok if r.get("completion_tokens") is not None)), 1)
                                   if ok else None),
    }


# ----------------------------------------------------------------------------------------------
# estimates (before spending)


def requests_per_question(backend: str, n_samples: int) -> int:
    """The live API asks for every sample of a question in one request (n); the Batch API sends one
    request per (question, sample), each billed its prompt."""
    return n_samples if backend == "openai_batch" else 1


def mean_prompt_tokens(todo: list[dict], counter: TokenCounter, sample: int = 200, seed: int = 0) -> float:
    """Mean prompt tokens over a random sample of the to-do questions' chat prompts."""
    if not todo:
        return 0.0
    rows = todo if len(todo) <= sample else random.Random(seed).sample(todo, sample)
    return sum(counter.count_messages(json.loads(r["messages_json"])) for r in rows) / len(rows)


def completion_tokens_per_row(t, measured: list[dict]) -> tuple[float, str]:
    """Completion tokens assumed per rationale: measured on rows already written, else configured."""
    got = [r["completion_tokens"] for r in measured if r.get("error") is None and r.get("completion_tokens")]
    if len(got) >= 10:
        return sum(got) / len(got), f"measured on {len(got)} rows already written"
    if t.estimate_completion_tokens is not None:
        return float(t.estimate_completion_tokens), "assumed (teacher.estimate_completion_tokens)"
    return float(t.max_tokens), "assumed = teacher.max_tokens (the most a row can cost)"


def question_cost_estimate(t, n_rows: int, prompt_tokens: float, completion_tokens: float) -> Optional[float]:
    """Estimated USD for one question needing `n_rows` samples (None without a price for the model)."""
    requests = n_rows if t.backend == "openai_batch" else 1
    return usd(requests * prompt_tokens, n_rows * completion_tokens, price_for(t.prices, t.model), price_factor(t))
