"""The FastAPI app the Ingress serves: routes, a request-body limit, and errors as JSON.

`build_api(service, limits)` knows nothing about Ray: `service` is any object with

    method: str                                   "kard_bm25" | "kard_reranker"
    async answer(req: AnswerRequest) -> dict      an AnswerResponse body
    async retrieve(req: RetrieveRequest) -> dict  a RetrieveResponse body
    async ready() -> dict                         raises ServiceError(503) when a dependency is not ready

Every error leaves as `{"error", "message", "field", "details"}` (api.ErrorBody): validation errors
name the field (422), an oversized body is 413, a blown time budget 504, a dependency that is down
503, anything else 500 — with a request id to find the traceback in the replica log, never the
traceback itself.
"""

# No `from __future__ import annotations` here: FastAPI must see the route body types (built per
# replica inside build_api) as real classes, not as strings it cannot resolve.
import logging
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kard_ray.serve.api import (AnswerResponse, ErrorBody, Limits, RetrieveResponse, error_body, field_path,
                                request_models)

log = logging.getLogger("kard_ray.serve")


class ServiceError(Exception):
    """An error with an HTTP status and a client-safe message (no internals)."""

    def __init__(self, status: int, error: str, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status, self.error, self.message, self.field = status, error, message, field


class RequestTimeout(ServiceError):
    def __init__(self, budget_s: float, stage: str):
        super().__init__(504, "timeout", f"the request did not finish within {budget_s:g} s (stopped during {stage})")
        self.stage = stage


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
        import json

        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _too_large(self, size: str) -> dict:
        return error_body("body_too_large", f"request body is {size} bytes; the limit is {self.max_bytes} bytes "
                                            "(serve.max_body_bytes)", field="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await self._reply(send, 400, error_body("invalid_request", "Content-Length is not a number",
                                                               field="content-length"))
            if n > self.max_bytes:
                return await self._reply(send, 413, self._too_large(str(n)))
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
                return await self._reply(send, 413, self._too_large(f"more than {self.max_bytes}"))
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


def build_api(service: Any, limits: Limits, title: str = "KARD question answering") -> FastAPI:
    """The FastAPI app: POST /v1/answer, POST /v1/retrieve, GET /healthz, GET /readyz, docs at /docs."""
    AnswerRequest, RetrieveRequest = request_models(limits)
    app = FastAPI(
        title=title, version="1",
        description="A distilled student (KARD, Kang et al. 2023) answers multiple-choice questions with a rationale "
                    "and the passages it rests on. Retrieval: BM25 (or dense/hybrid) over the run's corpus, reranked "
                    "by the distilled reranker when the run has one.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = _validation_details(exc)
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        return JSONResponse(status_code=422, content=error_body(
            "invalid_request", f"{first['field']}: {first['message']}", field=first["field"], details=details))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),
                            content=error_body(_HTTP_ERRORS.get(exc.status_code, "http_error"), str(exc.detail)))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        if exc.status >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse(status_code=exc.status, content=error_body(exc.error, exc.message, field=exc.field))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # The traceback goes to the replica log under an id the client can quote; never to the client.
        rid = uuid.uuid4().hex[:16]
        log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content=error_body(
            "internal_error", f"internal error (request id {rid}; the traceback is in the Ingress replica log)"))

    @app.post("/v1/answer", response_model=AnswerResponse, responses=_error_responses(),
              summary="Answer a multiple-choice question with a rationale and its passages")
    async def answer(req: AnswerRequest) -> dict:  # type: ignore[valid-type]
        return await service.answer(req)

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=_error_responses(),
              summary="The passages /v1/answer would give the student for this question")
    async def retrieve(req: RetrieveRequest) -> dict:  # type: ignore[valid-type]
        return await service.retrieve(req)

    @app.get("/healthz", summary="Liveness: the Ingress replica is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: retriever, reranker and student are loaded and answering",
             responses={503: {"model": ErrorBody}})
    async def readyz() -> dict:
        info = await service.ready()
        return {"status": "ready", **info}

    # Added last so it wraps everything (Starlette runs the last-added middleware first).
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    return app
