"""The FastAPI app the Ingress serves: routes, a request-body limit, and errors as JSON.

`build_api(service, limits)` knows nothing about Ray: `service` is any object with

    method: str                                   "kard_bm25" | "kard_reranker"
    async answer(req: AnswerRequest) -> dict      an AnswerResponse body
    async retrieve(req: RetrieveRequest) -> dict  a RetrieveResponse body
    async ready() -> dict                         raises ServiceError(503) when a dependency is not ready
    async answer_stream(req) -> AsyncIterator     (optional) {"passages"}, {"text"}..., {"answer"} events
    async rerank(query, texts) -> list[float]     (optional) reranker scores, one per text

Every error leaves as `{"error", "message", "field", "details", "request_id"}` (api.ErrorBody; the
OpenAI routes use OpenAI's error envelope): validation errors name the field (422), an oversized body
is 413, a blown time budget 504, a dependency that is down or a service over capacity 503 (with
`Retry-After`), anything else 500 — with the request id to find the traceback in the replica log,
never the traceback itself.

`FrontMiddleware` wraps everything: it reads the request id (Serve's proxy sets `x-request-id` and
returns it on every response), counts the model requests in progress and refuses new ones once the
replica drains (`Gate`), and records per-route request counts by status and latency histograms.
"""

# No `from __future__ import annotations` here: FastAPI must see the route body types (built per
# replica inside build_api) as real classes, not as strings it cannot resolve.
import contextvars
import json
import logging
import time
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kard_ray.serve import openai_api as oai
from kard_ray.serve.proxy import BODY_SCOPE_KEY, replayed_body
from kard_ray.serve.api import (KNOWN_ROUTES, MODEL_ROUTES, AnswerResponse, ErrorBody, Limits, RetrieveResponse,
                                error_body, field_path, request_models)

log = logging.getLogger("kard_ray.serve")

# The current request's id (from Serve's `x-request-id`), for log lines and error bodies.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("kard_request_id", default="")


def request_id() -> str:
    """The current request's id ("" outside a request). Deployments call this, never REQUEST_ID itself:
    a ContextVar cannot be pickled with a deployment class."""
    return REQUEST_ID.get()


class ServiceError(Exception):
    """An error with an HTTP status and a client-safe message (no internals)."""

    def __init__(self, status: int, error: str, message: str, field: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.error, self.message, self.field = status, error, message, field
        self.headers = headers


class RequestTimeout(ServiceError):
    def __init__(self, budget_s: float, stage: str):
        super().__init__(504, "timeout", f"the request did not finish within {budget_s:g} s (stopped during {stage})")
        self.stage = stage


class Overloaded(ServiceError):
    """503 + Retry-After: over capacity (or draining); the client should retry later, elsewhere or here."""

    def __init__(self, message: str, retry_after_s: float, error: str = "overloaded"):
        super().__init__(503, error, message, headers={"Retry-After": str(max(0, int(-(-retry_after_s // 1))))})


# ------------------------------------------------------------------------------------------------
# body limit


class BodyLimitMiddleware:
    """Answer 413 when a request body is larger than `max_bytes`, before anything parses it.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives and
    refused as soon as it passes the limit (so a client cannot stream an unbounded body either).
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reply(self, send, status: int, body: dict) -> None:
        await send_json(send, status, body)

    def _too_large(self, size: str, route: str) -> dict:
        return error_payload(route, "body_too_large", f"request body is {size} bytes; the limit is "
                                                            f"{self.max_bytes} bytes (serve.max_body_bytes)", field="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_of(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await self._reply(send, 400, error_payload(route, "invalid_request",
                                                                  "Content-Length is not a number", field="content-length"))
            if n > self.max_bytes:
                return await self._reply(send, 413, self._too_large(str(n), route))
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        # No length declared (chunked): read it here, bounded, and replay it to the app.
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._reply(send, 413, self._too_large(f"more than {self.max_bytes}", route))
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------------
# request id, admission control, metrics


def route_of(scope) -> str:
    """The app-relative route ("/v1/answer"); "other" for unknown paths (bounded metric labels)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path if path in KNOWN_ROUTES else "other"


def error_payload(route: str, error: str, message: str, field: Optional[str] = None,
                  details: Optional[list[dict]] = None) -> dict:
    """The error body for a route: OpenAI's envelope on the OpenAI routes, api.ErrorBody elsewhere."""
    if oai.is_openai_path(route):
        return oai.openai_error(error, message, field)
    return error_body(error, message, field=field, details=details, request_id=REQUEST_ID.get() or None)


async def send_json(send, status: int, body: dict, headers: Optional[dict] = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Gate:
    """Whether this Ingress replica takes new model requests: not once it drains (SIGTERM), when every
    new one is answered 503 "draining" + Retry-After at once while those in progress finish.

    (Over capacity, requests never get here: Serve bounds them at the proxy, see `kard_ray.serve.proxy`.)
    """

    def __init__(self, retry_after_s: float = 1.0):
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.draining = False

    def refusal(self) -> Optional[Overloaded]:
        if self.draining:
            return Overloaded("the service is shutting down; retry later", self.retry_after_s, error="draining")
        return None


class FrontMiddleware:
    """Outermost ASGI layer: the request id, the drain `Gate` on the model routes, and per-route
    metrics (`metrics.observe(route, status, seconds)`)."""

    def __init__(self, app, gate: Gate, metrics: Any = None):
        self.app, self.gate, self.metrics = app, gate, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = scope.get(BODY_SCOPE_KEY)
        if body is not None:  # sent along by the proxy's gate (kard_ray.serve.proxy): no fetch from the proxy
            receive = replayed_body(body, receive)
        rid = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        route, t0, status = route_of(scope), time.perf_counter(), [500]

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if route not in MODEL_ROUTES or scope.get("method") != "POST":
                return await self.app(scope, receive, send_recording)
            refused = self.gate.refusal()
            if refused is not None:
                return await send_json(send_recording, 503, error_payload(route, refused.error, refused.message),
                                       refused.headers)
            self.gate.in_flight += 1
            try:
                return await self.app(scope, receive, send_recording)
            finally:
                self.gate.in_flight -= 1
        finally:
            if self.metrics is not None:
                self.metrics.observe(route, status[0], time.perf_counter() - t0)
            REQUEST_ID.reset(token)


# ------------------------------------------------------------------------------------------------
# the app


_HTTP_ERRORS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large", 415: "unsupported_media_type",
                429: "too_many_requests", 503: "unavailable"}


def _clean_message(msg: str) -> str:
    # pydantic prefixes messages of custom validators with "Value error, ".
    return msg.removeprefix("Value error, ")


def _validation_details(exc: RequestValidationError) -> list[dict]:
    details = []
    for e in exc.errors():
        loc = tuple(e.get("loc") or ("body",))
        if e.get("type") == "json_invalid":
            details.append({"field": "body", "message": f"body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"})
        elif e.get("type") in ("model_attributes_type", "dict_type") and loc == ("body",):
            details.append({"field": "body", "message": "body must be a JSON object"})
        elif e.get("type") == "missing" and loc == ("body",):
            details.append({"field": "body", "message": "a JSON body is required"})
        else:
            details.append({"field": field_path(loc), "message": _clean_message(str(e.get("msg", "invalid")))})
    return details


def _error_responses() -> dict:
    codes = {413: "Body larger than serve.max_body_bytes", 422: "Invalid request; `field` names the culprit",
             500: "Internal error (see the replica log for the request id)", 503: "A dependency is not ready",
             504: "The request exceeded serve.request_timeout_s"}
    return {c: {"model": ErrorBody, "description": d} for c, d in codes.items()}


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON in the route's envelope, with the request id; never a traceback."""

    def reply(request: Request, status: int, error: str, message: str, field: Optional[str] = None,
              details: Optional[list[dict]] = None, headers: Optional[dict] = None) -> JSONResponse:
        body = error_payload(route_of(request.scope), error, message, field=field, details=details)
        return JSONResponse(status_code=status, content=body, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = _validation_details(exc)
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        # OpenAI answers invalid parameters with 400; the native API keeps FastAPI's 422.
        status = 400 if oai.is_openai_path(route_of(request.scope)) else 422
        return reply(request, status, "invalid_request", f"{first['field']}: {first['message']}", first["field"], details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return reply(request, exc.status_code, _HTTP_ERRORS.get(exc.status_code, "http_error"), str(exc.detail),
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        if exc.status >= 500:
            log.warning("request %s: %s %s -> %d %s", REQUEST_ID.get(), request.method, request.url.path,
                        exc.status, exc.message)
        return reply(request, exc.status, exc.error, exc.message, exc.field, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # The traceback goes to the replica log under the id the client has (X-Request-ID); never to the client.
        rid = REQUEST_ID.get() or uuid.uuid4().hex[:16]
        log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
        return reply(request, 500, "internal_error",
                     f"internal error (request id {rid}; the traceback is in the Ingress replica log)")


def _add_native_routes(app: FastAPI, service: Any, limits: Limits, gate: Gate) -> None:
    AnswerRequest, RetrieveRequest = request_models(limits)

    @app.post("/v1/answer", response_model=AnswerResponse, responses=_error_responses(),
              summary="Answer a multiple-choice question with a rationale and its passages")
    async def answer(req: AnswerRequest) -> dict:  # type: ignore[valid-type]
        return await service.answer(req)

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=_error_responses(),
              summary="The passages /v1/answer would give the student for this question")
    async def retrieve(req: RetrieveRequest) -> dict:  # type: ignore[valid-type]
        return await service.retrieve(req)

    @app.post("/v1/rerank", responses=_error_responses(),
              summary="Score documents against a query with the distilled reranker (Cohere/Jina rerank shape)")
    async def rerank(req: oai.RerankRequest) -> dict:
        texts = oai.rerank_texts(req)
        if len(texts) > limits.max_candidates:
            raise ServiceError(422, "invalid_request", f"documents: at most {limits.max_candidates} documents "
                                                       "(serve.max_candidates)", field="documents")
        for i, t in enumerate(texts):
            if not t.strip() or len(t) > limits.max_question_chars:
                raise ServiceError(422, "invalid_request", f"documents[{i}]: must be 1 to {limits.max_question_chars} "
                                                           "characters, not blank", field=f"documents[{i}]")
        if len(req.query) > limits.max_question_chars:
            raise ServiceError(422, "invalid_request", f"query: at most {limits.max_question_chars} characters",
                               field="query")
        scores = await service.rerank(req.query, texts)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the documents' order
        return oai.rerank_response(REQUEST_ID.get(), "kard-reranker", scores, texts, req.top_n, req.return_documents,
                                   order)

    @app.get("/healthz", summary="Liveness: the Ingress replica is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: retriever, reranker and student are loaded and answering",
             responses={503: {"model": ErrorBody}})
    async def readyz() -> dict:
        if gate.draining:
            raise ServiceError(503, "draining", "the service is shutting down")
        info = await service.ready()
        return {"status": "ready", **info}


def _chat_answer_request(AnswerRequest, req: oai.ChatRequest, limits: Limits):
    """The chat request as an /v1/answer request (same validation, same limits), or a 400 naming the field."""
    from pydantic import ValidationError

    if req.n not in (None, 1):
        raise ServiceError(400, "invalid_request", "n: only n=1 is supported", field="n")
    try:
        question, options = oai.question_and_options(req, limits.max_options)
    except oai.ChatParseError as e:
        raise ServiceError(400, "invalid_request", str(e), field=e.field) from None
    try:
        areq = AnswerRequest(question=question, options=options, k=req.k, candidates=req.candidates,
                             return_passages=req.return_passages)
    except ValidationError as e:
        err = e.errors()[0]
        field = field_path(err["loc"])
        raise ServiceError(400, "invalid_request", f"{field}: {_clean_message(err['msg'])}", field=field) from None
    return areq, question, options


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _chat_events(model: str, rid: str, question: str, options: list[str], include_usage: bool, events,
                       first: dict):
    """chat.completion.chunk events: a role chunk, one chunk per piece of text, a final chunk with the
    finish reason and the `kard` extension (answer, passages), optionally a usage chunk, then [DONE]."""
    created = int(time.time())
    yield _sse(oai.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
    final: dict = {}

    async def all_events():
        yield first
        async for ev in events:
            yield ev

    try:
        async for ev in all_events():
            if ev.get("text"):
                yield _sse(oai.chat_chunk(rid, model, created, {"content": ev["text"]}))
            elif "answer" in ev:
                final = ev["answer"]
    except ServiceError as e:  # the status line is gone: report it the way OpenAI streams report errors
        log.warning("request %s: stream failed: %d %s", rid, e.status, e.message)
        yield _sse(oai.openai_error(e.error, e.message, e.field))
        return
    usage = final.get("usage") or {}
    yield _sse(oai.chat_chunk(rid, model, created, {}, usage.get("finish_reason", "stop"),
                              kard=oai.kard_extension(final, question, options)))
    if include_usage:
        p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        yield _sse({**oai.chat_chunk(rid, model, created, {}), "choices": [],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
    yield "data: [DONE]\n\n"


def _add_openai_routes(app: FastAPI, service: Any, limits: Limits) -> None:
    AnswerRequest, _ = request_models(limits)
    created = int(time.time())

    def check_model(model: str) -> None:
        if model != service.method:
            raise ServiceError(404, "model_not_found", f"model {model!r} does not exist; this service serves "
                                                       f"{service.method!r} (GET /v1/models)", field="model")

    @app.get("/v1/models", summary="OpenAI: the model this service serves")
    async def models() -> dict:
        return oai.models_list(service.method, created)

    @app.get("/v1/models/{model}", summary="OpenAI: one model", include_in_schema=False)
    async def model(model: str) -> dict:
        check_model(model)
        return oai.models_list(service.method, created)["data"][0]

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (stream: true for SSE)",
              responses=_error_responses())
    async def chat(req: oai.ChatRequest):
        check_model(req.model)
        areq, question, options = _chat_answer_request(AnswerRequest, req, limits)
        rid = REQUEST_ID.get() or uuid.uuid4().hex
        if not req.stream:
            answer = await service.answer(areq, usage=True)
            return oai.chat_completion(rid, service.method, answer, question, options)
        events = service.answer_stream(areq).__aiter__()
        # The first event comes before the status line: a failure in retrieval (timeout, overload)
        # is still a proper HTTP error, not a broken stream.
        first = await events.__anext__()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_chat_events(service.method, rid, question, options, include_usage, events, first),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_api(service: Any, limits: Limits, title: str = "KARD question answering", *, gate: Optional[Gate] = None,
              metrics: Any = None) -> FastAPI:
    """The FastAPI app: POST /v1/answer, /v1/retrieve, /v1/rerank, /v1/chat/completions, GET /v1/models,
    /healthz, /readyz, docs at /docs; `gate` bounds the model requests in progress (default: no bound)."""
    gate = gate or Gate()
    app = FastAPI(
        title=title, version="1",
        description="A distilled student (KARD, Kang et al. 2023) answers multiple-choice questions with a rationale "
                    "and the passages it rests on. Retrieval: BM25 (or dense/hybrid) over the run's corpus, reranked "
                    "by the distilled reranker when the run has one. OpenAI-compatible chat completions and a "
                    "Cohere/Jina-shaped rerank endpoint serve the same models.")
    _add_error_handlers(app)
    _add_native_routes(app, service, limits, gate)
    _add_openai_routes(app, service, limits)
    # Added last so they wrap everything (Starlette runs the last-added middleware first): the front
    # layer refuses over-capacity requests before the body is even read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(FrontMiddleware, gate=gate, metrics=metrics)
    return app
