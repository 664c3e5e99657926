"""The HTTP contract of the KARD service: request/response models, limits, error bodies.

Pure pydantic (no Ray, no FastAPI app): the Ingress builds its FastAPI app from these, and the
unit tests check validation without starting Serve.

Limits that an operator tunes (`serve.max_options`, `serve.max_question_chars`, `serve.max_k`,
`serve.max_candidates`) are baked into the request models by `request_models(limits)` at replica
start, so the OpenAPI page at `/docs` shows the limits the running service enforces.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model, field_validator

# The app-relative routes: the model routes (POST, admitted by the proxies' gates and the Ingress's drain) and
# every route a metric may name (anything else is "other", so metric labels stay bounded).
MODEL_ROUTES = ("/v1/answer", "/v1/retrieve", "/v1/rerank", "/v1/chat/completions")
KNOWN_ROUTES = MODEL_ROUTES + ("/v1/models", "/healthz", "/readyz", "/docs", "/openapi.json")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; from `cfg.serve` (see `Limits.from_config`)."""

    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 30.0
    max_options: int = 8
    max_question_chars: int = 4000
    max_option_chars: int = 1000
    max_k: int = 32
    max_candidates: int = 1000

    @classmethod
    def from_config(cls, serve_cfg: Any) -> "Limits":
        return cls(max_body_bytes=serve_cfg.max_body_bytes, request_timeout_s=serve_cfg.request_timeout_s,
                   max_options=serve_cfg.max_options, max_question_chars=serve_cfg.max_question_chars,
                   max_option_chars=serve_cfg.max_option_chars, max_k=serve_cfg.max_k,
                   max_candidates=serve_cfg.max_candidates)


# ------------------------------------------------------------------------------------------------
# requests


def _not_blank(v: str) -> str:
    # Not stripped: the student must see the text exactly as offline evaluation did.
    if not v.strip():
        raise ValueError("must not be empty")
    return v


class _QuestionFields(BaseModel):
    """Fields shared by /v1/answer and /v1/retrieve; limits are filled in by `request_models`."""

    # Unknown keys are an error (a typo such as "option" must not silently fall back to defaults).
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., description="The question, as the user asked it.")
    options: list[str] = Field(..., description="Answer options, in order (A, B, C, ...).")
    k: Optional[int] = Field(None, description="Passages given to the student (default: eval.k of the run).")
    candidates: Optional[int] = Field(
        None, description="BM25 candidates handed to the reranker, k* (default: reranker.k_star); "
                          "ignored when the run has no reranker.")

    @field_validator("question")
    @classmethod
    def _question_not_blank(cls, v: str) -> str:
        return _not_blank(v)


class _AnswerFields(_QuestionFields):
    return_passages: bool = Field(True, description="Include the passages the answer rests on.")


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(AnswerRequest, RetrieveRequest) with the service's limits as field constraints."""
    # Checked per item, so an error names the option: `options[2]`.
    option = Annotated[str, StringConstraints(max_length=limits.max_option_chars), AfterValidator(_not_blank)]
    fields = dict(
        question=(str, Field(..., min_length=1, max_length=limits.max_question_chars,
                             description=f"The question, as the user asked it (at most {limits.max_question_chars} characters).",
                             examples=["Which river flows through the town of Varnholm?"])),
        options=(list[option], Field(..., min_length=2, max_length=limits.max_options,
                                     description=f"Answer options in order (A, B, ...): 2 to {limits.max_options}, "
                                                 f"each at most {limits.max_option_chars} characters.",
                                     examples=[["the Orla", "the Ketter", "the Mose", "the Dunn"]])),
        k=(Optional[int], Field(None, ge=1, le=limits.max_k,
                                description=f"Passages given to the student, 1 to {limits.max_k} (default: eval.k of the run).")),
        candidates=(Optional[int], Field(None, ge=1, le=limits.max_candidates,
                                         description=f"BM25 candidates handed to the reranker (k*), 1 to {limits.max_candidates} "
                                                     "(default: reranker.k_star); ignored without a reranker.")),
    )
    answer = create_model("AnswerRequest", __base__=_AnswerFields, __module__=__name__,
                          __doc__="A multiple-choice question to answer.", **fields)
    retrieve = create_model("RetrieveRequest", __base__=_QuestionFields, __module__=__name__,
                            __doc__="A question whose supporting passages to fetch (the ones /v1/answer would use).",
                            **fields)
    return answer, retrieve


# ------------------------------------------------------------------------------------------------
# responses


class Passage(BaseModel):
    id: str
    title: str
    text: str
    score: float = Field(..., description="Reranker score (kard_reranker) or retrieval score (kard_bm25).")


class Timings(BaseModel):
    retrieve: float = Field(..., description="Milliseconds in the Retriever call (queueing included).")
    rerank: Optional[float] = Field(None, description="Milliseconds in the Reranker call; null when the method has no reranker.")
    generate: Optional[float] = Field(None, description="Milliseconds in the Generator call (batching wait included).")


class AnswerResponse(BaseModel):
    answer_index: int = Field(..., description="0-based index of the chosen option; -1 when the student stated no readable answer.")
    answer_letter: Optional[str] = Field(None, description="A, B, ...; null when answer_index is -1.")
    answer_text: Optional[str] = Field(None, description="The chosen option's text; null when answer_index is -1.")
    rationale: str = Field(..., description="The student's explanation (the generation before its Answer line).")
    generation: str = Field(..., description="The student's raw output, as offline evaluation records it.")
    method: Literal["kard_bm25", "kard_reranker"]
    passages: list[Passage] = Field(default_factory=list, description="The passages given to the student, best first.")
    timings_ms: Timings


class RetrieveResponse(BaseModel):
    method: Literal["kard_bm25", "kard_reranker"]
    query: str = Field(..., description="The retrieval query (question and options).")
    passages: list[Passage]
    timings_ms: Timings


class ErrorBody(BaseModel):
    error: str = Field(..., description="Machine-readable kind: invalid_request, body_too_large, timeout, not_found, "
                                        "overloaded (503 + Retry-After), draining, unavailable, internal_error, ...")
    message: str
    field: Optional[str] = Field(None, description="The request field at fault, e.g. `options` or `options[2]`.")
    details: list[dict] = Field(default_factory=list, description="Every validation problem: {field, message}.")
    request_id: Optional[str] = Field(None, description="This request's id (also the X-Request-ID header): quote it "
                                                        "to find the request in the replica logs.")


def error_body(error: str, message: str, field: Optional[str] = None, details: Optional[list[dict]] = None,
               request_id: Optional[str] = None) -> dict:
    return ErrorBody(error=error, message=message, field=field, details=details or [],
                     request_id=request_id).model_dump()


def field_path(loc: tuple | list) -> str:
    """pydantic/FastAPI error location -> a field name: ("body", "options", 2) -> "options[2]"."""
    parts = [p for p in loc if p != "body"] if len(loc) > 1 else list(loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "body"


# ------------------------------------------------------------------------------------------------
# reading a generation


def answer_fields(pred_index: int, options: list[str]) -> dict:
    """answer_index / answer_letter / answer_text for a predicted index (-1: none readable)."""
    if 0 <= pred_index < len(options):
        return {"answer_index": pred_index, "answer_letter": string.ascii_uppercase[pred_index],
                "answer_text": options[pred_index]}
    return {"answer_index": -1, "answer_letter": None, "answer_text": None}
