"""The HTTP proxy's side of overload: the service's capacity is enforced where a refusal is cheapest.

`AdmissionGate`, installed in Serve's HTTP proxy through its proxy-callback hook, admits model requests
(POST under the app's route prefix) itself, before Serve's proxy logic and router see them: at most
`ongoing` in the graph at once (the Ingress's max_ongoing_requests x max_replicas), `queued` more waiting
first come first served, and the next one answered at once with 503 + Retry-After and the JSON error body
every other route returns. The limits are the deployed application's (`publish_limits`: each Ingress replica
writes them to Ray's KV store as it starts; the gates read them every few seconds), so a redeploy with other
bounds moves them. They apply to `serve.route_prefix` + /v1/ (a Serve config's route_prefix must match it).

Why not Serve's own `max_queued_requests` alone: Serve counts a request as queued until its router has
placed it on a replica, so a queue shorter than a burst of arrivals refused clients at c=8 the Ingress had
room for (49 of 160 with 1 waiting), while a long one let the 200s' p99 grow to 30x the peak's under
c=128 (bench/bench_serve.py --load-run, 2026-12-06/07). And a refusal in Serve's proxy costs its full
request path (context, router, metrics, access log); one here costs the HTTP parse and two ASGI sends.

A connection the gate refused that sends again before its Retry-After has passed (a client that ignores it,
like `hey`'s workers) is held until that time and a random part of half more, then refused; its next request is
decided at once (`Limits.hold_early_retries`, `serve.hold_early_retries`). Without it such clients spin on
refusals: 64 of them sent 6,280 a second against a bound of 1 + 1, and at c=128 they took the two cores from the
requests admitted (c=128 kept 0.49x of c=8's 200s/s with 8 + 8 admitted). A slot is free once the answer's last
message is sent.

`JsonRejections` turns any refusal Serve still makes itself (`backpressure_config`: 503 + Retry-After with
a plain-text body) into the same JSON error.

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=kard_ray.serve.proxy:middlewares

(`kard-ray serve` sets it before starting Ray; on a cluster set it in the environment of `ray start` on
every node. Without it, Serve's own bounds refuse with 503 + Retry-After and a plain-text body.)
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Optional

CALLBACK = "kard_ray.serve.proxy:middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"
KV_KEY, KV_NAMESPACE = b"admission:", "kard_ray.serve"  # where the applications' limits are published


def proxy_environment(calls_by_value: bool = True) -> dict[str, str]:
    """The environment Serve's HTTP proxies need, read when Ray starts them (so set before `ray.init`, or in the
    environment of `ray start` on every node): these middlewares, and with `serve.calls_by_value` the proxy's
    call to the Ingress over Serve's direct gRPC channel too, like the Ingress's own calls. That one hop by value
    measured on this 2-core machine (hey, the test-size demo run, 2026-12-07): c=1 p50 0.129 s against 0.136 s;
    c=8 38.1 against 24.7 requests/s; c=32 41.2 against 34.7."""
    env = {CALLBACK_ENV: CALLBACK}
    if calls_by_value:
        env[GRPC_ENV] = "1"
    return env


def set_proxy_environment(calls_by_value: bool = True) -> None:
    """`proxy_environment` into this process's environment, where not set already (before Ray starts)."""
    import os

    for key, value in proxy_environment(calls_by_value).items():
        os.environ.setdefault(key, value)


def middlewares() -> list:
    """Serve's proxy callback: the Starlette middlewares the HTTP proxy wraps its app with, each around the ones
    before it (so the gate, last, is outermost: a refusal there skips everything else)."""
    from starlette.middleware import Middleware

    return [Middleware(JsonRejections), Middleware(AdmissionGate)]


@dataclass(frozen=True)
class Limits:
    """What each HTTP proxy admits to the application whose model routes start with `prefix` (per proxy: one
    per node)."""

    prefix: str
    ongoing: int
    queued: int
    retry_after_s: float
    max_body_bytes: int = 0  # bodies up to this size (declared) travel to the Ingress with the request
    hold_early_retries: bool = True  # a retry on a refused connection within its Retry-After: held, then refused

    def retry_after(self) -> str:
        return str(max(0, int(-(-self.retry_after_s // 1))))

    def as_deployed(self, max_ongoing_requests: int, replicas: int, max_queued_requests: int) -> "Limits":
        """These limits for the Ingress deployment as Serve runs it: `ongoing` = its max_ongoing_requests x its
        (max) replicas. A Serve config's deployment options override the ones the run config gave the code,
        and the gate must admit what the deployed Ingress takes, not what the run config assumed.

        Raises ValueError when Serve's own queue in front of the Ingress (`max_queued_requests`, per proxy;
        -1 = unbounded) is shorter than what the gate admits: Serve would refuse part of the admitted requests."""
        out = replace(self, ongoing=max_ongoing_requests * replicas)
        if 0 <= max_queued_requests < out.ongoing + out.queued:
            raise ValueError(
                f"the Ingress's max_queued_requests ({max_queued_requests}) is below what each HTTP proxy's gate "
                f"admits ({out.ongoing} in the graph = max_ongoing_requests {max_ongoing_requests} x {replicas} "
                f"replicas, + {out.queued} waiting): size the Ingress with serve.ingress.max_replicas and "
                f"serve.ingress.max_ongoing_requests under the application's args, not its deployment options (the "
                f"queue is then sized to match), or set its max_queued_requests to at least "
                f"{out.ongoing + out.queued} (-1: unbounded)")
        return out


def publish_limits(limits: Limits) -> None:
    """Where the gates find a deployed application's limits: Ray's KV store, one key per route prefix (an
    application redeployed under the same prefix replaces its limits)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(KV_KEY + limits.prefix.encode(), json.dumps(asdict(limits)).encode(),
                                 overwrite=True, namespace=KV_NAMESPACE)


def published_limits() -> list[Limits]:
    """Every published application's limits, longest prefix first (the one a path matches first)."""
    from ray.experimental import internal_kv

    found = []
    for key in internal_kv._internal_kv_list(KV_KEY, namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw:
            found.append(Limits(**json.loads(raw)))
    return sorted(found, key=lambda lim: -len(lim.prefix))


class _Lane:
    """One application's admission at one proxy: requests in its graph, those waiting in arrival order, and
    the connections told to retry later (until when)."""

    MAX_TOLD = 4096  # connections remembered at most; past it, those whose Retry-After has passed are forgotten

    def __init__(self):
        self.ongoing = 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.told: dict[tuple, float] = {}  # connection (client host, port) -> when its Retry-After ends

    def told_to_retry(self, client: tuple, until: float) -> None:
        if len(self.told) >= self.MAX_TOLD:
            now = time.monotonic()
            self.told = {c: t for c, t in self.told.items() if t > now}
        self.told[client] = until

    def early_by(self, client: tuple, now: float) -> float:
        """Seconds until `client`'s Retry-After ends (0: it was not refused, or has waited long enough); forgets
        it, so the request after this one is decided at once."""
        until = self.told.pop(client, None)
        return 0.0 if until is None else max(0.0, until - now)

    def try_enter(self, lim: Limits) -> Optional[bool]:
        """True: admitted now; False: must wait (`wait`); None: refused (the queue is full)."""
        if self.ongoing < lim.ongoing and not self.waiting:
            self.ongoing += 1
            return True
        return False if len(self.waiting) < lim.queued else None

    async def wait(self) -> None:
        slot = asyncio.get_running_loop().create_future()
        self.waiting.append(slot)
        try:
            await slot  # resolved by `leave`, which handed this request its slot (still counted as ongoing)
        except asyncio.CancelledError:  # the client left while waiting
            if slot.done() and not slot.cancelled():
                self.leave()  # it had just been handed a slot: pass it on
            elif slot in self.waiting:  # (a `leave` in between may have dropped the cancelled slot already)
                self.waiting.remove(slot)
            raise

    def leave(self) -> None:
        """A request is done: its slot goes straight to the longest-waiting one, so nothing overtakes a waiter."""
        while self.waiting:
            slot = self.waiting.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.ongoing -= 1


class AdmissionGate:
    """ASGI middleware for the proxy: first come first served admission of each application's model requests
    (module docstring); anything else passes untouched."""

    REFRESH_S = 2.0  # how often the limits are re-read from Ray's KV store

    def __init__(self, app, read_limits=published_limits):
        self.app, self.read_limits = app, read_limits
        self.limits: list[Limits] = []
        self.read_at = float("-inf")
        self.lanes: dict[str, _Lane] = collections.defaultdict(_Lane)
        self.refused = None  # a Ray metrics Counter, made on the first refusal

    def _limits_for(self, scope) -> Optional[Limits]:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return None
        now = time.monotonic()
        if now - self.read_at > self.REFRESH_S:
            self.read_at = now
            try:
                self.limits = self.read_limits()
            except Exception:  # the KV store unreachable for a moment: keep the last limits
                pass
        path = scope.get("path", "")
        return next((lim for lim in self.limits if path.startswith(lim.prefix)), None)

    async def __call__(self, scope, receive, send):
        lim = self._limits_for(scope)
        if lim is None:
            return await self.app(scope, receive, send)
        lane = self.lanes[lim.prefix]
        client = tuple(scope["client"]) if lim.hold_early_retries and scope.get("client") else None
        early = lane.early_by(client, time.monotonic()) if client is not None else 0.0
        if early > 0:
            # A retry that ignored Retry-After is refused later, never admitted: the client cannot spin on
            # refusals, and every request admitted was decided as it arrived (its only wait is the queue's). Held
            # for the rest of its Retry-After and a random part of half more: clients refused in one burst do not
            # all come back at one moment (the graph would sit part empty between such waves).
            await asyncio.sleep(early + random.uniform(0.0, 0.5) * lim.retry_after_s)
            return await self._refuse(scope, send, lim)
        admitted = lane.try_enter(lim)
        if admitted is None:
            if client is not None:
                lane.told_to_retry(client, time.monotonic() + lim.retry_after_s)
            return await self._refuse(scope, send, lim)
        if not admitted:
            await lane.wait()
        await self._run_admitted(scope, receive, send, lane, lim)

    async def _run_admitted(self, scope, receive, send, lane: _Lane, lim: Limits) -> None:
        """The request in the graph, holding one of `lane`'s slots until its answer is out."""
        left = False

        def leave_once():
            nonlocal left
            if not left:
                left = True
                lane.leave()

        async def send_then_leave(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # The answer is out: the slot is free now. Serve's proxy returns a little later (its bookkeeping),
                # and by then the client may have sent its next request, which must not find its own slot taken.
                leave_once()

        try:
            scope, receive = await _body_in_scope(scope, receive, lim.max_body_bytes)
            await self.app(scope, receive, send_then_leave)
        finally:
            leave_once()

    async def _refuse(self, scope, send, lim: Limits) -> None:
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex
        retry = lim.retry_after()
        body = json.dumps(_overloaded_body(scope.get("path", ""), rid, retry)).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry.encode()), (b"x-request-id", rid.encode())]})
        await send({"type": "http.response.body", "body": body})
        self._count_refusal(scope.get("path", ""), lim.prefix)

    def _count_refusal(self, path: str, prefix: str) -> None:
        from kard_ray.serve.api import KNOWN_ROUTES

        if self.refused is None:
            from ray.util import metrics

            self.refused = metrics.Counter("kard_proxy_refused_requests", tag_keys=("route",),
                                           description="Model requests an HTTP proxy answered 503 over capacity.")
        route = "/v1/" + path[len(prefix):]
        self.refused.inc(tags={"route": route if route in KNOWN_ROUTES else "other"})


# The request body, read by the proxy and sent to the Ingress replica inside the ASGI scope. Otherwise the
# replica fetches it with a call back to the proxy (Serve's `receive_asgi_messages`) before the app can parse
# the request: one more round trip per request on the critical path. Measured on the 2-core machine, c=1
# against the demo run (timestamps at the proxy's and the Ingress's outermost middlewares, 150 requests):
# the Ingress spent 4.8 ms outside its three model calls with the fetch, 1.3 ms with the body in the scope.
BODY_SCOPE_KEY = "kard.body"


async def _body_in_scope(scope, receive, max_bytes: int):
    """(scope with the whole body under BODY_SCOPE_KEY, a receive that replays it) when the body declares a
    length of at most `max_bytes`; otherwise (scope, receive) unchanged."""
    declared = dict(scope.get("headers") or []).get(b"content-length", b"")
    if not declared.isdigit() or int(declared) > max_bytes:
        return scope, receive
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left before sending it all
            return scope, replayed([message], receive)
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    return {**scope, BODY_SCOPE_KEY: body}, replayed_body(body, receive)


def replayed_body(body: bytes, receive):
    """An ASGI receive that gives `body` as the whole request, then what `receive` gives apart from request
    messages (the same body arriving again through Serve's own transfer): the disconnect."""
    async def after_the_body():
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message

    return replayed([{"type": "http.request", "body": body, "more_body": False}], after_the_body)


def replayed(messages: list, receive):
    """An ASGI receive that gives `messages` first, then what `receive` gives."""
    async def receive_replayed():
        return messages.pop(0) if messages else await receive()

    return receive_replayed


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
