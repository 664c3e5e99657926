"""The four Serve deployments: Retriever → Reranker → Generator, orchestrated by the HTTP Ingress.

Each model deployment wraps the *same* object offline evaluation uses (`knowledge.Retriever`,
`training.reranker.Reranker`, `evaluation.StudentGenerator`), loaded once per replica; so, with
greedy decoding, a served answer equals the evaluation stage's prediction for the same question.

Blocking model work runs in a worker thread (`asyncio.to_thread`) so a replica's event loop keeps
answering health checks and filling the next batch while the model runs. One model call at a time
per replica (a lock, or @serve.batch's single in-flight batch): a fast tokenizer shared by two
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
from ray.serve.exceptions import DeploymentUnavailableError

from kard_ray.config import KardConfig
from kard_ray.serve.api import Limits, answer_fields, split_rationale
from kard_ray.serve.http import RequestTimeout, ServiceError, build_api

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


def top_k(scores, k: int) -> list[int]:
    """Indices of the k highest scores, best first; ties keep BM25 order (a stable sort)."""
    import numpy as np

    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]]


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
            from kard_ray.training.reranker import Reranker as TrainedReranker

            self.reranker = TrainedReranker.from_dir(model_dir, max_length=cfg.reranker.max_length, device=_device())

    async def rerank(self, query: str, candidates: list[dict], k: int) -> list[dict]:
        """The top-k candidates by reranker score (their `score` replaced by it), best first."""
        if self.reranker is None:
            raise RuntimeError("this application serves a run without a reranker")
        scores = await asyncio.to_thread(_locked, self.lock, self.reranker.rerank, query,
                                         [_passage_text(p) for p in candidates])
        return [{**candidates[i], "score": float(scores[i])} for i in top_k(scores, k)]

    async def info(self) -> dict:
        return {"reranker": self.model_dir is not None}

    async def check_health(self) -> None:
        if self.model_dir is not None and self.reranker is None:  # pragma: no cover - defensive
            raise RuntimeError("reranker not loaded")


@serve.deployment(name="Generator")
class Generator:
    """The student, with dynamic batching: concurrent requests share one `generate()` call."""

    def __init__(self, model_dir: str, cfg: KardConfig):
        from kard_ray.evaluation import StudentGenerator

        t0 = time.time()
        e = cfg.eval
        # The evaluation stage's exact settings: same formatting, decoding and answer reading.
        self.student = StudentGenerator(
            model_dir, cfg.data.dataset, max_new_tokens=e.max_new_tokens, decoding=e.decoding, n_votes=e.n_votes,
            temperature=e.temperature, max_source_length=cfg.student.max_source_length, score_by=e.score_by,
            seed=cfg.seed, device=_device())
        self.model_dir = model_dir
        self.lock = threading.Lock()  # a cancelled batch's thread may still be generating
        self.predict.set_max_batch_size(cfg.serve.max_batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self.batches = 0
        self.batched_requests = 0
        log.info("Generator: student %s loaded in %.1fs", model_dir, time.time() - t0)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, items: list[tuple[str, list[str], list[str]]]) -> list[dict]:
        """items: (question, options, passage strings) -> {generation, pred_index}, one per item."""
        questions = [q for q, _, _ in items]
        options = [list(o) for _, o, _ in items]
        passages = [list(p) for _, _, p in items]
        preds = await asyncio.to_thread(_locked, self.lock, self.student.predict, questions, options, passages)
        self.batches += 1
        self.batched_requests += len(items)
        return [{"generation": p.generation, "pred_index": int(p.pred_index)} for p in preds]

    async def info(self) -> dict:
        return {"student": self.model_dir, "batches": self.batches,
                "mean_batch_size": round(self.batched_requests / self.batches, 2) if self.batches else None}

    async def check_health(self) -> None:
        if self.student.model is None:  # pragma: no cover - defensive
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
        self.retriever, self.reranker, self.generator = retriever, reranker, generator
        self.method: str = settings["method"]
        self.default_k: int = settings["k"]
        self.default_candidates: int = settings["k_star"]
        self.limits: Limits = settings["limits"]

    def __serve_build_asgi_app__(self):
        # Built at replica start, so the request models carry this run's configured limits.
        return build_api(self, self.limits)

    # -- calling the model deployments ----------------------------------------------------------
    async def _call(self, response, deadline: float, stage: str) -> Any:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(response, remaining)
        except asyncio.TimeoutError:
            response.cancel()  # free the downstream replica; nobody will read this result
            raise RequestTimeout(self.limits.request_timeout_s, stage) from None
        except (RayActorError, DeploymentUnavailableError) as e:
            # A replica died mid-request or none is left: the client may retry; it is not a bug.
            log.warning("%s unavailable: %r", stage, e)
            raise ServiceError(503, "unavailable", f"the {stage} step is unavailable; retry later") from None

    async def _passages(self, question: str, options: list[str], k: Optional[int], candidates: Optional[int],
                        deadline: float, timings: dict) -> tuple[str, list[dict]]:
        """The passages the student gets, exactly as offline evaluation picks them (evaluate.py)."""
        from kard_ray.evaluation.evaluate import question_query

        query = question_query(question, options)
        k = k or self.default_k
        t0 = time.monotonic()
        if self.method == "kard_reranker":
            n = candidates or self.default_candidates
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
    async def answer(self, req) -> dict:
        deadline = time.monotonic() + self.limits.request_timeout_s
        timings: dict = {"rerank": None, "generate": None}
        _, passages = await self._passages(req.question, req.options, req.k, req.candidates, deadline, timings)
        t0 = time.monotonic()
        pred = await self._call(
            self.generator.predict.remote((req.question, list(req.options), [_passage_text(p) for p in passages])),
            deadline, "generate")
        timings["generate"] = 1000 * (time.monotonic() - t0)
        return {
            **answer_fields(pred["pred_index"], list(req.options)),
            "rationale": split_rationale(pred["generation"]),
            "generation": pred["generation"],
            "method": self.method,
            "passages": passages if req.return_passages else [],
            "timings_ms": {k: (None if v is None else round(v, 3)) for k, v in timings.items()},
        }

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
        if self.method == "kard_reranker":
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
