"""`openai` backend: any OpenAI-compatible chat-completions endpoint, as a Ray Data actor stage.

Why not `ray.data.llm.HttpRequestProcessorConfig` (read in ray 2.60's http_request_stage.py): it
retries 408/429/502/503/504 but not 500; its `qps` is an int (no 0.5 rps) paced per batch from the
batch's start, not across the stage; it fires a batch's requests without a concurrency bound; a
row that exhausts its retries raises RuntimeError, failing the whole dataset instead of recording
the row; and the key would sit in the config's `headers`, a pydantic model that is printed in reprs.

Here each actor (an async UDF: Ray Data runs several of its batches at once) owns an
httpx.AsyncClient, a semaphore (requests in flight) and a token bucket (requests per second), the
stage's budgets divided by the number of actors. Every request is retried on 429, 408, 409, 425,
5xx, timeouts and connection errors with exponential backoff and jitter (honouring Retry-After);
a question that still fails becomes rows carrying the error.

The API key is read once in the driver from the environment variable named in the config and
handed to the actors wrapped in `Secret`, whose repr is masked: it never appears in logs, rows,
error messages or files.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from typing import Optional

import pyarrow as pa

from kard_ray.teacher.backends.common import gen_row, messages_of, to_table

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx


class Secret:
    """A string that never shows itself in repr/str (logs, tracebacks, Ray's task descriptions)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(****)"

    __str__ = __repr__


def read_api_key(env_name: Optional[str]) -> Optional[Secret]:
    """The key from `env_name`; None when no variable is configured; a clear error when it is unset."""
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ValueError(f"teacher.openai.api_key_env: environment variable {env_name!r} is not set "
                         "(set it, or set teacher.openai.api_key_env: null for an endpoint without a key)")
    return Secret(value)


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts of at most `capacity`."""

    def __init__(self, rate: float, capacity: float = 1.0):
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock: Optional[asyncio.Lock] = None

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one waiter at a time keeps the spacing even
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


def backoff_delay(attempt: int, base: float, retry_after: Optional[float], cap: float = 60.0) -> float:
    """Exponential backoff with jitter (base * 2^attempt * U[0.5, 1]); at least Retry-After."""
    delay = base * (2 ** attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def _retry_after(headers) -> Optional[float]:
    v = headers.get("retry-after")
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


class OpenAIChatUDF:
    """Ray Data actor: question rows -> one row per requested sample."""

    def __init__(self, base_url: str, model: str, api_key: Optional[Secret], requests_per_second: float,
                 max_concurrency: int, max_retries: int, backoff_s: float, timeout_s: float,
                 temperature: float, max_tokens: int, max_topups: int = 3, tokenizer: Optional[str] = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = api_key
        self.rps = requests_per_second
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_topups = max_topups
        self.tokenizer = tokenizer
        self._counter = None
        self.bucket = TokenBucket(requests_per_second)
        self._client = None
        self._sem: Optional[asyncio.Semaphore] = None
        self.requests_sent = 0

    # -- plumbing ----------------------------------------------------------------------------
    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self._key is not None:
            h["Authorization"] = f"Bearer {self._key.get()}"
        return h

    def _redact(self, msg: str) -> str:
        if self._key is not None and self._key.get():
            msg = msg.replace(self._key.get(), "****")
        return msg

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """An async UDF: Ray Data runs several batches of one actor concurrently on its event loop,
        so a batch waiting on a slow or retried request does not idle the actor; the semaphore and
        the token bucket are shared by all of them."""
        import httpx

        if self._client is None:  # created inside the actor's loop, reused across batches
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, limits=limits)
            self._sem = asyncio.Semaphore(self.max_concurrency)
        results = await asyncio.gather(*(self._question(r) for r in batch.to_pylist()))
        return to_table([row for rs in results for row in rs])

    # -- one question ------------------------------------------------------------------------
    async def _question(self, q: dict) -> list[dict]:
        samples = list(q["samples"])
        messages = messages_of(q)
        texts: list[str] = []
        completion: list[Optional[int]] = []
        prompt_tokens: list[Optional[int]] = []
        teacher, error = self.model, None
        # One request asks for every missing sample (n); a server that returns fewer choices gets
        # follow-up requests for the rest.
        for _ in range(1 + self.max_topups):
            want = len(samples) - len(texts)
            if want <= 0:
                break
            body, error = await self._request({"model": self.model, "messages": messages, "n": want,
                                               "temperature": self.temperature, "max_tokens": self.max_tokens})
            if error is not None:
                break
            choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))[:want]
            got = [((c.get("message") or {}).get("content") or "") for c in choices]
            if not got:
                error = "the response held no choices"
                break
            pt, cts = self._usage(body, messages, got)
            n = len(got)
            # Prompt tokens are billed once per request: charged to its first sample.
            prompt_tokens += [pt if k == 0 else 0 for k in range(n)]
            completion += cts
            texts += got
            teacher = body.get("model") or self.model
        out = []
        for k, s in enumerate(samples):
            if k < len(texts):
                out.append(gen_row(q, s, texts[k], teacher, prompt_tokens[k], completion[k]))
            else:
                out.append(gen_row(q, s, "", teacher, error=error or "the server returned fewer choices than requested"))
        return out

    def _usage(self, body: dict, messages: list[dict], texts: list[str]) -> tuple[int, list[int]]:
        """(prompt tokens, completion tokens per choice) from the response's `usage`; counted with the
        tokenizer (teacher.tokenizer / the model's, else ~4 characters a token) where it is absent."""
        usage = body.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if (not isinstance(pt, int) or not isinstance(ct, int)) and self._counter is None:
            from kard_ray.teacher.cost import TokenCounter

            self._counter = TokenCounter(self.tokenizer)
        if not isinstance(pt, int):
            pt = self._counter.count_messages(messages)
        if not isinstance(ct, int):
            return pt, [self._counter.count_text(x) for x in texts]
        base, rest = divmod(ct, len(texts))
        return pt, [base + (1 if k < rest else 0) for k in range(len(texts))]

    async def _request(self, payload: dict) -> tuple[Optional[dict], Optional[str]]:
        """POST with retries; (json body, None) or (None, error message)."""
        import httpx

        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            await self.bucket.acquire()
            async with self._sem:
                self.requests_sent += 1
                try:
                    resp = await self._client.post(self.url, json=payload, headers=self._headers())
                except httpx.TimeoutException:
                    last, retryable = f"timeout after {self.timeout_s:g}s", True
                except httpx.TransportError as e:
                    last, retryable = self._redact(f"{type(e).__name__}: {e}"), True
                else:
                    code = resp.status_code
                    if code == 200:
                        try:
                            return resp.json(), None
                        except ValueError:
                            last, retryable = "HTTP 200 with a body that is not JSON", True
                    else:
                        last = self._redact(f"HTTP {code}: {resp.text[:300]}")
                        retryable = code in RETRYABLE_STATUS or code >= 500
                        retry_after = _retry_after(resp.headers)
            if not retryable:
                return None, last
            if attempt < self.max_retries:
                await asyncio.sleep(backoff_delay(attempt, self.backoff_s, retry_after))
        return None, f"{last} (gave up after {self.max_retries + 1} attempts)"


def openai_stage_kwargs(cfg) -> dict:
    """map_batches kwargs for the client actor pool (budgets split across actors)."""
    import ray

    o = cfg.teacher.openai
    api_key = read_api_key(o.api_key_env)
    per_actor = max(1, o.max_concurrency // o.num_actors)
    # Batches in flight per actor: enough that the semaphore, not a straggling batch, is the limit.
    calls = max(2, 2 * math.ceil(per_actor / o.batch_size))
    return dict(
        fn_constructor_kwargs=dict(
            base_url=o.base_url, model=cfg.teacher.model, api_key=api_key,
            requests_per_second=o.requests_per_second / o.num_actors,
            max_concurrency=per_actor, max_retries=o.max_retries,
            backoff_s=o.backoff_s, timeout_s=o.timeout_s, temperature=cfg.teacher.temperature,
            max_tokens=cfg.teacher.max_tokens, tokenizer=cfg.teacher.tokenizer or cfg.teacher.model),
        compute=ray.data.ActorPoolStrategy(size=o.num_actors, max_concurrent_calls_per_actor=calls,
                                           max_tasks_in_flight_per_actor=calls),
        batch_size=o.batch_size, batch_format="pyarrow", num_cpus=o.num_cpus_per_actor,
    )
