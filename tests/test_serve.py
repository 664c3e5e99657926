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

from kard_ray.serve.proxy import set_proxy_environment

# Set at collection, before the session's Ray starts: its HTTP proxy then admits requests through
# kard_ray.serve.proxy's gate and calls the Ingress by value, as `kard-ray serve` sets up.
set_proxy_environment()

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

    # A fresh connection per request: a kept-alive connection the proxy has just closed as idle fails the next
    # request with "Server disconnected" (seen once, between two tests). A request the server drops mid-way
    # still fails.
    with httpx.Client(base_url=BASE, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        yield c


def _test_questions(run_dir: str) -> list[dict]:
    return io.read_table(io.RunDir(run_dir).questions("test")).to_pylist()


def _offline(run_dir: str, method: str) -> dict[str, dict]:
    rows = io.read_table(io.RunDir(run_dir).path("eval", "predictions", method)).to_pylist()
    return {r["question_id"]: r for r in rows}


def _ingress_only_app(name: str, route_prefix: str, method: str, max_ongoing: int = 64, max_queued: int = -1,
                      retry_after_s: float = 1.0, **limits):
    """A second app whose Ingress reuses the main app's model deployments (no second model load)."""
    from ray import serve

    from kard_ray.serve import APP_NAME
    from kard_ray.serve.api import Limits
    from kard_ray.serve.deployments import Ingress

    handles = [serve.get_deployment_handle(n, app_name=APP_NAME) for n in ("Retriever", "Reranker", "Generator")]
    settings = {"method": method, "k": 1, "k_star": 20, "limits": Limits(**limits), "retry_after_s": retry_after_s}
    from ray.serve.config import BackpressureConfig

    opts = dict(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=max_ongoing,
                max_queued_requests=max_queued, backpressure_config=BackpressureConfig(retry_after_s=retry_after_s))
    serve.run(Ingress.options(**opts).bind(*handles, settings), name=name, route_prefix=route_prefix)


def _app_with_own_generator(tiny_run: str, overrides: list[str], name: str, route_prefix: str):
    """A second app whose Ingress reuses the main app's Retriever and Reranker but deploys its own Generator,
    built from the tiny run's config with `overrides` (batching, autoscaling); returns that config."""
    from ray import serve

    from kard_ray.serve import APP_NAME, deployment_options, load_run_config
    from kard_ray.serve.api import Limits
    from kard_ray.serve.deployments import Generator, Ingress

    cfg = load_run_config(tiny_run, overrides)
    handles = [serve.get_deployment_handle(n, app_name=APP_NAME) for n in ("Retriever", "Reranker")]
    settings = {"method": "kard_reranker", "k": cfg.eval.k, "k_star": cfg.reranker.k_star,
                "limits": Limits.from_config(cfg.serve), "retry_after_s": 1.0}
    gen = Generator.options(**deployment_options(cfg, "kard_reranker")["Generator"]).bind(
        io.RunDir(tiny_run).model("student_kard"), cfg)
    serve.run(Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
              .bind(*handles, gen, settings), name=name, route_prefix=route_prefix)
    return cfg


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
    from kard_ray.inference.formats import generation_rationale

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
        assert body["rationale"] == generation_rationale(want["generation"])
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
    from kard_ray.inference.formats import question_query

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

    from kard_ray.serve.app import admission_limits

    questions = _test_questions(tiny_run)
    limits = admission_limits(served)  # as many clients as the service admits (in the graph + waiting): no 503
    n, concurrency = 200, limits.ongoing + limits.queued
    latencies: list[float] = []
    statuses: list[int] = []
    refusals: list[str] = []

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
                    if r.status_code != 200:
                        refusals.append(r.text[:300])

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
    assert not [s for s in statuses if s >= 500], refusals[:3]
    assert all(s == 200 for s in statuses)
    assert batches < n  # concurrent requests shared generate() calls (the Generator's batcher)


def test_a_lone_request_does_not_wait_for_the_batch_window_but_concurrent_ones_share_a_batch(tiny_run, served):
    """The generator's batch window (`serve.batch_wait_timeout_s`, here 3 s) is held open only while the
    Ingress has other requests on their way to it: a lone request is answered well within the window, four sent
    together still share one generate() call."""
    import httpx
    from ray import serve

    _app_with_own_generator(tiny_run, ["serve.batch_wait_timeout_s=3", "serve.max_batch_size=4"], "kard-window",
                            "/window")
    try:
        questions = _test_questions(tiny_run)
        bodies = [{"question": q["question"], "options": list(q["options"])} for q in questions[:4]]
        with httpx.Client(base_url=BASE, timeout=60) as c:
            batches = lambda: c.get("/window/readyz").json()["generator"]["batches"]  # noqa: E731
            c.post("/window/v1/answer", json=bodies[0])  # warm-up (first model calls)
            lone = []
            for body in bodies[:3]:
                t0 = time.perf_counter()
                assert c.post("/window/v1/answer", json=body).status_code == 200
                lone.append(time.perf_counter() - t0)
            before = batches()

            async def together() -> list[int]:
                async with httpx.AsyncClient(base_url=BASE, timeout=60) as ac:
                    rs = await asyncio.gather(*(ac.post("/window/v1/answer", json=b) for b in bodies))
                return [r.status_code for r in rs]

            t0 = time.perf_counter()
            statuses = asyncio.run(together())
            four = time.perf_counter() - t0
            shared = batches() - before
        print(f"\n[batch window 3 s] lone requests {[round(x, 2) for x in lone]} s; four together {four:.2f} s in "
              f"{shared} batch(es)")
        assert max(lone) < 1.5, lone  # each would wait the whole 3 s window for company that is not coming
        assert statuses == [200] * 4
        assert shared <= 2, shared  # the first to arrive had others behind it: the batch waited for them
    finally:
        serve.delete("kard-window")


# ------------------------------------------------------------------------------------------------
# OpenAI-compatible chat completions and rerank, with the official `openai` client as the caller


def _openai(prefix: str = "", **kw):
    import openai

    return openai.OpenAI(base_url=f"{BASE}{prefix}/v1", api_key="not-needed", **kw)


def _chat_text(q: dict) -> str:
    """The question as a person would type it: the options on 'A. ...' lines."""
    return q["question"] + "\n" + "\n".join(f"{'ABCDEFGHIJ'[i]}. {o}" for i, o in enumerate(q["options"]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_completions_with_the_openai_client(tiny_run, served, client):
    import openai

    oa = _openai(max_retries=0)
    (model,) = [m.id for m in oa.models.list().data]
    assert model == "kard_reranker"
    for q in _test_questions(tiny_run)[:3]:
        want = client.post("/v1/answer", json={"question": q["question"], "options": list(q["options"])}).json()
        # options parsed from the message's "A. ..." lines
        done = oa.chat.completions.create(model=model, messages=[
            {"role": "system", "content": "Answer the question."}, {"role": "user", "content": _chat_text(q)}])
        assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
        assert done.choices[0].message.content == want["generation"]  # greedy: the same answer as /v1/answer
        assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0
        kard = done.model_extra["kard"]
        assert (kard["question"], kard["options"]) == (q["question"], list(q["options"]))
        assert (kard["answer_index"], kard["answer_letter"]) == (want["answer_index"], want["answer_letter"])
        assert [p["id"] for p in kard["passages"]] == [p["id"] for p in want["passages"]]
        # options as the structured extension field; streamed token by token
        stream = oa.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": q["question"]}],
                                            extra_body={"options": list(q["options"])})
        chunks = list(stream)
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) >= 2  # streamed, not one block
        assert "".join(pieces).strip() == want["generation"]
        (final,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert final.model_extra["kard"]["answer_index"] == want["answer_index"]
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
        assert len({c.id for c in chunks}) == 1

    # errors surface as the client's usual exceptions, with OpenAI's error fields
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": _chat_text(q)}])
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "no options in here"}])
    assert e.value.param == "messages[0].content" and "options" in e.value.message


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_openai_client_sees_503_with_retry_after_and_retries(tiny_run, served, client):
    """An Ingress with room for one request and one waiting: a burst gets 503 + Retry-After (from Serve's
    proxy, with the JSON body); the client without retries raises, the client with retries honours
    Retry-After and gets every answer."""
    import openai
    from concurrent.futures import ThreadPoolExecutor

    _ingress_only_app("kard-one", "/one", "kard_reranker", max_ongoing=1, max_queued=1, retry_after_s=1.0,
                      request_timeout_s=20)
    q = _test_questions(tiny_run)[0]
    msg = [{"role": "user", "content": _chat_text(q)}]

    def ask(oa):
        try:
            return oa.chat.completions.create(model="kard_reranker", messages=msg)
        except openai.APIStatusError as e:
            return e

    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(ask, [_openai("/one", max_retries=0)] * 6))
    refused = [g for g in got if isinstance(g, openai.APIStatusError)]
    assert refused and len(refused) < 6, got
    for e in refused:
        assert isinstance(e, openai.InternalServerError) and e.status_code == 503 and e.code == "overloaded"
        assert e.response.headers["retry-after"] == "1" and e.response.headers.get("x-request-id")
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(ask, [_openai("/one", max_retries=6)] * 6))
    assert all(not isinstance(g, Exception) and g.object == "chat.completion" for g in got), got


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rerank_endpoint_is_the_distilled_reranker(tiny_run, served, client):
    from kard_ray.inference.formats import question_query
    from kard_ray.knowledge import format_passage

    q = _test_questions(tiny_run)[0]
    req = {"question": q["question"], "options": list(q["options"])}
    deep = client.post("/v1/retrieve", json={**req, "k": 8, "candidates": 8}).json()["passages"]
    docs = [format_passage(p["title"], p["text"]) for p in reversed(deep)]  # shuffled order in
    r = client.post("/v1/rerank", json={"query": question_query(q["question"], q["options"]), "documents": docs,
                                        "top_n": 5, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == r.headers["x-request-id"]
    res = body["results"]
    assert len(res) == 5 and [x["relevance_score"] for x in res] == sorted((x["relevance_score"] for x in res), reverse=True)
    # the same scores and order the answer path's reranker gives
    assert [x["document"]["text"] for x in res] == docs[::-1][:5]
    assert [round(x["relevance_score"], 4) for x in res] == [round(p["score"], 4) for p in deep[:5]]
    bad = client.post("/v1/rerank", json={"query": "q", "documents": ["a", ""]})
    assert (bad.status_code, bad.json()["field"]) == (422, "documents[1]")


# ------------------------------------------------------------------------------------------------
# operations: request ids, metrics, overload, autoscaling


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_request_id_on_every_response_in_errors_and_in_the_logs(tiny_run, served, client):
    import ray

    q = _test_questions(tiny_run)[0]
    ok = client.post("/v1/answer", json={"question": q["question"], "options": list(q["options"])})
    bad = client.post("/v1/answer", json={"question": "", "options": ["a", "b"]})
    mine = client.post("/v1/answer", json={"question": "", "options": ["a", "b"]}, headers={"X-Request-ID": "kard-test-42"})
    for r in (ok, bad, mine, client.get("/healthz"), client.get("/v1/nope")):
        assert r.headers.get("x-request-id"), (r.status_code, r.headers)
    assert ok.headers["x-request-id"] != bad.headers["x-request-id"]
    assert bad.json()["request_id"] == bad.headers["x-request-id"]
    assert mine.headers["x-request-id"] == "kard-test-42" == mine.json()["request_id"]
    # Serve's access log of the Ingress replica names every request by its id
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    deadline = time.time() + 30
    while time.time() < deadline:
        text = "".join(p.read_text(errors="replace") for p in logs.glob("replica_kard_Ingress_*.log"))
        if "kard-test-42" in text and ok.headers["x-request-id"] in text:
            break
        time.sleep(1)
    assert "kard-test-42" in text and ok.headers["x-request-id"] in text


def _scrape(pattern: str, timeout_s: float = 60) -> list[str]:
    """Lines of the Ray node's Prometheus endpoint matching `pattern` (Ray exports every few seconds)."""
    import re

    import httpx
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.time() + timeout_s
    while True:
        text = httpx.get(url, timeout=10).text
        lines = [l for l in text.splitlines() if re.search(pattern, l) and not l.startswith("#")]
        if lines or time.time() > deadline:
            return lines
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overload_is_answered_503_at_once_and_the_queue_stays_bounded(tiny_run, served, client):
    """hey at the peak concurrency, then at 128 (bounded request counts): past capacity requests are
    refused with 503 + Retry-After (JSON), the requests admitted stay within the service's bounds."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from kard_ray.serve.load import hey_path, run_hey

    if hey_path() is None:
        pytest.skip("`hey` is not installed (apt-get install -y hey; .ci/run installs it)")
    q = _test_questions(tiny_run)[0]
    body = {"question": q["question"], "options": list(q["options"])}
    url = f"{BASE}/v1/answer"
    run_hey(url, body, concurrency=8, requests=32)  # warm-up
    peak = run_hey(url, body, concurrency=8, requests=160)

    # While hey overloads the service, a side client looks at what a refused request gets, each time on a new
    # connection (one refused a moment ago would have its early retry held for the Retry-After).
    with ThreadPoolExecutor(1) as ex:
        flood = ex.submit(run_hey, url, body, concurrency=128, requests=3000)
        refused, refused_s = [], []
        while not flood.done() and len(refused) < 5:
            with httpx.Client(timeout=60) as side:
                t0 = time.monotonic()
                r = side.post(url, json=body)
            if r.status_code != 200:
                refused.append(r)
                refused_s.append(time.monotonic() - t0)
        over = flood.result()
    print(f"\n[serve overload] c=8: {peak.row()}\n[serve overload] c=128: {over.row()}, "
          f"200s in flight: {over.mean_in_flight(200):.1f} on average, {over.max_in_flight(200)} at most")
    # at the peak concurrency everything is answered: the proxy's gate counts exactly what it admitted
    assert peak.failed == 0 and peak.codes == {200: len(peak.statuses)}, peak.codes
    # every request got an HTTP answer; every non-200 is a 503, and there were some (it was overloaded)
    assert over.failed == 0 and set(over.codes) == {200, 503}, over.codes
    assert over.codes[200] >= 50
    for r in refused:
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, (r.status_code, r.headers, r.text)
        assert r.json()["error"] == "overloaded" and r.json()["request_id"] == r.headers["x-request-id"]
    # The queue is bounded: far fewer 200s in flight than the 128 clients, all of which an unbounded queue
    # keeps waiting for an eventual 200. Counted from the client (hey's send times and latencies, Little's law:
    # their summed latencies over the wall time), a 200 is in flight longer than the service holds it: it may
    # wait unread in the proxy's socket buffer while the proxy answers refusals, so the bound is on the mean,
    # with room: hey c=128 against the test-size demo run, 2026-12-06: an unbounded queue
    # (max_queued_requests=-1) kept all 128 in flight (most at once 129).
    # Throughput and p99 under overload against the peak are timed targets, bench/bench_serve.py
    # --load-run's (on this 2-core CI box, with the suite's other work, the ratio moves from run to run).
    from kard_ray.serve.app import admission_limits

    limits = admission_limits(served)  # what the proxy's gate admits: in the graph + waiting
    admitted = limits.ongoing + limits.queued
    assert admitted <= 0.5 * 128 and over.mean_in_flight(200) <= 0.5 * 128, (over.mean_in_flight(200), admitted)
    assert peak.max_in_flight(200) >= 6  # the measure sees concurrency where there is some (c=8)
    # A refusal is quick: not a request that waited in a queue and then gave up. hey's workers ignore Retry-After:
    # a worker's retry within it is held until it has passed, then refused (serve.hold_early_retries), so no 503
    # takes much longer than the Retry-After; a connection not refused just before is refused at once.
    assert refused_s and max(refused_s) < peak.ok_pct(50), (refused_s, peak.ok_pct(50))
    assert max(over.latencies_of(503)) < served.serve.retry_after_s + 1.0, max(over.latencies_of(503))
    # the metrics: ours per route and status in the Ingress, the refusals at the proxy's gate
    assert _scrape(r'kard_http_requests.*route="/v1/answer".*status="200"')
    assert _scrape(r'kard_http_request_latency_ms_bucket.*route="/v1/answer".*status="200"')
    assert _scrape(r'kard_proxy_refused_requests.*route="/v1/answer"')


def _replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications[app].deployments[deployment]
    return st.replica_states.get("RUNNING", 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_generator_autoscales_up_under_load_and_back_down_without_failures(tiny_run, served, client):
    """serve.generator min 1 / max 3: replicas rise under a bounded load, fall after it (Serve's status
    API), and no request fails during either transition."""
    import httpx
    from ray import serve

    from kard_ray.serve import deployment_options

    cfg = _app_with_own_generator(
        tiny_run, ["serve.generator.max_replicas=3", "serve.generator.target_ongoing_requests=2",
                   "serve.generator.upscale_delay_s=1", "serve.generator.downscale_delay_s=4",
                   "serve.generator.metrics_interval_s=0.5", "serve.generator.look_back_period_s=2",
                   "serve.generator.max_queued_requests=32", "serve.max_batch_size=2"], "kard-scale", "/scale")
    assert deployment_options(cfg, "kard_reranker")["Generator"]["autoscaling_config"]["max_replicas"] == 3
    assert _replicas("kard-scale", "Generator") == 1
    questions = _test_questions(tiny_run)
    statuses: list[int] = []
    errors: list[tuple] = []  # (replicas at the time, status, body) of any failed request
    counts: list[tuple[float, int]] = []

    async def clients(n: int, until) -> None:
        async with httpx.AsyncClient(base_url=BASE, timeout=120) as ac:
            async def one(c: int) -> None:
                i = c
                while not until():
                    q = questions[i % len(questions)]
                    r = await ac.post("/scale/v1/answer", json={"question": q["question"], "options": list(q["options"])})
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        errors.append((len(counts) and counts[-1][1], r.status_code, r.text[:300]))
                    i += n

            async def watch() -> None:
                t0 = time.time()
                while not until():
                    counts.append((time.time() - t0, _replicas("kard-scale", "Generator")))
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(one(c) for c in range(n)))

    t0, two = time.time(), []

    def up_done() -> bool:
        if counts and counts[-1][1] >= 2 and not two:
            two.append(time.time())
        # a third replica, or 20 s after the second came up, or 150 s in all
        return bool(counts and counts[-1][1] >= 3) or bool(two and time.time() - two[0] > 20) or time.time() - t0 > 150

    # up: 12 closed-loop clients
    asyncio.run(clients(12, up_done))
    peak = max(n for _, n in counts)
    n_up = len(statuses)
    # down: one client keeps asking while the replicas go (at most 120 s)
    t1 = time.time()
    asyncio.run(clients(1, lambda: (counts and counts[-1][1] == 1 and time.time() - t1 > 3) or time.time() - t1 > 120))
    print(f"\n[serve autoscale] replicas over time: {[n for _, n in counts]}; {n_up} requests under load, "
          f"{len(statuses) - n_up} while scaling down; statuses {sorted(set(statuses))}")
    assert peak >= 2, counts
    assert _replicas("kard-scale", "Generator") == 1, counts
    assert statuses and all(s == 200 for s in statuses), errors[:5]
    serve.delete("kard-scale")


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
        # Load that never pauses (8 clients, each sending its next request as soon as one returns; deep
        # reranking keeps them busy), then SIGTERM in the middle of it: a fixed batch of requests could
        # all be done before the signal on a fast machine, and the drain would have nothing to prove.
        deep = {"question": q["question"], "options": list(q["options"]), "candidates": 200, "k": 3}
        results: list[tuple[float, float, object]] = []  # (sent, returned, status code or error)
        stop = threading.Event()

        def ask() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = httpx.post(f"http://127.0.0.1:{port}/v1/answer", json=deep, timeout=120)
                    outcome: object = r.status_code
                    if r.status_code != 200:
                        try:
                            outcome = f"{r.status_code} {r.json().get('error')}"
                        except ValueError:
                            outcome = f"{r.status_code} {r.text[:200]!r}"
                except httpx.TransportError as e:
                    outcome = repr(e)
                results.append((sent, time.monotonic(), outcome))
                if outcome != 200:
                    return  # refused or gone: this client stops, as a client behind a load balancer would

        askers = [threading.Thread(target=ask) for _ in range(8)]
        for t in askers:
            t.start()
        time.sleep(3.0)
        sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in askers:
            t.join(timeout=120)
        stop.set()
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "shutting down" in out and "stopped" in out, out[-3000:]
    import re

    before = [o for sent, _, o in results if sent < sigterm]
    # Sent before the signal: answered, or (not yet at the Ingress when the drain began) refused with a
    # retryable 503 "draining" - never a dropped connection or another error.
    assert before and all(o == 200 or o == "503 draining" for o in before), [o for o in before if o != 200]
    # ... and some of them were still running at the signal and finished with 200 during the drain.
    assert any(o == 200 and returned > sigterm for sent, returned, o in results if sent < sigterm), results

    drained = re.search(r"drained (\d+) in-flight requests", out)
    assert drained and int(drained.group(1)) >= 1, out[-3000:]  # SIGTERM did arrive with requests in flight
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
