"""The OpenAI- and Cohere/Jina-compatible contracts: chat completions, models, rerank.

Pure pydantic + text handling (no Ray, no FastAPI app), like `api.py`:

    POST /v1/chat/completions   the last user message holds the question; options come from the
                                `options` extension field or are parsed from "A. ... B. ..." lines
    GET  /v1/models             the one model this service serves (its method, e.g. kard_reranker)
    POST /v1/rerank             {query, documents, top_n} -> {results: [{index, relevance_score}]}

Errors on the OpenAI routes use OpenAI's envelope, `{"error": {"message", "type", "param", "code"}}`,
so OpenAI clients surface them as usual (`e.status_code`, `e.code`, `e.param`); the other routes keep
`api.ErrorBody`.
"""

from __future__ import annotations

import re
import string
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")

# our error kinds -> OpenAI's error `type`
_OPENAI_TYPES = {"invalid_request": "invalid_request_error", "body_too_large": "invalid_request_error",
                 "not_found": "invalid_request_error", "model_not_found": "invalid_request_error",
                 "method_not_allowed": "invalid_request_error", "overloaded": "server_overloaded",
                 "draining": "server_overloaded", "unavailable": "service_unavailable", "timeout": "timeout",
                 "internal_error": "server_error"}


def is_openai_path(path: str) -> bool:
    return any(path.endswith(p) for p in OPENAI_PATHS)


def openai_error(error: str, message: str, field: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(error, "invalid_request_error"),
                      "param": field, "code": error}}


# ------------------------------------------------------------------------------------------------
# chat completions: request


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """An OpenAI chat completion request, plus KARD's extension fields (`options`, `k`, `candidates`).

    Sampling parameters (temperature, top_p, max_tokens, seed, ...) are accepted and ignored: the
    student decodes exactly as the run's evaluation did (`eval.decoding`), so answers stay reproducible.
    """

    # OpenAI clients send many optional parameters; a typo in ours must still be an error, so only the
    # documented OpenAI names are accepted besides our own.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="The served model id (GET /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1, description="The last `user` message holds the question.")
    stream: bool = Field(False, description="Stream the generation as server-sent events (chat.completion.chunk).")
    stream_options: Optional[StreamOptions] = None
    options: Optional[list[str]] = Field(
        None, description="KARD extension: the answer options, in order. Without it they are parsed from "
                          "'A. ...' / 'B. ...' markers in the last user message.")
    k: Optional[int] = Field(None, description="KARD extension: passages given to the student.")
    candidates: Optional[int] = Field(None, description="KARD extension: BM25 candidates handed to the reranker.")
    return_passages: bool = Field(True, description="KARD extension: include the passages in `kard.passages`.")
    n: Optional[int] = Field(None, description="Choices; only 1 is supported.")
    # accepted for compatibility, ignored (see the class docstring)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict] = None
    reasoning_effort: Optional[str] = None
    service_tier: Optional[str] = None


class ChatParseError(ValueError):
    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _first_marker(text: str, letter: str, start: int) -> Optional[re.Match]:
    """The option marker "A." / "A)" at `start` or later, preferring one that opens a line."""
    line = re.compile(rf"(?m)^[ \t]*{letter}[.)][ \t]+").search(text, start)
    if line is not None:
        return line
    return re.compile(rf"(?:(?<=\s)|^){letter}[.)]\s+").search(text, start)


def parse_question(text: str, max_options: int = 10) -> tuple[str, list[str]]:
    """'Which river ...?\\nA. the Orla\\nB. the Ketter' -> ('Which river ...?', ['the Orla', 'the Ketter']).

    Markers A., B., C., ... (or A), B), ...) must come in order, on their own lines or inline after a
    space, as the student's own prompt writes them ("{q} A. {o1} B. {o2}").
    """
    marks: list[re.Match] = []
    start = 0
    for letter in string.ascii_uppercase[:max_options + 1]:
        m = _first_marker(text, letter, start) if not marks else \
            re.compile(rf"(?:(?<=\s)|^){letter}[.)]\s+").search(text, start)
        if m is None:
            break
        marks.append(m)
        start = m.end()
    if len(marks) < 2:
        raise ChatParseError("the last user message must list at least two options as 'A. ...' 'B. ...' "
                             "(or pass them in the `options` field)", "messages")
    if len(marks) > max_options:
        raise ChatParseError(f"at most {max_options} options (serve.max_options); the message lists more", "messages")
    question = text[: marks[0].start()].strip()
    ends = [m.start() for m in marks[1:]] + [len(text)]
    options = [text[m.end(): e].strip() for m, e in zip(marks, ends)]
    return question, options


def question_and_options(req: ChatRequest, max_options: int) -> tuple[str, list[str]]:
    """(question, options) of a chat request: the last user message, options from the field or parsed."""
    users = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        raise ChatParseError("no message with role 'user': the last user message holds the question", "messages")
    i = users[-1]
    text = req.messages[i].text()
    if req.options is not None:
        return text, list(req.options)
    try:
        return parse_question(text, max_options)
    except ChatParseError as e:
        raise ChatParseError(str(e), f"messages[{i}].content") from None


# ------------------------------------------------------------------------------------------------
# chat completions: responses


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def kard_extension(answer: dict, question: str, options: list[str]) -> dict:
    """The `kard` field: the parsed answer, the passages, the question and options as read."""
    keys = ("answer_index", "answer_letter", "answer_text", "rationale", "method", "passages", "timings_ms")
    return {"question": question, "options": options, **{k: answer.get(k) for k in keys}}


def chat_completion(request_id: str, model: str, answer: dict, question: str, options: list[str]) -> dict:
    """A `chat.completion` whose message is the student's generation (rationale, then 'Answer: X')."""
    usage = answer.get("usage") or {}
    return {
        "id": completion_id(request_id), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["generation"]},
                     "finish_reason": usage.get("finish_reason", "stop"), "logprobs": None}],
        "usage": {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
                  "total_tokens": usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)},
        "kard": kard_extension(answer, question, options),
    }


def chat_chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None,
               **extra: Any) -> dict:
    """One `chat.completion.chunk` (the OpenAI streaming format)."""
    return {"id": completion_id(request_id), "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "kard-ray"}]}


# ------------------------------------------------------------------------------------------------
# rerank (Cohere v2 / Jina shape)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


class RerankRequest(BaseModel):
    """Cohere/Jina rerank: score `documents` against `query` with the run's distilled reranker."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, description="The query (for KARD: the question and its options).")
    documents: list[Union[str, RerankDocument]] = Field(..., min_length=1,
                                                        description="Texts to score (strings or {text} objects).")
    top_n: Optional[int] = Field(None, ge=1, description="Keep the best top_n (default: all).")
    model: Optional[str] = Field(None, description="Ignored (one reranker per service); accepted for compatibility.")
    return_documents: bool = Field(False, description="Include each result's document text.")


def rerank_texts(req: RerankRequest) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in req.documents]


def rerank_response(request_id: str, model: str, scores: list[float], texts: list[str], top_n: Optional[int],
                    return_documents: bool, order: list[int]) -> dict:
    """{id, model, results: [{index, relevance_score, document?}], meta}; `order` is best first."""
    results = []
    for i in order[: top_n or len(order)]:
        r = {"index": i, "relevance_score": float(scores[i])}
        if return_documents:
            r["document"] = {"text": texts[i]}
        results.append(r)
    return {"id": request_id, "model": model, "results": results,
            "meta": {"billed_units": {"search_units": 1}}}
