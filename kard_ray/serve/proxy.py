"""The HTTP proxy's side of overload: Serve's own backpressure answers, as this service's JSON errors.

Past capacity, requests are refused where it is cheapest: in Serve's HTTP proxy, before they reach the
Ingress (`serve.ingress.max_ongoing_requests` per replica, then `max_queued_requests` waiting at the
proxy). Measured on the 2-core machine: a refusal there costs ~1 ms of proxy CPU, one answered by the
Ingress replica ~10 ms (a Ray actor call and the ASGI round trip), and under a closed-loop flood of
refused requests that difference is the throughput the models keep. Serve answers those refusals with
`503` + `Retry-After` (`backpressure_config`) and a plain-text body; `JsonRejections`, installed in the
proxy through Serve's proxy-callback hook, turns that body into the JSON error every other route returns:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=kard_ray.serve.proxy:middlewares

(`kard-ray serve` sets it before starting Ray; on a cluster set it in the environment of `ray start` on
every node, or the refusals keep Serve's plain-text body - still 503 with Retry-After).
"""

from __future__ import annotations

import json

CALLBACK = "kard_ray.serve.proxy:middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def middlewares() -> list:
    """Serve's proxy callback: the Starlette middlewares the HTTP proxy wraps its app with."""
    from starlette.middleware import Middleware

    return [Middleware(JsonRejections)]


def _overloaded_body(path: str, request_id: str | None, retry_after: str | None) -> dict:
    from kard_ray.serve import openai_api as oai
    from kard_ray.serve.api import error_body

    wait = f"retry after {retry_after} s" if retry_after else "retry later"
    message = f"over capacity: the service is answering as many requests as it can; {wait}"
    if oai.is_openai_path(path):
        return oai.openai_error("overloaded", message)
    return error_body("overloaded", message, request_id=request_id)


class JsonRejections:
    """ASGI middleware for the proxy: a 503/429 with a non-JSON body (Serve's backpressure refusal)
    leaves with the service's JSON error body; its status and headers (Retry-After, x-request-id) stay."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def send_rewritten(message):
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if not headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"] = message  # rewritten once the body is known to be complete
                    return
            if "start" in held and message["type"] == "http.response.body":
                if message.get("more_body"):
                    return  # the plain-text body is dropped; ours replaces it
                start = held.pop("start")
                old = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
                h = {k.lower(): v for k, v in old}
                rid, retry = h.get(b"x-request-id"), h.get(b"retry-after")
                body = json.dumps(_overloaded_body(scope.get("path", ""), rid.decode() if rid else None,
                                                   retry.decode() if retry else None)).encode()
                await send({**start, "headers": old + [(b"content-type", b"application/json"),
                                                       (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        return await self.app(scope, receive, send_rewritten)
