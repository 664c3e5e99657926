"""Serving: the Serve graph (HTTP -> Ingress -> Retriever -> Reranker -> Generator, `kard_ray.serve.start`)
vs calling the same three components in-process.

    python bench/bench_serve.py [--concurrency 1,8,32] [--requests-per-client 6] [--data DIR] [--smoke]

Both sides answer the same StrategyQA test questions with the same objects the deployments wrap:
`knowledge.Retriever` (BM25, `--candidates` hits by question + options), `training.reranker.Reranker`
(a tiny cross-encoder: top `k` = 1 of the candidates) and `evaluation.StudentGenerator` (a tiny T5,
greedy, `--max-new-tokens`). The in-process side is the Ingress's logic without Ray: each request
runs retrieve -> rerank -> generate, model calls in worker threads one at a time per component (the
deployments' locks), and the generator batches concurrent requests with the Generator's own batcher
(`kard_ray.inference.batching.DynamicBatcher`: `serve.max_batch_size`; the `serve.batch_wait_timeout_s` window held
open only while other requests are in retrieval or reranking). Clients are closed loops: `c` clients each
send their next request when the last one returns (Serve: JSON over HTTP with httpx; in-process: a
coroutine call). Thread budget: one torch thread per component on both sides.

Figures per concurrency: p50/p99 latency and requests/s each side; overhead = Serve p50 - in-process p50.
Then the floor under that overhead: one Serve hop between two trivial deployments, back to back and after
100 ms idle (`hop_floor`); a c=1 request crosses four.
Last line: `RATIO serve <in-process p50 / Serve p50 at concurrency 1>` (higher is better, 1.0 = no
overhead); the target is on the overhead: p50 overhead <= 15 ms per request.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time

import common

from kard_ray.inference.batching import DynamicBatcher


def _locked(lock: threading.Lock, fn, *a):
    with lock:
        return fn(*a)


class InProcess:
    """The three components in this process, chained like the Ingress chains the deployments."""

    def __init__(self, cfg, run_root: str):
        from kard_ray.inference.generator import StudentGenerator
        from kard_ray.io import RunDir
        from kard_ray.knowledge import Retriever
        from kard_ray.inference.reranker import Reranker

        run = RunDir(run_root)
        e = cfg.eval
        self.retriever = Retriever.from_run_dir(run.root, cfg.knowledge, num_threads=1)
        self.reranker = Reranker.from_dir(run.model("reranker"), max_length=cfg.reranker.max_length, device="cpu")
        self.student = StudentGenerator(
            run.model("student_kard"), cfg.data.dataset, max_new_tokens=e.max_new_tokens, decoding=e.decoding,
            n_votes=e.n_votes, temperature=e.temperature, max_source_length=cfg.student.max_source_length,
            score_by=e.score_by, seed=cfg.seed, device="cpu")
        self.k, self.k_star = cfg.eval.k, cfg.reranker.k_star
        self.locks = [threading.Lock() for _ in range(3)]
        self.upstream = 0  # requests in retrieval or reranking, as the Ingress counts them
        self.batcher = DynamicBatcher(self._predict, cfg.serve.max_batch_size, cfg.serve.batch_wait_timeout_s)

    async def _predict(self, items):
        return await asyncio.to_thread(_locked, self.locks[2], self.student.predict, [q for q, _, _ in items],
                                       [o for _, o, _ in items], [p for _, _, p in items])

    async def answer(self, question: str, options: list[str]) -> dict:
        from kard_ray.inference.formats import question_query
        from kard_ray.knowledge import format_passage
        from kard_ray.serve.deployments import top_k

        query = question_query(question, options)
        t0 = time.perf_counter()
        self.upstream += 1
        try:
            found = (await asyncio.to_thread(_locked, self.locks[0], self.retriever.search, [query], self.k_star))[0]
            t1 = time.perf_counter()
            texts = [format_passage(p.get("title"), p["text"]) for p in found]
            scores = await asyncio.to_thread(_locked, self.locks[1], self.reranker.rerank, query, texts)
        finally:
            self.upstream -= 1
        passages = [found[i] for i in top_k(scores, self.k)]
        t2 = time.perf_counter()
        pred = await self.batcher.submit((question, list(options), [format_passage(p.get("title"), p["text"])
                                                                      for p in passages]), self.upstream)
        t3 = time.perf_counter()
        return {"generation": pred.generation, "answer_index": pred.pred_index,
                "timings_ms": {"retrieve": 1000 * (t1 - t0), "rerank": 1000 * (t2 - t1), "generate": 1000 * (t3 - t2)}}


async def closed_loop(call, requests: list[dict], clients: int, per_client: int) -> tuple[list[float], float, list]:
    """`clients` clients, each sending `per_client` requests back to back; (latencies s, wall s, answers)."""
    lat: list[float] = []
    answers: list = [None] * (clients * per_client)

    async def client(c: int):
        for j in range(per_client):
            i = c * per_client + j
            req = requests[i % len(requests)]
            t0 = time.perf_counter()
            answers[i] = await call(req)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return lat, time.perf_counter() - t0, answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hop_floor(rep, calls: int, idle_s: float = 0.1) -> dict:
    """What one Serve hop costs before any model code: median ms of a call between two trivial
    deployments (by value, as the Ingress calls its deployments), back to back and after `idle_s` of
    idle -- a c=1 request reaches each replica ~100 ms after that replica's last turn, and crosses four
    such hops (proxy -> Ingress, then Retriever, Reranker and Generator)."""
    import statistics

    from ray import serve

    # Defined here, not at module level: pickled by value, so replicas need not import this file.
    @serve.deployment(name="HopEcho", ray_actor_options={"num_cpus": 0.01})
    class Echo:
        async def ping(self) -> None:
            return None

    @serve.deployment(name="HopCaller", ray_actor_options={"num_cpus": 0.01})
    class Caller:
        def __init__(self, echo):
            self.echo = echo.options(_by_reference=False)

        async def run(self, n: int, gap_s: float) -> float:
            ts = []
            for _ in range(n):
                if gap_s:
                    await asyncio.sleep(gap_s)
                t0 = time.perf_counter()
                await self.echo.ping.remote()
                ts.append(1000 * (time.perf_counter() - t0))
            return statistics.median(ts)

    h = serve.run(Caller.bind(Echo.bind()), name="hop_floor", route_prefix=None)
    try:
        h.run.remote(5, 0.0).result()  # warm-up
        out = {"warm_ms": h.run.remote(calls, 0.0).result(), "idle_ms": h.run.remote(calls, idle_s).result()}
    finally:
        serve.delete("hop_floor")
    rep.fig(f"Serve hop between trivial deployments: back to back / after {idle_s * 1000:.0f} ms idle",
            f"{out['warm_ms']:.2f} / {out['idle_ms']:.2f}", "ms")
    rep.data["hop_floor_ms"] = out
    return out


# (concurrency, requests): the table, but c=8 with 480 requests instead of 160, so that the level the
# overload ratios divide by is measured over ~13 s like c=128, not ~5 s: its 200s/s moved 21.5-36.7 over twelve runs
# on 2026-12-07 with 160
LOAD_LEVELS = ((1, 100), (8, 480), (32, 640), (128, 2560))


def load_table(rep, run_dir: str, levels=LOAD_LEVELS, overrides=(), pairs: int = 3) -> dict:
    """`kard-ray serve <run_dir>` under `hey` (one valid /v1/answer body, bounded request counts), one
    row per concurrency: requests/s, p50 and p99 of the 200s, status codes; then the overload checks, on the medians
    of `pairs` runs of the best lower level and the top one, back to back (the table's own pair first): one ~13 s run
    of a level moves by +-20% here, as its per-second 200s do."""
    import httpx

    from kard_ray import io
    from kard_ray.serve import load_run_config, start
    from kard_ray.serve.load import run_hey

    from ray import serve

    port = free_port()
    cfg = load_run_config(run_dir, [f"serve.port={port}", *overrides])
    q = io.read_table(io.RunDir(cfg.run_dir).questions("test")).to_pylist()[0]
    body = {"question": q["question"], "options": list(q["options"])}
    url = f"http://127.0.0.1:{port}/v1/answer"
    rows, refusals = {}, []
    start(cfg, cfg.run_dir)
    try:
        run_hey(url, body, concurrency=8, requests=40)  # warm-up
        for c, n in levels:
            r = run_hey(url, body, concurrency=c, requests=n)
            rows[c] = r
            rep.fig(f"load c={c}: requests/s (200s) / p50 / p99 / codes",
                    f"{r.ok_rps:.1f} / {r.ok_pct(50):.2f} s / {r.ok_pct(99):.2f} s / "
                    + ", ".join(f"{v} x {k}" for k, v in r.codes.items()) + (f", {r.failed} failed" if r.failed else ""))
        top, requests = max(levels)
        peak_c = max((c for c in rows if c < top), key=lambda c: rows[c].ok_rps)
        runs = [(rows[peak_c], rows[top])]
        for _ in range(pairs - 1):
            runs.append((run_hey(url, body, concurrency=peak_c, requests=dict(levels)[peak_c]),
                         run_hey(url, body, concurrency=top, requests=requests)))
        # what a refused request carries (during one more overload burst)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            flood = ex.submit(run_hey, url, body, concurrency=128, requests=1000)
            while not flood.done() and len(refusals) < 3:
                with httpx.Client(timeout=60) as side:  # a new connection each time: none is an early retry
                    resp = side.post(url, json=body)
                if resp.status_code != 200:
                    kind = resp.json().get("error") if resp.headers.get("content-type", "").startswith(
                        "application/json") else f"non-JSON body {resp.text[:40]!r}"
                    refusals.append((resp.status_code, resp.headers.get("retry-after"), kind))
            flood.result()
    finally:
        serve.shutdown()
    med = statistics.median
    checks = {
        "throughput_ratio": med([o.ok_rps for _, o in runs]) / med([p.ok_rps for p, _ in runs]),
        "p99_ratio": med([o.ok_pct(99) for _, o in runs]) / med([p.ok_pct(99) for p, _ in runs]),
        "pairs": [{"peak_ok_rps": round(p.ok_rps, 2), "top_ok_rps": round(o.ok_rps, 2), "peak_p99_s": round(p.ok_pct(99), 3),
                   "top_p99_s": round(o.ok_pct(99), 3)} for p, o in runs],
        "non_200_are_503": all(set(o.codes) <= {200, 503} and o.failed == 0 for _, o in runs),
        "refusals": refusals,
    }
    rep.fig(f"load c={peak_c} / c={top}, {len(runs)} runs each, 200s/s", " ; ".join(
        f"{p.ok_rps:.1f} / {o.ok_rps:.1f}" for p, o in runs))
    rep.fig(f"load c={top}: 200s/s vs best lower (c={peak_c}), medians", f"{checks['throughput_ratio']:.2f}x (target >= 0.9x)")
    rep.fig(f"load c={top}: p99 of 200s vs p99 at c={peak_c}, medians", f"{checks['p99_ratio']:.2f}x (target <= 2x)")
    rep.fig(f"load c={top}: every non-200 a 503", str(checks["non_200_are_503"]))
    rep.fig("a refused request: status / Retry-After / error", "; ".join(f"{a} / {b} / {e}" for a, b, e in refusals) or "none seen")
    rep.data["load"] = {"run_dir": run_dir, "rows": {c: r.row() for c, r in rows.items()},
                        "peak_concurrency": peak_c, **checks}
    return checks


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--load-run", default=None,
                   help="also put this run directory (e.g. runs/demo) under `hey` at c=1/8/32/128: the overload table")
    p.add_argument("--load-only", action="store_true", help="only the --load-run table")
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="requests each client sends per timed run (default: 16 at c=1, 4 at c=8, 2 at c=32)")
    p.add_argument("--candidates", type=int, default=10, help="BM25 candidates handed to the reranker (k*)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-source", type=int, default=256)
    p.add_argument("overrides", nargs="*", help="extra config overrides for both sides, e.g. serve.max_batch_size=16")
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.requests_per_client, args.max_new_tokens, args.candidates = "1,4", 2, 4, 4
    repeats = args.repeats or (1 if args.smoke else 3)
    levels = [int(c) for c in args.concurrency.split(",")]
    data = common.data_dir(args.data, (common.PASSAGES_FILE, "train.jsonl", "test.jsonl"))
    rep = common.Report("serve", args)
    from kard_ray.serve import proxy

    # Before Ray starts, so its HTTP proxy runs the admission gate and calls the Ingress by value (as
    # `kard-ray serve` sets up with the default serve.calls_by_value).
    proxy.set_proxy_environment()
    if args.load_only:
        if not args.load_run:
            p.error("--load-only needs --load-run RUN_DIR")
        started = common.ray_init()
        try:
            checks = load_table(rep, args.load_run, overrides=args.overrides)
        finally:
            if started:
                import ray

                ray.shutdown()
        rep.finish(checks["throughput_ratio"], target=None, ratio_label="c=128 200s/s / best lower-concurrency 200s/s")
        return rep.data

    import httpx

    from kard_ray import io
    from kard_ray.config import load_config

    common.set_threads(1)
    root = common.bench_run(args, data)
    questions = io.read_table(io.RunDir(root).questions("test")).to_pylist()
    requests = [{"question": q["question"], "options": q["options"]} for q in questions[:64]]
    port = free_port()
    cfg = load_config(None, [
        "data.dataset=strategyqa", f"data.train_path={data / 'train.jsonl'}", f"run_dir={root}",
        f"student.max_source_length={args.max_source}", f"eval.max_new_tokens={args.max_new_tokens}", "eval.k=1",
        "eval.decoding=greedy", f"reranker.k_star={args.candidates}", f"serve.port={port}", "serve.max_batch_size=8",
        "serve.batch_wait_timeout_s=0.01", "serve.request_timeout_s=120",
        # Unbounded like the in-process side's queue: this compares per-request overhead at each concurrency,
        # none of them refused (--concurrency may exceed the service's capacity); overload is --load-run's table.
        "serve.ingress.max_queued_requests=-1", *args.overrides])
    if args.overrides:
        rep.fig("config overrides", " ".join(args.overrides))
    rep.fig("graph", "Retriever (BM25) -> Reranker (tiny cross-encoder) -> Generator (tiny T5, dynamic batches of up "
                     f"to {cfg.serve.max_batch_size})")
    rep.fig("candidates / k / max new tokens", f"{args.candidates} / 1 / {args.max_new_tokens}")
    rep.fig("replicas", "1 each, num_cpus 0.25 (serve defaults)")

    def per_client(c: int) -> int:
        return args.requests_per_client or (16 if c == 1 else 4 if c <= 8 else 2)

    # Both sides live side by side and are timed in alternation (in-process, Serve, in-process, ...),
    # so a change in machine load hits both alike; the idle side costs next to nothing meanwhile.
    from ray import serve

    from kard_ray.serve import start

    local = InProcess(cfg, root)
    started = common.ray_init()
    try:
        t0 = time.perf_counter()
        start(cfg, root, method="kard_reranker")
        rep.fig("serve deploy time", time.perf_counter() - t0, "s")
        url = f"http://127.0.0.1:{port}/v1/answer"

        async def run_both():
            runs = {"local": {c: [] for c in levels}, "serve": {c: [] for c in levels}}
            limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
            async with httpx.AsyncClient(timeout=180.0, limits=limits) as client:
                async def via_http(r):
                    resp = await client.post(url, json={**r, "return_passages": False})
                    if resp.status_code != 200:
                        raise RuntimeError(f"Serve answered {resp.status_code}: {resp.text[:300]}")
                    body = resp.json()
                    return {"generation": body["generation"], "answer_index": body["answer_index"],
                            "timings_ms": body["timings_ms"]}  # measured inside the Ingress, per hop

                def in_process(r):
                    return local.answer(r["question"], r["options"])

                calls = {"local": in_process, "serve": via_http}
                for call in calls.values():  # warm-up: connections, first model calls, batcher start
                    await closed_loop(call, requests, 2, 2)
                for c in levels:
                    for _ in range(repeats):
                        for side, call in calls.items():
                            runs[side][c].append(await closed_loop(call, requests, c, per_client(c)))
            local.batcher.close()
            return runs

        both = asyncio.run(run_both())
        floor = hop_floor(rep, calls=5 if args.smoke else 60)  # the live app idle beside it, as in a c=1 gap
        serve.shutdown()
        if args.load_run:  # a fresh Serve (its own port) for the overload table
            load_table(rep, args.load_run)
    finally:
        serve.shutdown()
        if started:
            import ray

            ray.shutdown()
    local_runs, serve_runs = both["local"], both["serve"]

    # -- figures
    series = {}
    ratio = float("nan")
    for c in levels:
        row = {}
        for side, runs in (("local", local_runs[c]), ("serve", serve_runs[c])):
            row[f"{side}_p50_ms"] = 1000 * common.median([common.pct(lat, 50) for lat, _, _ in runs])
            row[f"{side}_p99_ms"] = 1000 * common.median([common.pct(lat, 99) for lat, _, _ in runs])
            row[f"{side}_rps"] = common.median([len(lat) / wall for lat, wall, _ in runs])
        row["p50_overhead_ms"] = row["serve_p50_ms"] - row["local_p50_ms"]
        series[c] = row
        rep.fig(f"c={c}: p50 ms in-process / Serve", f"{row['local_p50_ms']:.1f} / {row['serve_p50_ms']:.1f}", "ms")
        rep.fig(f"c={c}: p99 ms in-process / Serve", f"{row['local_p99_ms']:.1f} / {row['serve_p99_ms']:.1f}", "ms")
        rep.fig(f"c={c}: requests/s in-process / Serve", f"{row['local_rps']:.2f} / {row['serve_rps']:.2f}", "req/s")
        rep.fig(f"c={c}: p50 overhead (Serve - in-process)", row["p50_overhead_ms"], "ms")
    rep.data["series"] = series
    # where a request's time goes at the first concurrency level: each stage as the caller sees it
    # (Serve: measured in the Ingress around each handle call; in-process: around each call), and
    # the rest (Serve: HTTP client + proxy + Ingress; in-process: the coroutine chain)
    c0 = levels[0]
    for side, runs in (("in-process", local_runs[c0]), ("Serve", serve_runs[c0])):
        answers = [a for _, _, ans in runs for a in ans]
        lat = [l for lat, _, _ in runs for l in lat]
        stages = {st: common.median([a["timings_ms"][st] for a in answers]) for st in ("retrieve", "rerank", "generate")}
        rest = common.median(lat) * 1000 - sum(stages.values())
        rep.fig(f"c={c0} {side}: median ms retrieve / rerank / generate / rest",
                " / ".join(f"{v:.1f}" for v in [*stages.values(), rest]), "ms")
        rep.data.setdefault("breakdown_ms", {})[side] = {**stages, "rest": rest}
    # like for like: the same answers for the same questions (greedy, same models)
    a = [x["generation"] for x in serve_runs[levels[0]][0][2]]
    b = [x["generation"] for x in local_runs[levels[0]][0][2]]
    rep.fig("identical answers Serve vs in-process (first run)", f"{sum(x == y for x, y in zip(a, b))}/{len(b)}")
    first = series[levels[0]]
    ratio = first["local_p50_ms"] / first["serve_p50_ms"]
    rep.data["overhead_target_ms"] = 15.0
    rep.data["overhead_met"] = first["p50_overhead_ms"] <= 15.0
    rep.note(f"target: p50 overhead <= 15 ms per request; measured {first['p50_overhead_ms']:.1f} ms at c={levels[0]}")
    rep.note(f"four Serve hops after idle cost {4 * floor['idle_ms']:.1f} ms between trivial deployments here "
             f"({4 * floor['warm_ms']:.1f} ms back to back): the floor of the c=1 overhead before any KARD code")
    rep.finish(ratio, target=None, ratio_label="in-process p50 / Serve p50 (c=1)",
               extra_ratios={f"c={c}: Serve req/s / in-process req/s": round(series[c]["serve_rps"] / series[c]["local_rps"], 3)
                             for c in levels})
    return rep.data


if __name__ == "__main__":
    main()
