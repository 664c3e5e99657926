"""The served student, end to end: a run directory produced by the real pipeline, served with Ray
Serve on the test session's local Ray, and real HTTP requests to 127.0.0.1.

Checked: the response schema; answers, rationales and passages equal to the evaluation stage's
predictions (both methods); every bad-input case with its status and named field; a 504 for a blown
time budget; health, readiness and OpenAPI; a bounded concurrent load with zero 5xx (p50/p99 and
requests/s printed); `kard-ray serve` shutting down gracefully on SIGTERM.

One app instance serves every test (one `serve.run` costs ~7-15 s here); the extra Ingress-only apps
(kard_bm25, tight timeout) reuse its model deployments through their handles.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kard_ray import io

REPO = Path(__file__).resolve().parents[1]
PORT = 8123
BASE = f"http://127.0.0.1:{PORT}"

@pytest.fixture(scope="module")
def tiny_run(demo_run) -> str:
    """The finished test-size demo run (conftest.demo_run: RD, KARD-BM25, KARD-reranker); its directory."""
    cfg, _ = demo_run
    run = io.RunDir(cfg.run_dir)
    for method in ("kard_bm25", "kard_reranker"):
        assert io.exists(run.path("eval", "predictions", method))
    return cfg.run_dir


@pytest.fixture(scope="module")
def served(tiny_run):
    """The run served on 127.0.0.1:PORT (one app for the module); Serve shut down at the end."""
    from ray import serve

    from kard_ray.serve import load_run_config, start

    cfg = load_run_config(tiny_run, [f"serve.port={PORT}", "serve.request_timeout_s=20"])
    t0 = time.time()
    start(cfg)
    print(f"\nserve.run took {time.time() - t0:.1f}s")
    yield cfg
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import httpx

    with httpx.Client(base_url=BASE, timeout=60) as c:
        yield c


def _test_questions(run_dir: str) -> list[dict]:
    return io.read_table(io.RunDir(run_dir).questions("test")).to_pylist()


def _offline(run_dir: str, method: str) -> dict[str, dict]:
    rows = io.read_table(io.RunDir(run_dir).path("eval", "predictions", method)).to_pylist()
    return {r["question_id"]: r for r in rows}


def _ingress_only_app(name: str, route_prefix: str, method: str, **limits):
    """A second app whose Ingress reuses the main app's model deployments (no second model load)."""
    from ray import serve

    from kard_ray.serve import APP_NAME
    from kard_ray.serve.api import Limits
    from kard_ray.serve.deployments import Ingress

    handles = [serve.get_deployment_handle(n, app_name=APP_NAME) for n in ("Retriever", "Reranker", "Generator")]
    settings = {"method": method, "k": 1, "k_star": 20, "limits": Limits(**limits)}
    serve.run(Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1}).bind(*handles, settings),
              name=name, route_prefix=route_prefix)


def _check_schema(body: dict, options: list[str]) -> None:
    assert set(body) == {"answer_index", "answer_letter", "answer_text", "rationale", "generation", "method",
                         "passages", "timings_ms"}
    assert isinstance(body["answer_index"], int) and -1 <= body["answer_index"] < len(options)
    if body["answer_index"] >= 0:
        assert body["answer_letter"] == "ABCDEFGHIJ"[body["answer_index"]]
        assert body["answer_text"] == options[body["answer_index"]]
    else:
        assert body["answer_letter"] is None and body["answer_text"] is None
    assert isinstance(body["rationale"], str) and isinstance(body["generation"], str)
    for p in body["passages"]:
        assert set(p) == {"id", "title", "text", "score"} and isinstance(p["score"], float)
    assert set(body["timings_ms"]) == {"retrieve", "rerank", "generate"}
    assert body["timings_ms"]["retrieve"] > 0 and body["timings_ms"]["generate"] > 0


# ------------------------------------------------------------------------------------------------
# answers equal offline evaluation


@pytest.mark.slow
@pytest.mark.timeout(3000)  # may build the shared demo run (conftest.demo_run)
def test_answers_equal_offline_predictions_kard_reranker(tiny_run, served, client):
    from kard_ray.serve.api import split_rationale

    offline = _offline(tiny_run, "kard_reranker")
    questions = _test_questions(tiny_run)
    assert len(questions) == len(offline) > 0  # every test question was evaluated offline
    generations = set()
    for q in questions:
        r = client.post("/v1/answer", json={"question": q["question"], "options": list(q["options"])})
        assert r.status_code == 200, r.text
        body = r.json()
        _check_schema(body, list(q["options"]))
        want = offline[q["id"]]
        assert body["method"] == "kard_reranker"
        assert body["timings_ms"]["rerank"] > 0
        assert [p["id"] for p in body["passages"]] == list(want["passage_ids"]), q["id"]
        assert len(body["passages"]) == served.eval.k
        assert body["generation"] == want["generation"], q["id"]
        assert body["answer_index"] == want["pred_index"], q["id"]
        assert body["rationale"] == split_rationale(want["generation"])
        generations.add(body["generation"])
    # the comparison means something only when the student's output depends on its input
    assert len(generations) >= 3, generations


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_answers_equal_offline_predictions_kard_bm25(tiny_run, served, client):
    _ingress_only_app("kard-bm25", "/bm25", "kard_bm25", request_timeout_s=20)
    offline = _offline(tiny_run, "kard_bm25")
    for q in _test_questions(tiny_run):
        r = client.post("/bm25/v1/answer", json={"question": q["question"], "options": list(q["options"])})
        assert r.status_code == 200, r.text
        body = r.json()
        _check_schema(body, list(q["options"]))
        want = offline[q["id"]]
        assert body["method"] == "kard_bm25" and body["timings_ms"]["rerank"] is None
        assert [p["id"] for p in body["passages"]] == list(want["passage_ids"])
        assert (body["generation"], body["answer_index"]) == (want["generation"], want["pred_index"]), q["id"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_retrieve_returns_the_passages_answer_uses(tiny_run, served, client):
    from kard_ray.evaluation.evaluate import question_query

    q = _test_questions(tiny_run)[0]
    req = {"question": q["question"], "options": list(q["options"])}
    ret = client.post("/v1/retrieve", json=req).json()
    ans = client.post("/v1/answer", json=req).json()
    assert ret["method"] == "kard_reranker" and ret["query"] == question_query(q["question"], q["options"])
    assert ret["passages"] == ans["passages"]
    # k and candidates: more passages, from a deeper candidate list
    deep = client.post("/v1/retrieve", json={**req, "k": 3, "candidates": 5}).json()
    assert len(deep["passages"]) == 3
    scores = [p["score"] for p in deep["passages"]]
    assert scores == sorted(scores, reverse=True)
    # return_passages=false keeps the answer, drops the passages
    lean = client.post("/v1/answer", json={**req, "return_passages": False}).json()
    assert lean["passages"] == [] and lean["generation"] == ans["generation"]


# ------------------------------------------------------------------------------------------------
# operations


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_health_readiness_docs_and_deployments(served, client):
    import yaml
    from ray import serve

    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    info = ready.json()
    assert info["status"] == "ready" and info["method"] == "kard_reranker"
    assert info["retriever"]["passages"] > 0 and info["reranker"]["reranker"] is True
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["components"]["schemas"]["AnswerRequest"]["properties"]["options"]["maxItems"] == served.serve.max_options

    # the running app has exactly the deployments the Serve config files name
    status = serve.status().applications["kard"]
    assert status.status == "RUNNING"
    names = set(status.deployments)
    for path in (REPO / "configs" / "serve.yaml", REPO / "cluster" / "serve_config.yaml"):
        (app,) = yaml.safe_load(path.read_text())["applications"]
        assert {d["name"] for d in app["deployments"]} == names, path


def _bad_requests(q: dict) -> list[tuple[str, dict, int, str]]:
    """(case, httpx request kwargs, expected status, expected field)."""
    good = {"question": q["question"], "options": list(q["options"])}
    return [
        ("empty question", {"json": {**good, "question": ""}}, 422, "question"),
        ("blank question", {"json": {**good, "question": "  \t "}}, 422, "question"),
        ("missing question", {"json": {"options": good["options"]}}, 422, "question"),
        ("one option", {"json": {**good, "options": ["salt"]}}, 422, "options"),
        ("no options", {"json": {**good, "options": []}}, 422, "options"),
        ("too many options", {"json": {**good, "options": [f"o{i}" for i in range(9)]}}, 422, "options"),
        ("blank option", {"json": {**good, "options": ["salt", " "]}}, 422, "options[1]"),
        ("options not a list", {"json": {**good, "options": "salt, tin"}}, 422, "options"),
        ("k zero", {"json": {**good, "k": 0}}, 422, "k"),
        ("k too large", {"json": {**good, "k": 33}}, 422, "k"),
        ("candidates too large", {"json": {**good, "candidates": 5000}}, 422, "candidates"),
        ("unknown field", {"json": {**good, "temperature": 2}}, 422, "temperature"),
        ("invalid JSON", {"content": b'{"question": "x", ', "headers": {"content-type": "application/json"}}, 422, "body"),
        ("body not an object", {"json": ["a", "b"]}, 422, "body"),
        ("oversized body", {"json": {**good, "question": "x" * (70 * 1024)}}, 413, "body"),
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_input_answered_4xx_with_json_naming_the_field(tiny_run, served, client):
    q = _test_questions(tiny_run)[0]
    for case, kwargs, status, field in _bad_requests(q):
        for path in ("/v1/answer", "/v1/retrieve"):
            r = client.post(path, **kwargs)
            assert r.status_code == status, (case, path, r.text)
            body = r.json()
            assert body["field"] == field and body["error"] and body["message"], (case, body)
            assert "Traceback" not in r.text and 'File "' not in r.text, case

    # a chunked body (no Content-Length) over the limit is refused while it streams in
    def chunks():
        yield b'{"question": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'", "options": ["a", "b"]}'

    r = client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["field"]) == (413, "body")
    assert client.get("/v1/nope").status_code == 404 and client.get("/v1/nope").json()["error"] == "not_found"
    assert client.get("/v1/answer").status_code == 405


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_blown_time_budget_is_a_504(tiny_run, served, client):
    _ingress_only_app("kard-tight", "/tight", "kard_reranker", request_timeout_s=0.001)
    q = _test_questions(tiny_run)[0]
    r = client.post("/tight/v1/answer", json={"question": q["question"], "options": list(q["options"])})
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["error"] == "timeout" and "0.001" in body["message"] and "Traceback" not in r.text
    assert client.get("/tight/readyz").status_code == 503  # nothing answers within the budget
    # the main app is unaffected
    assert client.post("/v1/answer", json={"question": q["question"], "options": list(q["options"])}).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bounded_concurrent_load_has_no_5xx(tiny_run, served, client):
    import httpx

    questions = _test_questions(tiny_run)
    n, concurrency = 200, 16
    latencies: list[float] = []
    statuses: list[int] = []

    async def load() -> float:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=BASE, timeout=120, limits=limits) as ac:
            async def one(i: int) -> None:
                q = questions[i % len(questions)]
                async with sem:
                    t0 = time.perf_counter()
                    r = await ac.post("/v1/answer", json={"question": q["question"], "options": list(q["options"])})
                    latencies.append(time.perf_counter() - t0)
                    statuses.append(r.status_code)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return time.perf_counter() - t0

    before = client.get("/readyz").json()["generator"]
    elapsed = asyncio.run(load())
    after = client.get("/readyz").json()["generator"]
    p50, p99 = (1000 * float(np.percentile(latencies, p)) for p in (50, 99))
    batches = after["batches"] - before["batches"]
    print(f"\n[serve load] {n} requests, {concurrency} concurrent: p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
          f"{n / elapsed:.1f} requests/s; generator batches {batches} (mean {n / max(batches, 1):.2f} requests/batch); "
          f"statuses {dict(zip(*np.unique(statuses, return_counts=True)))}")
    assert len(statuses) == n
    assert not [s for s in statuses if s >= 500]
    assert all(s == 200 for s in statuses)
    assert batches < n  # concurrent requests shared generate() calls (@serve.batch)


# ------------------------------------------------------------------------------------------------
# the CLI (last: it takes over Serve in the shared cluster)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kard_ray_serve_cli_serves_and_stops_gracefully_on_sigterm(tiny_run, ray_session):
    import httpx
    from ray import serve

    # Last in the module: the module's app (if any) is done; the CLI deploys its own app `kard`
    # into the same cluster, with its own HTTP port.
    serve.shutdown()
    port = PORT + 1
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "KARD_PRINT_RESULTS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "kard_ray.cli", "serve", tiny_run, f"serve.port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not any(l.startswith("[serve]") for l in lines):
            time.sleep(0.5)
        assert any(l.startswith("[serve]") for l in lines), (proc.poll(), "".join(lines)[-3000:])
        q = _test_questions(tiny_run)[0]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/answer",
                       json={"question": q["question"], "options": list(q["options"])}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["generation"] == _offline(tiny_run, "kard_reranker")[q["id"]]["generation"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "shutting down" in out and "stopped" in out, out[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
