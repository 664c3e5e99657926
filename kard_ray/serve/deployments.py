"""The four Serve deployments: Retriever → Reranker → Generator, orchestrated by the HTTP Ingress.

Each model deployment wraps the *same* object offline evaluation uses (`knowledge.Retriever`,
`inference.reranker.Reranker`, `inference.generator.StudentGenerator`), loaded once per replica; so, with
greedy decoding, a served answer equals the evaluation stage's prediction for the same question.

Blocking model work runs in a worker thread (`asyncio.to_thread`) so a replica's event loop keeps
answering health checks and filling the next batch while the model runs. One model call at a time
per replica (a lock, or the batcher's single in-flight batch): a fast tokenizer shared by two
threads fails with "Already borrowed" (huggingface/tokenizers#537), and a fractional-CPU replica
gains nothing from running two calls at once; more throughput comes from more replicas.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Optional

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from kard_ray.config import KardConfig
from kard_ray.inference.batching import DynamicBatcher
from kard_ray.inference.formats import generation_rationale, question_query, top_k
from kard_ray.methods import METHODS
from kard_ray.serve.api import Limits, answer_fields
from kard_ray.serve.http import Gate, Overloaded, RequestTimeout, ServiceError, build_api, request_id

log = logging.getLogger("kard_ray.serve")


def _device() -> str:
    """cuda when Ray gave this replica a GPU (`ray_actor_options.num_gpus`), else cpu."""
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def _locked(lock: threading.Lock, fn, *args):
    with lock:
        return fn(*args)


def _passage_text(p: dict) -> str:
    from kard_ray.knowledge import format_passage

    return format_passage(p.get("title"), p["text"])


def _replicas_and_bounds(dc) -> tuple[int, int, int]:
    """(max_ongoing_requests, replicas: the autoscaling max, else the fixed count, max_queued_requests) of a
    Serve `DeploymentConfig`."""
    replicas = dc.autoscaling_config.max_replicas if dc.autoscaling_config else dc.num_replicas
    return dc.max_ongoing_requests, replicas, dc.max_queued_requests


def _deployed_admission(limits):
    """The gates' limits from this Ingress deployment's options as Serve applied them (a Serve config may
    override the code's replicas and bounds). `_deployment_config` is private in Ray 2.60 (pinned)."""
    return limits.as_deployed(*_replicas_and_bounds(serve.get_replica_context()._deployment_config))


class RouteMetrics:
    """Per-route Prometheus metrics of an Ingress replica, through `ray.serve.metrics` (Ray exports them on
    each node's metrics port, tagged with the application, deployment and replica, beside Serve's own
    `ray_serve_*` metrics): requests by route and status code, and a latency histogram."""

    BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("kard_http_requests", description="HTTP requests the KARD Ingress answered.",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram("kard_http_request_latency_ms",
                                         description="Time from the request entering the Ingress to its last byte.",
                                         boundaries=self.BOUNDARIES_MS, tag_keys=("route", "status"))

    def observe(self, route: str, status: int, seconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe(1000.0 * seconds, tags=tags)


@serve.deployment(name="Retriever")
class Retriever:
    """BM25 / dense / hybrid retrieval over `<run>/index` (`knowledge.retriever` picks which)."""

    def __init__(self, run_dir: str, cfg: KardConfig):
        from kard_ray.knowledge import Retriever as KnowledgeRetriever

        t0 = time.time()
        self.retriever = KnowledgeRetriever.from_run_dir(run_dir, cfg.knowledge, num_threads=1)
        self.mode = cfg.knowledge.retriever
        self.lock = threading.Lock()  # held by the worker thread, even when its request was cancelled
        log.info("Retriever: %d passages (%s) loaded in %.1fs", len(self.retriever), self.mode, time.time() - t0)

    async def search(self, query: str, k: int) -> list[dict]:
        """[{id, title, text, score}] best first, at most k."""
        hits = await asyncio.to_thread(_locked, self.lock, self.retriever.search, [query], k)
        return hits[0]

    async def info(self) -> dict:
        return {"passages": len(self.retriever), "retriever": self.mode}

    async def check_health(self) -> None:
        if len(self.retriever) == 0:
            raise RuntimeError("the passage index is empty")


@serve.deployment(name="Reranker")
class Reranker:
    """The distilled reranker: scores BM25 candidates for a question, keeps the top k.

    Bound in every application (so one Serve config fits every run directory); when the run has no
    reranker (`model_dir=None`) it loads nothing and is never called.
    """

    def __init__(self, model_dir: Optional[str], cfg: KardConfig):
        self.model_dir = model_dir
        self.reranker = None
        self.lock = threading.Lock()  # held by the worker thread, even when its request was cancelled
        if model_dir is not None:
            from kard_ray.inference.reranker import Reranker as TrainedReranker

            self.reranker = TrainedReranker.from_dir(model_dir, max_length=cfg.reranker.max_length, device=_device(),
                                                    cpu_bf16=cfg.reranker.cpu_bf16)

    async def rerank(self, query: str, candidates: list[dict], k: int) -> list[dict]:
        """The top-k candidates by reranker score (their `score` replaced by it), best first."""
        if self.reranker is None:
            raise RuntimeError("this application serves a run without a reranker")
        scores = await asyncio.to_thread(_locked, self.lock, self.reranker.rerank, query,
                                         [_passage_text(p) for p in candidates], [p["score"] for p in candidates])
        return [{**candidates[i], "score": float(scores[i])} for i in top_k(scores, k)]

    async def score(self, query: str, texts: list[str]) -> list[float]:
        """Reranker scores of `texts` for `query` (POST /v1/rerank), in the given order. The documents come
        without retrieval scores: a bi-encoder with a retrieval weight scores them by its cosine alone."""
        if self.reranker is None:
            raise RuntimeError("this application serves a run without a reranker")
        scores = await asyncio.to_thread(_locked, self.lock, self.reranker.rerank, query, list(texts))
        return [float(x) for x in scores]

    async def info(self) -> dict:
        return {"reranker": self.model_dir is not None}

    async def check_health(self) -> None:
        if self.model_dir is not None and self.reranker is None:  # pragma: no cover - defensive
            raise RuntimeError("reranker not loaded")


@serve.deployment(name="Generator")
class Generator:
    """The student, with dynamic batching: concurrent requests share one `generate()` call."""

    def __init__(self, model_dir: str, cfg: KardConfig):
        from kard_ray.inference.generator import StudentGenerator

        t0 = time.time()
        e = cfg.eval
        device = _device()
        self.model_dir = model_dir
        # eval.engine: vllm on a GPU replica: vLLM's async engine generates, with the evaluation's requests and
        # reading (no HF student is loaded); anywhere else the HF student does
        self.student, self.vllm = None, None
        if e.engine == "vllm" and device == "cuda":
            from kard_ray.inference.vllm_engine import VllmStudent

            self.vllm = VllmStudent(model_dir, cfg.data.dataset, cfg.to_dict()["eval"],
                                    cfg.student.max_source_length, cfg.seed)
        else:
            if e.engine == "vllm":
                log.warning("Generator: eval.engine is vllm but this replica has no GPU; generating with HF")
            # The evaluation stage's exact settings: same formatting, decoding and answer reading.
            self.student = StudentGenerator(
                model_dir, cfg.data.dataset, max_new_tokens=e.max_new_tokens, decoding=e.decoding, n_votes=e.n_votes,
                temperature=e.temperature, max_source_length=cfg.student.max_source_length, score_by=e.score_by,
                seed=cfg.seed, device=device)
        self.lock = threading.Lock()  # a cancelled batch's thread may still be generating
        self.batcher = DynamicBatcher(self._generate, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)
        self.streamed = 0  # /v1/chat/completions streams: one generate() each, outside the batcher
        log.info("Generator: student %s loaded in %.1fs", model_dir, time.time() - t0)

    def _usage(self, question: str, options: list[str], passages: list[str], generation: str, truncated: bool) -> dict:
        """OpenAI-style token counts of one prediction (call with the lock held: the tokenizer is shared)."""
        source = self.student.source(question, options, passages)
        prompt = len(self.student.encode([source])[0])  # as the student reads it (a causal one: its prompt)
        completion = len(self.student.tokenizer(generation, add_special_tokens=True)["input_ids"])
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "finish_reason": "length" if truncated else "stop"}

    def _predict_items(self, items: list[tuple]) -> list[dict]:
        """(question, options, passages, usage?) items -> {generation, pred_index[, usage]} (lock held)."""
        preds = self.student.predict([it[0] for it in items], [list(it[1]) for it in items],
                                     [list(it[2]) for it in items])
        out = []
        for it, p in zip(items, preds):
            row = {"generation": p.generation, "pred_index": int(p.pred_index)}
            if len(it) > 3 and it[3]:
                row["usage"] = self._usage(it[0], list(it[1]), list(it[2]), p.generation, p.truncated)
            out.append(row)
        return out

    async def _generate(self, items: list[tuple]) -> list[dict]:
        """items: (question, options, passage strings[, usage]) -> {generation, pred_index[, usage]}, one per item."""
        if self.vllm is not None:
            return await self.vllm.predict_items(items)
        return await asyncio.to_thread(_locked, self.lock, self._predict_items, items)

    async def predict_one(self, item: tuple, behind: int) -> dict:
        """One prediction through the batcher (`kard_ray.inference.batching`). `behind`: the other requests its
        Ingress replica still has in retrieval or reranking. With none behind it, the batch this request is in
        closes at once instead of holding `serve.batch_wait_timeout_s` for company that is not on its way (a lone
        user does not pay the window); a batch formed while the generator was busy goes at once."""
        return await self.batcher.submit(item, behind)

    def _predict_streaming(self, item: tuple, streamer) -> dict:
        """One prediction through `StudentGenerator.predict` with `streamer` handed to `model.generate`.

        The same call as the batch path (same formatting, truncation, decoding and answer reading), so
        the streamed generation is the one /v1/answer returns; only the model's `generate` gets the
        streamer, for the duration of this call (the lock is held: no other call sees it).
        """
        model = self.student.model
        plain = model.generate
        model.generate = lambda *a, **kw: plain(*a, **kw, streamer=streamer)
        try:
            return self._predict_items([item])[0]
        finally:
            del model.generate  # the class's method again

    async def stream(self, question: str, options: list[str], passages: list[str]):
        """{"text": piece}... as the student writes, then {"answer": {generation, pred_index, usage}}."""
        item = (question, list(options), list(passages), True)
        if self.vllm is not None:
            async for ev in self.vllm.stream(question, list(options), list(passages)):
                yield ev
            self.streamed += 1
            return
        if self.student.n_votes > 1:  # the answer is a vote over several samples: nothing to stream token by token
            row = (await asyncio.to_thread(_locked, self.lock, self._predict_items, [item]))[0]
            yield {"text": row["generation"]}
            yield {"answer": row}
            return
        from transformers import AsyncTextIteratorStreamer

        # skip_prompt: generate() first hands the streamer its input -- a causal student's whole prompt (a
        # seq2seq one's decoder start token)
        streamer = AsyncTextIteratorStreamer(self.student.tokenizer, skip_prompt=True, skip_special_tokens=True)
        done = asyncio.ensure_future(asyncio.to_thread(_locked, self.lock, self._predict_streaming, item, streamer))
        pieces = streamer.__aiter__()
        try:
            while True:
                nxt = asyncio.ensure_future(pieces.__anext__())
                if not done.done():
                    await asyncio.wait({nxt, done}, return_when=asyncio.FIRST_COMPLETED)
                if done.done() and done.exception() is not None:
                    nxt.cancel()
                    raise done.exception()
                try:
                    piece = await nxt
                except StopAsyncIteration:
                    break
                if piece:
                    yield {"text": piece}
            yield {"answer": await done}
        finally:
            self.streamed += 1

    async def info(self) -> dict:
        batches, items = self.batcher.batches + self.streamed, self.batcher.items + self.streamed
        return {"student": self.model_dir, "batches": batches,
                "mean_batch_size": round(items / batches, 2) if batches else None}

    async def check_health(self) -> None:
        if self.vllm is None and self.student.model is None:  # pragma: no cover - defensive
            raise RuntimeError("student not loaded")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validates requests and runs Retriever → (Reranker) → Generator, one call after another.

    Calls are awaited in sequence, each under what is left of the request's time budget
    (`asyncio.wait_for`): chained responses awaited out of order can deadlock (ray#54201), and a
    saturated router retries forever without a deadline.
    """

    def __init__(self, retriever, reranker, generator, settings: dict):
        if settings.get("calls_by_value"):  # serve.calls_by_value: gRPC between replicas, no object refs
            retriever, reranker, generator = (h.options(_by_reference=False) for h in (retriever, reranker, generator))
        self.retriever, self.reranker, self.generator = retriever, reranker, generator
        self.method: str = settings["method"]
        self.default_k: int = settings["k"]
        self.default_candidates: int = settings["k_star"]
        self.limits: Limits = settings["limits"]
        self.retry_after_s: float = settings.get("retry_after_s", 1.0)
        self.gate = Gate(self.retry_after_s)
        self.upstream = 0  # /v1/answer requests of this replica in retrieval or reranking (the generator's batch window)
        self.metrics = RouteMetrics()
        if settings.get("admission") is not None:  # this application's capacity, for the HTTP proxies' gates
            from kard_ray.serve.proxy import publish_limits

            publish_limits(_deployed_admission(settings["admission"]))

    def __serve_build_asgi_app__(self):
        # Built at replica start, so the request models carry this run's configured limits.
        return build_api(self, self.limits, gate=self.gate, metrics=self.metrics)

    async def drain(self) -> tuple[str, int]:
        """From now on refuse new model requests (503 draining; /readyz 503).
        Returns (this replica's id, the model requests it still has in progress)."""
        self.gate.draining = True
        return serve.get_replica_context().replica_id.unique_id, self.gate.in_flight

    # -- calling the model deployments ----------------------------------------------------------
    async def _call(self, response, deadline: float, stage: str) -> Any:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(response, remaining)
        except asyncio.TimeoutError:
            if hasattr(response, "cancel"):
                response.cancel()  # free the downstream replica; nobody will read this result
            raise RequestTimeout(self.limits.request_timeout_s, stage) from None
        except BackPressureError:
            # The deployment's bounded queue is full: refuse now rather than wait (503 + Retry-After).
            raise Overloaded(f"the {stage} step is over capacity; retry after {self.retry_after_s:g} s",
                             self.retry_after_s) from None
        except (RayActorError, DeploymentUnavailableError) as e:
            # A replica died mid-request or none is left: the client may retry; it is not a bug.
            log.warning("request %s: %s unavailable: %r", request_id(), stage, e)
            raise ServiceError(503, "unavailable", f"the {stage} step is unavailable; retry later") from None

    async def _passages(self, question: str, options: list[str], k: Optional[int], candidates: Optional[int],
                        deadline: float, timings: dict) -> tuple[str, list[dict]]:
        """The passages the student gets: the method table's recipe, as offline evaluation runs it
        (`kard_ray.inference.passages.passages_for`), one deployment call per step."""
        query = question_query(question, options)
        k = k or self.default_k
        t0 = time.monotonic()
        if METHODS[self.method].rerank:
            n = candidates or METHODS[self.method].retrieve_depth(k, self.default_candidates)
            found = await self._call(self.retriever.search.remote(query, n), deadline, "retrieve")
            timings["retrieve"] = 1000 * (time.monotonic() - t0)
            t1 = time.monotonic()
            passages = await self._call(self.reranker.rerank.remote(query, found, k), deadline, "rerank")
            timings["rerank"] = 1000 * (time.monotonic() - t1)
        else:
            passages = await self._call(self.retriever.search.remote(query, k), deadline, "retrieve")
            timings["retrieve"] = 1000 * (time.monotonic() - t0)
        return query, passages

    # -- the service interface of http.build_api ------------------------------------------------
    def _answer_body(self, req, pred: dict, passages: list[dict], timings: dict) -> dict:
        body = {
            **answer_fields(pred["pred_index"], list(req.options)),
            "rationale": generation_rationale(pred["generation"]),
            "generation": pred["generation"],
            "method": self.method,
            "passages": passages if req.return_passages else [],
            "timings_ms": {k: (None if v is None else round(v, 3)) for k, v in timings.items()},
        }
        if "usage" in pred:
            body["usage"] = pred["usage"]
        return body

    async def answer(self, req, usage: bool = False) -> dict:
        """An AnswerResponse body; `usage` adds token counts (the chat completion's `usage`)."""
        deadline = time.monotonic() + self.limits.request_timeout_s
        timings: dict = {"rerank": None, "generate": None}
        self.upstream += 1  # this request is before the generator: a batch opened now may wait for it
        try:
            _, passages = await self._passages(req.question, req.options, req.k, req.candidates, deadline, timings)
        finally:
            self.upstream -= 1
        t0 = time.monotonic()
        item = (req.question, list(req.options), [_passage_text(p) for p in passages]) + ((True,) if usage else ())
        pred = await self._call(self.generator.predict_one.remote(item, self.upstream), deadline, "generate")
        timings["generate"] = 1000 * (time.monotonic() - t0)
        body = self._answer_body(req, pred, passages, timings)
        return body

    async def answer_stream(self, req):
        """Events of one answer as the student writes it: {"passages"}, then {"text"} pieces, then
        {"answer": the AnswerResponse body (with usage)}; a streaming call to the Generator."""
        deadline = time.monotonic() + self.limits.request_timeout_s
        timings: dict = {"rerank": None, "generate": None}
        _, passages = await self._passages(req.question, req.options, req.k, req.candidates, deadline, timings)
        yield {"passages": passages}
        t0 = time.monotonic()
        gen = self.generator.options(stream=True).stream.remote(
            req.question, list(req.options), [_passage_text(p) for p in passages])
        while True:
            try:
                ev = await self._call(gen.__anext__(), deadline, "generate")
            except StopAsyncIteration:
                break
            except RequestTimeout:
                gen.cancel()
                raise
            if "answer" in ev:
                timings["generate"] = 1000 * (time.monotonic() - t0)
                yield {"answer": self._answer_body(req, ev["answer"], passages, timings)}
            else:
                yield ev

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        """POST /v1/rerank: the distilled reranker's scores; 404 when the run has none."""
        if not METHODS[self.method].rerank:
            raise ServiceError(404, "not_found", f"this service ({self.method}) has no reranker")
        deadline = time.monotonic() + self.limits.request_timeout_s
        return await self._call(self.reranker.score.remote(query, list(texts)), deadline, "rerank")

    async def retrieve(self, req) -> dict:
        deadline = time.monotonic() + self.limits.request_timeout_s
        timings: dict = {"rerank": None, "generate": None}
        query, passages = await self._passages(req.question, req.options, req.k, req.candidates, deadline, timings)
        return {"method": self.method, "query": query, "passages": passages,
                "timings_ms": {k: (None if v is None else round(v, 3)) for k, v in timings.items()}}

    async def ready(self) -> dict:
        """Every model deployment answers `info` within the budget, else 503."""
        deadline = time.monotonic() + min(self.limits.request_timeout_s, 10.0)
        out = {"method": self.method}
        deps = [("retriever", self.retriever), ("generator", self.generator)]
        if METHODS[self.method].rerank:
            deps.insert(1, ("reranker", self.reranker))
        for name, handle in deps:
            try:
                out[name] = await self._call(handle.info.remote(), deadline, f"readyz:{name}")
            except RequestTimeout:
                raise ServiceError(503, "unavailable", f"{name} did not answer in time") from None
            except Exception as e:  # a replica that is down or failing: not ready, no internals
                log.warning("readyz: %s not ready: %r", name, e)
                raise ServiceError(503, "unavailable", f"{name} is not ready") from None
        return out
