"""Building the Serve application from a run directory, and `kard-ray serve <run_dir>`.

Three ways in, one builder:

    serve run kard_ray.serve:build_app run_dir=runs/demo [serve.max_batch_size=16 ...]
    serve deploy configs/serve.yaml            (import_path kard_ray.serve:build_app, args {run_dir})
    kard-ray serve runs/demo [serve.port=8080 ...]    -> serve_run_dir()

The run's own `<run>/config.yaml` (written by the pipeline) is the configuration, so the service
retrieves, reranks and decodes exactly as the run's evaluation did; dotted overrides adjust the
`serve` section (or anything else) on top. Replica counts and resources come from
`cfg.serve.{retriever,reranker,generator,ingress}`; a Serve config YAML may override them per
deployment (it wins over code, and its `ray_actor_options` replaces the code's dict).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Optional

from kard_ray import io
from kard_ray.config import (AutoscalingConfig, ConfigError, KardConfig, config_from_dict, load_config,
                             resolve_local_paths)
from kard_ray.methods import METHODS, SERVABLE
from kard_ray.serve.api import Limits

APP_NAME = "kard"
DEPLOYMENTS = ("Retriever", "Reranker", "Generator", "Ingress")
STUDENT = METHODS["kard_bm25"].student  # both served methods use the KARD student
RERANKER = "reranker"


def load_run_config(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> KardConfig:
    """`<run_dir>/config.yaml` + dotted overrides; `run_dir` always points at the directory served
    (a run copied to object storage keeps its old `run_dir` inside config.yaml). Relative local paths come
    back absolute: replicas need not share this process's working directory."""
    run = io.RunDir(str(run_dir))
    overrides = [*overrides, f"run_dir={run.root}"]
    if not io.exists(run.config):
        raise ConfigError(f"{run.config} not found: is {run.root!r} a run directory written by `kard-ray distill`?")
    if not io.is_uri(run.config):
        return resolve_local_paths(load_config(run.config, overrides))
    import yaml

    try:
        values = yaml.safe_load(io.read_bytes(run.config)) or {}
        return resolve_local_paths(config_from_dict(values, overrides))
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{run.config}: {e}") from None


def served_method(run_dir: str) -> str:
    """kard_reranker when the run has a trained reranker, else kard_bm25 (both use the KARD student)."""
    run = io.RunDir(str(run_dir))
    if not io.exists(io.join(run.model(STUDENT), "config.json")):
        raise FileNotFoundError(f"{run.model(STUDENT)} has no trained student (config.json): run the pipeline with "
                                "method kard_bm25 or kard_reranker first")
    if not io.exists(run.bm25_index):
        raise FileNotFoundError(f"{run.bm25_index} not found: the run has no passage index (knowledge stage)")
    return "kard_reranker" if io.exists(run.model(RERANKER)) else "kard_bm25"


# The Ingress's bounds when the config leaves them null: one full generator batch in the graph per generator
# replica, and INGRESS_MAX_QUEUED waiting at each HTTP proxy (its AdmissionGate, first come first served).
# Measured with hey against the test-size demo run on 2 cores (bench/bench_serve.py --load-only --load-run and
# the same levels against `kard-ray serve`, 2026-12-07, the gate holding early retries), c=128 against c=8:
# 8 + 2: 200s/s 0.78-0.95x, p99 of the 200s 1.2-2.1x (seven runs); 8 + 4: 0.79-0.80x, 2.0-2.3x; 12 + 4: 0.83-0.95x,
# 1.8-2.3x; 16 + 1: 0.81x, 2.8x. More in the graph than one batch adds a batch's wait to the p99 (c=8 runs in
# lock step: its 8 requests share each batch). The earlier 32 + 8 answered every request up to c=32, but a request
# at c=128 waited behind 40 others: p99 5-7x c=8's.
INGRESS_MAX_QUEUED = 2


def ingress_bounds(cfg: KardConfig) -> tuple[int, int]:
    """(max_ongoing_requests per Ingress replica, max_queued_requests): `serve.ingress`'s, else a full
    generator batch (`serve.max_batch_size`) per generator replica, spread over the Ingress replicas, and
    INGRESS_MAX_QUEUED."""
    s = cfg.serve
    ongoing = s.ingress.max_ongoing_requests
    if ongoing is None:
        ongoing = math.ceil(s.max_batch_size * s.generator.max_replicas / s.ingress.max_replicas)
    queued = s.ingress.max_queued_requests
    return ongoing, INGRESS_MAX_QUEUED if queued is None else queued


def max_ongoing(scale: AutoscalingConfig, min_ongoing: int = 5) -> int:
    """A replica's max_ongoing_requests: the configured one, else headroom above the autoscaling target."""
    if scale.max_ongoing_requests is not None:
        return scale.max_ongoing_requests
    return max(min_ongoing, math.ceil(2 * scale.target_ongoing_requests))


def _options(cfg: KardConfig, scale: AutoscalingConfig, *, num_gpus: float = 0.0, min_ongoing: int = 5,
             ongoing: Optional[int] = None, queued: Optional[int] = None) -> dict:
    """Deployment options for one deployment from its `serve.<name>` section (`ongoing`/`queued`: the
    deployment's own defaults for null bounds)."""
    from ray.serve.config import BackpressureConfig

    if scale.max_ongoing_requests is not None or ongoing is None:
        ongoing = max_ongoing(scale, min_ongoing)
    if scale.max_queued_requests is not None:
        queued = scale.max_queued_requests
    elif queued is None:
        # Room for bursts: Serve counts a request as queued until a replica takes it, so a queue no
        # longer than max_ongoing refuses part of a burst the replicas could have taken.
        queued = 4 * ongoing
    return {
        "autoscaling_config": {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                               "target_ongoing_requests": scale.target_ongoing_requests,
                               "upscale_delay_s": scale.upscale_delay_s, "downscale_delay_s": scale.downscale_delay_s,
                               "metrics_interval_s": scale.metrics_interval_s,
                               "look_back_period_s": scale.look_back_period_s},
        "max_ongoing_requests": ongoing,
        # Bounded queues: past them a caller gets BackPressureError (the Ingress answers 503 JSON) or, at the
        # proxy, Serve's 503 (JSON through kard_ray.serve.proxy) - both with Retry-After - instead of waiting.
        "max_queued_requests": queued,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.serve.retry_after_s),
        "ray_actor_options": {"num_cpus": cfg.serve.num_cpus_per_replica, "num_gpus": num_gpus},
        # Let in-flight requests finish on shutdown / downscale (graceful): one full request budget.
        "graceful_shutdown_timeout_s": cfg.serve.request_timeout_s + 5.0,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }


def proxy_gated() -> bool:
    """Whether the HTTP proxies run kard_ray.serve.proxy's middlewares (the environment Ray was started with)."""
    from kard_ray.serve import proxy

    return os.environ.get(proxy.CALLBACK_ENV) == proxy.CALLBACK


def admission_limits(cfg: KardConfig):
    """What each HTTP proxy's AdmissionGate admits: the Ingress's capacity (kard_ray.serve.proxy)."""
    from kard_ray.serve.proxy import Limits

    s = cfg.serve
    ongoing, queued = ingress_bounds(cfg)
    return Limits(prefix=s.route_prefix.rstrip("/") + "/v1/", ongoing=ongoing * s.ingress.max_replicas,
                  queued=queued if queued >= 0 else 2**31, retry_after_s=s.retry_after_s,
                  max_body_bytes=s.max_body_bytes, hold_early_retries=s.hold_early_retries)


def deployment_options(cfg: KardConfig, method: str, gated: Optional[bool] = None) -> dict[str, dict]:
    """Options of each deployment, by name. `gated`: the proxies admit requests themselves (default:
    `proxy_gated()`); Serve's queue in front of the Ingress is then only a backstop, never the bound."""
    s = cfg.serve
    gated = proxy_gated() if gated is None else gated
    # The Ingress only awaits the others: many requests in flight per replica cost it little.
    # The Ingress's bound is the service's capacity: the requests the graph works on at once
    # (max_ongoing_requests per replica) plus the few waiting at the proxy (max_queued_requests).
    ongoing, queued = ingress_bounds(cfg)
    ingress = _options(cfg, s.ingress, ongoing=ongoing, queued=queued)
    # Downstream replicas take (by default) every request the Ingress admits, so a request waits inside a
    # replica (an asyncio wait for the model's lock or the next batch, free) rather than in the Ingress's
    # router for that deployment (which polls replicas for room while it waits).
    admitted = ingress["max_ongoing_requests"] * s.ingress.max_replicas
    if gated and ingress["max_queued_requests"] != -1:
        # A burst the gate admits is counted as queued by Serve's router until placed: room for all of it.
        limits = admission_limits(cfg)
        ingress["max_queued_requests"] = limits.ongoing + limits.queued
    out = {
        "Retriever": _options(cfg, s.retriever, min_ongoing=admitted),
        "Reranker": _options(cfg, s.reranker, min_ongoing=admitted),
        # Room for two full batches per replica at least, so the next batch fills while one runs.
        "Generator": _options(cfg, s.generator, num_gpus=s.generator_num_gpus,
                              min_ongoing=max(2 * s.max_batch_size, admitted)),
        "Ingress": ingress,
    }
    if not METHODS[method].rerank:
        # Bound (so one Serve config fits every run) but never called: no replica unless a config asks for one.
        out["Reranker"]["autoscaling_config"].update(min_replicas=0, max_replicas=1)
    return out


def app_from_config(cfg: KardConfig, run_dir: Optional[str] = None, method: Optional[str] = None):
    """The bound application: Ingress(Retriever, Reranker, Generator)."""
    from kard_ray.serve.deployments import Generator, Ingress, Reranker, Retriever

    run = io.RunDir(str(run_dir or cfg.run_dir))
    found = served_method(run.root)
    method = method or found
    if method not in SERVABLE:
        raise ConfigError(f"method: {method!r} cannot be served; choose one of {', '.join(SERVABLE)}")
    if method == "kard_reranker" and found != "kard_reranker":
        raise FileNotFoundError(f"method=kard_reranker but {run.model(RERANKER)} does not exist")
    gated = proxy_gated()
    opts = deployment_options(cfg, method, gated)
    retriever = Retriever.options(**opts["Retriever"]).bind(run.root, cfg)
    reranker = Reranker.options(**opts["Reranker"]).bind(run.model(RERANKER) if METHODS[method].rerank else None, cfg)
    generator = Generator.options(**opts["Generator"]).bind(run.model(METHODS[method].student), cfg)
    settings = {"method": method, "k": cfg.eval.k, "k_star": cfg.reranker.k_star, "limits": Limits.from_config(cfg.serve),
                "retry_after_s": cfg.serve.retry_after_s, "calls_by_value": cfg.serve.calls_by_value,
                # published by each Ingress replica where the proxies' gates read it (binding needs no Ray)
                "admission": admission_limits(cfg) if gated else None}
    return Ingress.options(**opts["Ingress"]).bind(retriever, reranker, generator, settings)


def _override_text(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def build_app(args: dict):
    """Serve application builder (`import_path: kard_ray.serve:build_app`).

    args: `run_dir` (required), optional `method` (kard_bm25 | kard_reranker; default: what the run
    has), `overrides` (a list of dotted overrides), and any other `dotted.key: value` as an override,
    so `serve run kard_ray.serve:build_app run_dir=runs/demo serve.max_batch_size=16` works.
    """
    args = dict(args or {})
    run_dir = args.pop("run_dir", None)
    if not run_dir:
        raise ConfigError("build_app: args.run_dir is required (the run directory to serve)")
    method = args.pop("method", None)
    overrides = args.pop("overrides", None) or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    overrides = [str(o) for o in overrides] + [_override_text(k, v) for k, v in args.items()]
    cfg = load_run_config(str(run_dir), overrides)
    return app_from_config(cfg, cfg.run_dir, method)


def start(cfg: KardConfig, run_dir: Optional[str] = None, *, name: str = APP_NAME, method: Optional[str] = None):
    """Start Serve's HTTP proxy on cfg.serve.host:port and deploy the app; returns its handle.

    Ray must already be initialised (`kard_ray.runtime.init_ray`, or a test's session).
    """
    from ray import serve

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              # The proxy's own timeout sits behind ours, so a slow request gets our 504 JSON.
                              "request_timeout_s": cfg.serve.request_timeout_s + 10.0})
    app = app_from_config(cfg, run_dir, method)
    return serve.run(app, name=name, route_prefix=cfg.serve.route_prefix)


class _Stop(Exception):
    """Raised in the main thread by the SIGTERM handler: leave whatever is running, shut down."""


def _raise_stop(signum, frame):
    raise _Stop()


def drain(timeout_s: float, name: str = APP_NAME, poll_s: float = 0.2) -> tuple[int, dict[str, int]]:
    """Stop admitting model requests on every Ingress replica and wait until none is in progress.

    Serve's shutdown stops the HTTP proxies as it stops the replicas, which would cut the
    connections of requests still running; so first every Ingress replica refuses new requests
    (503 draining + Retry-After, /readyz 503, so a load balancer moves away) and the requests it
    holds finish. Returns (requests in flight when the drain began, the last in-flight count per
    replica: all 0 unless the timeout hit).
    """
    from ray import serve

    handle = serve.get_deployment_handle("Ingress", app_name=name)
    deadline = time.monotonic() + timeout_s
    seen: dict[str, int] = {}
    first: Optional[int] = None
    while True:
        status = serve.status().applications.get(name)
        replicas = 0
        if status is not None and "Ingress" in status.deployments:
            replicas = sum(status.deployments["Ingress"].replica_states.values())
        # A call reaches one replica (Serve routes it); a few per replica reach them all.
        for _ in range(max(1, 2 * replicas)):
            try:
                rid, n = handle.drain.remote().result(timeout_s=max(0.5, deadline - time.monotonic()))
                seen[rid] = n
            except Exception as e:  # an Ingress that is gone has nothing in flight
                print(f"[serve] drain: {e!r}", flush=True)
                return first or 0, seen
        if first is None:
            first = sum(seen.values())
        if (len(seen) >= replicas and not any(seen.values())) or time.monotonic() > deadline:
            return first, seen
        time.sleep(poll_s)


def serve_run_dir(run_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """`kard-ray serve <run_dir>`: serve the run until Ctrl-C or SIGTERM, then shut down gracefully:
    new requests are refused (503 + Retry-After) while the in-flight ones finish (`drain`, at most
    serve.drain_timeout_s), then Serve shuts down."""
    from ray import serve

    from kard_ray.runtime import init_ray

    from kard_ray.serve import proxy

    cfg = load_run_config(run_dir, list(overrides))
    method = served_method(cfg.run_dir)
    # Before Ray starts, so the HTTP proxy it spawns admits requests through kard_ray.serve.proxy's gate and
    # calls the Ingress by value (a Ray cluster joined here keeps the environment its nodes were started with).
    proxy.set_proxy_environment(cfg.serve.calls_by_value)
    init_ray(cfg)
    # After ray.init (which installs its own SIGTERM handler) and before deploying, so a SIGTERM at
    # any point from here on - even mid-deploy - ends in serve.shutdown(), like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    deployed = False
    try:
        start(cfg, cfg.run_dir, method=method)
        deployed = True
        base = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
        print(f"[serve] {cfg.run_dir} ({method}) at {base}/v1/answer (also /v1/chat/completions, /v1/rerank) - "
              f"docs {base}/docs - metrics {_metrics_url()} - Ctrl-C to stop", flush=True)
        while True:  # until Ctrl-C or SIGTERM interrupts the sleep
            time.sleep(3600)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if deployed:
            t0 = time.monotonic()
            print("[serve] draining: new requests get 503, in-flight requests finish", flush=True)
            first, left = drain(cfg.serve.drain_timeout_s)
            print(f"[serve] drained {first} in-flight requests in {time.monotonic() - t0:.1f}s "
                  f"(left per Ingress replica: {left})", flush=True)
        print("[serve] shutting down", flush=True)
        serve.shutdown()
        print("[serve] stopped", flush=True)


def _metrics_url() -> str:
    """Where this node's Prometheus metrics (Serve's and the Ingress's kard_* ones) are scraped."""
    import ray

    try:
        me = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == me)
        return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:  # pragma: no cover - informational only
        return "the Ray node's metrics export port"
