"""Serve pieces that need no Ray: request validation, the HTTP error contract, the body limit,
reading a generation, deployment options from config, and the Serve config YAMLs.

The served app itself (real Ray Serve, real HTTP) is tested in test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kard_ray.config import ConfigError, load_config
from kard_ray.inference.formats import generation_rationale
from kard_ray.serve.api import Limits, answer_fields, field_path, request_models

REPO = Path(__file__).resolve().parents[1]
SERVE_YAMLS = [REPO / "configs" / "serve.yaml", REPO / "cluster" / "serve_config.yaml"]


# ------------------------------------------------------------------------------------------------
# request models


LIMITS = Limits(max_options=4, max_question_chars=50, max_option_chars=10, max_k=5, max_candidates=20)
GOOD = {"question": "What is the main export of Brax?", "options": ["salt", "tin"]}


@pytest.mark.parametrize("body,field", [
    ({**GOOD, "question": ""}, "question"),
    ({**GOOD, "question": "   \n"}, "question"),
    ({**GOOD, "question": "x" * 51}, "question"),
    ({"options": ["a", "b"]}, "question"),
    ({**GOOD, "options": ["a"]}, "options"),
    ({**GOOD, "options": []}, "options"),
    ({**GOOD, "options": ["a", "b", "c", "d", "e"]}, "options"),
    ({**GOOD, "options": "a b"}, "options"),
    ({**GOOD, "options": ["a", " "]}, "options[1]"),
    ({**GOOD, "options": ["a", "b" * 11]}, "options[1]"),
    ({**GOOD, "k": 0}, "k"),
    ({**GOOD, "k": 6}, "k"),
    ({**GOOD, "candidates": 21}, "candidates"),
    ({**GOOD, "return_passages": "maybe"}, "return_passages"),
    ({**GOOD, "option": ["a"]}, "option"),
])
def test_request_model_rejects_bad_input_naming_the_field(body, field):
    from pydantic import ValidationError

    Answer, _ = request_models(LIMITS)
    with pytest.raises(ValidationError) as e:
        Answer(**body)
    assert [field_path(err["loc"]) for err in e.value.errors()][0] == field


def test_request_model_keeps_text_exactly_and_fills_defaults():
    Answer, Retrieve = request_models(LIMITS)
    req = Answer(question="  Brax?  ", options=["salt ", "tin"])
    # never stripped: the student must see what offline evaluation saw
    assert (req.question, req.options, req.k, req.candidates, req.return_passages) == ("  Brax?  ", ["salt ", "tin"], None, None, True)
    assert not hasattr(Retrieve(**GOOD), "return_passages")
    schema = Answer.model_json_schema()["properties"]
    assert schema["options"]["maxItems"] == 4 and schema["options"]["items"]["maxLength"] == 10
    assert schema["k"]["anyOf"][0]["maximum"] == 5


def test_limits_come_from_the_serve_config():
    cfg = load_config(None, ["serve.max_options=5", "serve.max_body_bytes=1000", "serve.request_timeout_s=2.5", "serve.max_k=3"])
    lim = Limits.from_config(cfg.serve)
    assert (lim.max_options, lim.max_body_bytes, lim.request_timeout_s, lim.max_k) == (5, 1000, 2.5, 3)
    with pytest.raises(ConfigError, match="serve.max_options"):
        load_config(None, ["serve.max_options=11"])


def test_field_path():
    assert field_path(("body", "options", 2)) == "options[2]"
    assert field_path(("body", "question")) == "question"
    assert field_path(("body",)) == "body"


@pytest.mark.parametrize("generation,rationale", [
    ("Brax lies by the sea. The main export of Brax is salt.\nAnswer: A", "Brax lies by the sea. The main export of Brax is salt."),
    ("The main export of Brax is salt. Answer: A", "The main export of Brax is salt."),  # newline lost in decoding
    ("Answer: B", ""),
    ("no answer line at all", "no answer line at all"),
    ("Answer: A\nbut then more text", ""),  # the answer came first: nothing before it explains it
    ("r.\nAnswer: B\nAnswer: C\nAns", "r."),  # repeated and cut-off answer lines
    ("The answer: is unclear. So the answer is salt", "The answer: is unclear. So the answer is salt"),
    ("", ""),
])
def test_generation_rationale(generation, rationale):
    """The one reader of a generation's rationale: Serve's `rationale` field and likelihood scoring."""
    assert generation_rationale(generation) == rationale


def test_answer_fields():
    assert answer_fields(1, ["salt", "tin"]) == {"answer_index": 1, "answer_letter": "B", "answer_text": "tin"}
    assert answer_fields(-1, ["salt", "tin"]) == {"answer_index": -1, "answer_letter": None, "answer_text": None}
    assert answer_fields(5, ["salt", "tin"])["answer_index"] == -1


# ------------------------------------------------------------------------------------------------
# the HTTP contract (FastAPI app in process, no Serve)


class _Service:
    """The app's dependency, in process: echoes, fails or times out as the test asks."""

    method = "kard_bm25"

    def __init__(self):
        self.mode = "ok"
        self.seen = []

    async def answer(self, req, usage: bool = False) -> dict:
        from kard_ray.serve.http import Overloaded, RequestTimeout

        self.seen.append(req)
        if self.mode == "boom":
            raise RuntimeError("secret internal detail /srv/model.bin")
        if self.mode == "timeout":
            raise RequestTimeout(0.5, "generate")
        if self.mode == "overloaded":
            raise Overloaded("the generate step is over capacity", 2.0)
        if self.mode == "slow":
            import asyncio

            await asyncio.sleep(0.3)
        body = {"answer_index": 0, "answer_letter": "A", "answer_text": req.options[0], "rationale": "r",
                "generation": "r\nAnswer: A", "method": self.method, "passages": [],
                "timings_ms": {"retrieve": 1.0, "rerank": None, "generate": 2.0}}
        if usage:
            body["usage"] = {"prompt_tokens": 7, "completion_tokens": 3, "finish_reason": "stop"}
        return body

    async def answer_stream(self, req):
        answer = await self.answer(req, usage=True)
        yield {"passages": []}
        for piece in ("r", "\nAnswer:", " A"):
            yield {"text": piece}
        yield {"answer": answer}

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        return [float(len(set(query.split()) & set(t.split()))) for t in texts]

    async def retrieve(self, req) -> dict:
        return {"method": self.method, "query": req.question, "passages": [], "timings_ms": {"retrieve": 1.0}}

    async def ready(self) -> dict:
        from kard_ray.serve.http import ServiceError

        if self.mode == "down":
            raise ServiceError(503, "unavailable", "generator is not ready")
        return {"method": self.method}


@pytest.fixture()
def client():
    from fastapi.testclient import TestClient

    from kard_ray.serve.http import build_api

    service = _Service()
    # raise_server_exceptions=False: see what a real client sees when a route raises.
    with TestClient(build_api(service, Limits(max_body_bytes=300, max_options=4)), raise_server_exceptions=False) as c:
        c.service = service
        yield c


def _assert_error(r, status: int, error: str, field=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    if field is not None:
        assert body["field"] == field, body
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


def test_http_validation_errors_are_json_naming_the_field(client):
    assert client.post("/v1/answer", json=GOOD).status_code == 200
    _assert_error(client.post("/v1/answer", json={**GOOD, "question": " "}), 422, "invalid_request", "question")
    _assert_error(client.post("/v1/answer", json={**GOOD, "options": ["a"] * 5}), 422, "invalid_request", "options")
    _assert_error(client.post("/v1/answer", content=b"{oops", headers={"content-type": "application/json"}),
                  422, "invalid_request", "body")
    _assert_error(client.post("/v1/answer", json=["a", "b"]), 422, "invalid_request", "body")
    _assert_error(client.post("/v1/answer"), 422, "invalid_request", "body")
    _assert_error(client.get("/v1/answer"), 405, "method_not_allowed")
    _assert_error(client.get("/nope"), 404, "not_found")


def test_http_body_limit_declared_and_chunked(client):
    big = {**GOOD, "question": "x" * 400}
    body = _assert_error(client.post("/v1/answer", json=big), 413, "body_too_large", "body")
    assert "300" in body["message"]

    def chunks():
        yield b'{"question": "'
        for _ in range(10):
            yield b"y" * 50
        yield b'", "options": ["a", "b"]}'

    _assert_error(client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"}),
                  413, "body_too_large", "body")

    def small():
        yield b'{"question": "Brax?", '
        yield b'"options": ["a", "b"]}'

    r = client.post("/v1/answer", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text  # a chunked body under the limit is replayed intact


def test_http_internal_errors_and_timeouts_never_leak_internals(client):
    client.service.mode = "boom"
    body = _assert_error(client.post("/v1/answer", json=GOOD), 500, "internal_error")
    assert "secret" not in body["message"] and "request id" in body["message"]
    client.service.mode = "timeout"
    body = _assert_error(client.post("/v1/answer", json=GOOD), 504, "timeout")
    assert "0.5 s" in body["message"]
    client.service.mode = "down"
    _assert_error(client.get("/readyz"), 503, "unavailable")
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_documents_the_routes_and_limits(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/answer", "/v1/retrieve", "/healthz", "/readyz"} <= set(spec["paths"])
    req = spec["components"]["schemas"]["AnswerRequest"]["properties"]
    assert req["options"]["maxItems"] == 4
    assert {"413", "422", "504"} <= set(spec["paths"]["/v1/answer"]["post"]["responses"])
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------------------
# deployment options and Serve configs


def test_deployment_options_follow_the_config():
    from kard_ray.serve import deployment_options

    cfg = load_config(None, ["serve.generator_num_gpus=1", "serve.num_cpus_per_replica=0.5", "serve.max_batch_size=16",
                             "serve.generator.max_replicas=3", "serve.generator.target_ongoing_requests=6",
                             "serve.request_timeout_s=20"])
    opts = deployment_options(cfg, "kard_reranker")
    assert set(opts) == {"Retriever", "Reranker", "Generator", "Ingress"}
    g = opts["Generator"]
    assert g["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 6.0,
                                       "upscale_delay_s": 3.0, "downscale_delay_s": 30.0, "metrics_interval_s": 2.0,
                                       "look_back_period_s": 10.0}
    # bounded queues, refused with 503 + Retry-After past them
    assert all(o["max_queued_requests"] >= 1 for o in opts.values())
    assert all(o["backpressure_config"].status_code == 503 and o["backpressure_config"].retry_after_s == 1.0
               for o in opts.values())
    tight = deployment_options(load_config(None, ["serve.generator.max_ongoing_requests=3",
                                                  "serve.generator.max_queued_requests=-1"]), "kard_reranker")
    assert (tight["Generator"]["max_ongoing_requests"], tight["Generator"]["max_queued_requests"]) == (3, -1)
    with pytest.raises(ConfigError, match="max_queued_requests"):
        load_config(None, ["serve.generator.max_queued_requests=0"])
    assert g["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}
    assert g["max_ongoing_requests"] >= 2 * 16  # two full batches can queue
    assert opts["Retriever"]["ray_actor_options"]["num_gpus"] == 0
    assert all(o["graceful_shutdown_timeout_s"] > 20 for o in opts.values())
    assert all(o["max_ongoing_requests"] >= o["autoscaling_config"]["target_ongoing_requests"] for o in opts.values())
    # without a reranker the Reranker deployment is bound (configs name it) but holds no replica
    assert deployment_options(cfg, "kard_bm25")["Reranker"]["autoscaling_config"]["min_replicas"] == 0
    # The service's capacity (null Ingress bounds): one full generator batch per generator replica in the graph,
    # spread over the Ingress replicas, and 2 waiting at each proxy's gate; configured bounds win.
    from kard_ray.serve.app import admission_limits

    assert opts["Ingress"]["max_ongoing_requests"] == 16 * 3
    assert (admission_limits(cfg).ongoing, admission_limits(cfg).queued) == (48, 2)
    spread = load_config(None, ["serve.max_batch_size=5", "serve.ingress.max_replicas=2"])
    assert deployment_options(spread, "kard_reranker", gated=True)["Ingress"]["max_ongoing_requests"] == 3
    assert admission_limits(spread).ongoing == 6
    mine = load_config(None, ["serve.ingress.max_ongoing_requests=7", "serve.ingress.max_queued_requests=3"])
    gated = deployment_options(mine, "kard_reranker", gated=True)["Ingress"]
    assert (admission_limits(mine).ongoing, admission_limits(mine).queued) == (7, 3)
    assert (gated["max_ongoing_requests"], gated["max_queued_requests"]) == (7, 7 + 3)  # Serve's: a backstop


def test_default_graph_fits_a_two_core_machine():
    from kard_ray.serve import deployment_options

    opts = deployment_options(load_config(str(REPO / "configs" / "demo.yaml")), "kard_reranker")
    total = sum(o["ray_actor_options"]["num_cpus"] * o["autoscaling_config"]["max_replicas"] for o in opts.values())
    assert total <= 2.0, total


@pytest.mark.parametrize("path", SERVE_YAMLS, ids=lambda p: p.name)
def test_serve_config_yaml_validates_and_matches_the_app(path):
    from ray.serve.schema import ServeDeploySchema

    from kard_ray.serve import APP_NAME, DEPLOYMENTS
    from kard_ray.serve.deployments import Generator, Ingress, Reranker, Retriever

    spec = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = spec.applications
    assert app.name == APP_NAME and app.import_path == "kard_ray.serve:build_app"
    assert "run_dir" in app.args
    names = {d.name for d in app.deployments}
    assert names == set(DEPLOYMENTS) == {d.name for d in (Retriever, Reranker, Generator, Ingress)}


@pytest.mark.parametrize("path", SERVE_YAMLS + [REPO / "cluster" / "kuberay" / "rayservice.yaml"], ids=lambda p: p.name)
def test_serve_config_sizes_replicas_in_one_place_and_the_gates_agree(path):
    """Replicas and bounds come from the app's args (kard_ray config keys), never from a deployment's own
    autoscaling_config: the Ingress's bound and the proxies' gates are derived from the same numbers Serve
    deploys, so an Ingress replica starting from this file publishes limits Serve's queue can hold."""
    from kard_ray.config import load_config
    from kard_ray.serve.app import _override_text, admission_limits, deployment_options

    doc = yaml.safe_load(path.read_text())
    if doc.get("kind") == "RayService":
        doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = doc["applications"]
    for d in app["deployments"]:
        sized_here = {"autoscaling_config", "num_replicas", "max_ongoing_requests", "max_queued_requests"} & set(d)
        assert not sized_here, f"{path.name}: {d['name']} sets {sorted(sized_here)}; use serve.* args"
    overrides = [_override_text(k, v) for k, v in app["args"].items() if k != "run_dir"]
    cfg = load_config(None, overrides)  # every key is a real config key (a typo fails here, naming it)
    opts = deployment_options(cfg, "kard_reranker", gated=True)
    for name, section in (("Generator", cfg.serve.generator), ("Ingress", cfg.serve.ingress)):
        assert opts[name]["autoscaling_config"]["max_replicas"] == section.max_replicas
    ingress = opts["Ingress"]
    deployed = admission_limits(cfg).as_deployed(ingress["max_ongoing_requests"], cfg.serve.ingress.max_replicas,
                                                 ingress["max_queued_requests"])
    assert deployed == admission_limits(cfg)
    # one generator batch per generator replica in the graph, over all Ingress replicas
    assert deployed.ongoing >= cfg.serve.max_batch_size * cfg.serve.generator.max_replicas


def test_gate_limits_follow_the_deployed_ingress_and_refuse_a_queue_serve_cannot_hold():
    """A Serve config's deployment options override the code's: the gates admit what the deployed Ingress
    takes (max_ongoing_requests x replicas), and an Ingress whose Serve queue is shorter than that fails to
    start with the fix named, instead of Serve refusing part of what the gates admitted."""
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.config import AutoscalingConfig

    from kard_ray.serve.deployments import _replicas_and_bounds
    from kard_ray.serve.proxy import Limits

    config_says = Limits(prefix="/v1/", ongoing=8, queued=2, retry_after_s=1.0)
    assert config_says.as_deployed(8, 1, 10) == config_says
    assert config_says.as_deployed(16, 2, -1).ongoing == 32  # unbounded Serve queue: nothing to check
    assert config_says.as_deployed(4, 1, 10).ongoing == 4  # fewer deployed: the gates admit fewer
    with pytest.raises(ValueError, match=r"max_queued_requests \(10\).*8 x 2 replicas.*at least 18"):
        config_says.as_deployed(8, 2, 10)
    # what the Ingress reads: Serve's DeploymentConfig (its autoscaling max, else its fixed replica count)
    dc = DeploymentConfig(max_ongoing_requests=6, max_queued_requests=-1,
                          autoscaling_config=AutoscalingConfig(min_replicas=1, max_replicas=3))
    assert _replicas_and_bounds(dc) == (6, 3, -1)
    assert _replicas_and_bounds(DeploymentConfig(num_replicas=2, max_ongoing_requests=5)) == (5, 2, -1)


def test_build_app_errors_name_what_is_missing(tmp_path):
    from kard_ray.serve import build_app, served_method

    with pytest.raises(ConfigError, match="run_dir"):
        build_app({})
    with pytest.raises(ConfigError, match="config.yaml"):
        build_app({"run_dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="student_kard"):
        served_method(str(tmp_path))


def test_build_app_from_args_binds_the_graph(tmp_path):
    """A run directory's config + args overrides -> the bound app (binding loads no model)."""
    from kard_ray.config import load_config as load
    from kard_ray.serve import build_app, load_run_config, served_method

    run = tmp_path / "run"
    (run / "models" / "student_kard").mkdir(parents=True)
    (run / "models" / "student_kard" / "config.json").write_text("{}")
    (run / "index" / "bm25").mkdir(parents=True)
    (run / "config.yaml").write_text(load(None, ["run_dir=/somewhere/else"]).to_yaml())
    assert served_method(str(run)) == "kard_bm25"
    (run / "models" / "reranker").mkdir()
    assert served_method(str(run)) == "kard_reranker"

    cfg = load_run_config(str(run), ["serve.max_batch_size=4"])
    assert cfg.run_dir == str(run) and cfg.serve.max_batch_size == 4  # the served dir wins over the stored one
    app = build_app({"run_dir": str(run), "serve.max_k": "7", "method": "kard_bm25"})
    assert type(app).__name__ == "Application"
    with pytest.raises(ConfigError, match="serve.max_kk"):
        build_app({"run_dir": str(run), "serve.max_kk": "7"})
    with pytest.raises(ConfigError, match="method"):
        build_app({"run_dir": str(run), "method": "rd"})


# ------------------------------------------------------------------------------------------------
# OpenAI chat completions, models, rerank, admission control (FastAPI app in process, no Serve)


@pytest.mark.parametrize("text,question,options", [
    ("Which river flows through Varnholm?\nA. the Orla\nB. the Ketter\nC. the Mose",
     "Which river flows through Varnholm?", ["the Orla", "the Ketter", "the Mose"]),
    ("What is the main export of Brax? A. salt B. tin", "What is the main export of Brax?", ["salt", "tin"]),
    ("Vitamin A. deficiency causes what?\nA) night blindness\nB) scurvy", "Vitamin A. deficiency causes what?",
     ["night blindness", "scurvy"]),
])
def test_chat_question_parsed_from_option_lines(text, question, options):
    from kard_ray.serve.openai_api import parse_question

    assert parse_question(text, 8) == (question, options)


def test_chat_question_parse_errors_name_the_message():
    from kard_ray.serve.openai_api import ChatParseError, ChatRequest, parse_question, question_and_options

    with pytest.raises(ChatParseError, match="at least two options"):
        parse_question("What is the main export of Brax?", 8)
    with pytest.raises(ChatParseError, match="at most 2"):
        parse_question("Q? A. a B. b C. c", 2)
    req = ChatRequest(model="m", messages=[{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "Q? A. a B. b"},
                                           {"role": "assistant", "content": "..."},
                                           {"role": "user", "content": "no options here"}])
    with pytest.raises(ChatParseError) as e:
        question_and_options(req, 8)
    assert e.value.field == "messages[3].content"  # the last user message
    # structured options: the message is the question as written
    req = ChatRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "Brax?"}]}],
                      options=["salt", "tin"])
    assert question_and_options(req, 8) == ("Brax?", ["salt", "tin"])


def _chat(client, **kw):
    body = {"model": "kard_bm25", "messages": [{"role": "user", "content": "What is the export of Brax?\nA. salt\nB. tin"}],
            **kw}
    return client.post("/v1/chat/completions", json=body)


def test_chat_completion_is_a_standard_chat_completion_with_the_kard_extension(client):
    r = _chat(client, temperature=0.2, max_tokens=64, user="u1")  # sampling params accepted, ignored
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "kard_bm25"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "r\nAnswer: A"} and choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    k = body["kard"]
    assert (k["question"], k["options"], k["answer_letter"], k["answer_text"]) == \
        ("What is the export of Brax?", ["salt", "tin"], "A", "salt")
    req = client.service.seen[-1]
    assert (req.question, req.options) == ("What is the export of Brax?", ["salt", "tin"])
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["kard_bm25"]
    assert client.get("/v1/models/kard_bm25").json()["id"] == "kard_bm25"


def test_chat_streaming_sends_openai_chunks_then_done(client):
    import json

    with client.stream("POST", "/v1/chat/completions", json={
            "model": "kard_bm25", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Brax?\nA. salt\nB. tin"}]}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "r\nAnswer: A"
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["kard"]["answer_letter"] == "A"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10


def test_chat_errors_use_the_openai_error_envelope(client):
    def err(r, status, code, param=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert e["code"] == code and e["message"] and e["type"], e
        if param is not None:
            assert e["param"] == param, e
        return r

    err(_chat(client, model="gpt-4o"), 404, "model_not_found", "model")
    err(_chat(client, messages=[{"role": "user", "content": "no options"}]), 400, "invalid_request", "messages[0].content")
    err(_chat(client, messages=[]), 400, "invalid_request", "messages")
    err(_chat(client, n=2), 400, "invalid_request", "n")
    err(_chat(client, temprature=1), 400, "invalid_request", "temprature")  # a typo is not silently ignored
    err(_chat(client, options=["a", " "]), 400, "invalid_request", "options[1]")
    client.service.mode = "overloaded"
    r = err(_chat(client), 503, "overloaded")
    assert r.headers["retry-after"] == "2"


def test_rerank_cohere_shape(client):
    r = client.post("/v1/rerank", json={"query": "salt export Brax", "top_n": 2, "return_documents": True,
                                        "documents": ["tin mines", {"text": "Brax exports salt"}, "salt flats"]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == [1, 2] and res[0]["relevance_score"] == 2.0
    assert res[0]["document"] == {"text": "Brax exports salt"}
    full = client.post("/v1/rerank", json={"query": "salt", "documents": ["a", "salt", "b"]}).json()["results"]
    assert [x["index"] for x in full] == [1, 0, 2] and "document" not in full[0]  # ties keep document order
    _assert_error(client.post("/v1/rerank", json={"query": "q", "documents": []}), 422, "invalid_request", "documents")
    _assert_error(client.post("/v1/rerank", json={"query": "q", "documents": ["a", " "]}), 422, "invalid_request",
                  "documents[1]")
    _assert_error(client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": 0}), 422,
                  "invalid_request", "top_n")


def test_drain_gate_counts_in_flight_refuses_new_requests_and_metrics_count_routes():
    import asyncio

    import httpx

    from kard_ray.serve.http import Gate, build_api

    class Recorder:
        def __init__(self):
            self.seen = []

        def observe(self, route, status, seconds):
            self.seen.append((route, status))

    service, metrics, gate = _Service(), Recorder(), Gate(retry_after_s=1.5)
    service.mode = "slow"  # 0.3 s per answer
    app = build_api(service, Limits(), gate=gate, metrics=metrics)

    async def drain_midway():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            running = [asyncio.create_task(c.post("/v1/answer", json=GOOD, headers={"x-request-id": f"r{i}"}))
                       for i in range(3)]
            await asyncio.sleep(0.1)
            in_flight = gate.in_flight
            gate.draining = True  # what Ingress.drain() does on SIGTERM
            late = await c.post("/v1/answer", json=GOOD, headers={"x-request-id": "late"})
            ready, health = await c.get("/readyz"), await c.get("/healthz")
            return in_flight, await asyncio.gather(*running), late, ready, health

    in_flight, done, late, ready, health = asyncio.run(drain_midway())
    assert in_flight == 3 and gate.in_flight == 0
    assert [r.status_code for r in done] == [200, 200, 200]  # the requests in progress finish
    assert late.status_code == 503 and late.headers["retry-after"] == "2"  # rounded up, never earlier
    assert late.json()["error"] == "draining" and late.json()["request_id"] == "late"
    assert ready.status_code == 503 and health.status_code == 200
    assert sorted(metrics.seen) == sorted([("/v1/answer", 200)] * 3 + [("/v1/answer", 503), ("/readyz", 503),
                                                                     ("/healthz", 200)])


def test_proxy_turns_serves_plain_text_refusals_into_json():
    """kard_ray.serve.proxy.JsonRejections around an ASGI app that refuses like Serve's proxy does."""
    import asyncio

    import httpx

    from kard_ray.serve.proxy import JsonRejections, middlewares

    async def serve_like(scope, receive, send):
        if scope["path"].endswith("/ok"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"fine"})
            return
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"35"),
                                (b"retry-after", b"1"), (b"x-request-id", b"abc")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    async def calls():
        app = JsonRejections(serve_like)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.post("/v1/answer"), await c.post("/v1/chat/completions"), await c.get("/ok"))

    native, chat, ok = asyncio.run(calls())
    assert native.status_code == 503 and native.headers["retry-after"] == "1" and native.headers["x-request-id"] == "abc"
    assert native.json()["error"] == "overloaded" and native.json()["request_id"] == "abc"
    assert "retry after 1 s" in native.json()["message"]
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "overloaded"  # OpenAI's envelope
    assert (ok.status_code, ok.text) == (200, "fine")
    from kard_ray.serve.proxy import AdmissionGate

    assert [m.cls for m in middlewares()] == [JsonRejections, AdmissionGate]  # the gate outermost


def test_admission_gate_is_first_come_first_served_and_refuses_past_its_queue_at_once():
    """kard_ray.serve.proxy.AdmissionGate around an ASGI app whose requests finish when the test says: 2 in the
    app, 2 waiting in arrival order, the fifth refused at once (503 + Retry-After, JSON); a waiter whose client
    leaves gives its place up; other methods and paths, and an app without published limits, pass untouched."""
    import asyncio

    import httpx

    from kard_ray.serve.proxy import BODY_SCOPE_KEY, AdmissionGate, Limits

    bodies = []

    async def scenario():
        entered, release = [], {}

        async def app(scope, receive, send):
            n = dict(scope["headers"]).get(b"x-n", b"-").decode()
            entered.append(n)
            bodies.append((scope.get(BODY_SCOPE_KEY), (await receive())["body"]))
            if n != "-":
                release[n] = asyncio.Event()
                await release[n].wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": n.encode()})

        limits = [[Limits(prefix="/v1/", ongoing=2, queued=2, retry_after_s=0.5, max_body_bytes=64)]]
        gate = AdmissionGate(app, read_limits=lambda: limits[0])
        lane = gate.lanes["/v1/"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as c:
            post = lambda n: asyncio.create_task(c.post("/v1/answer", headers={"x-n": n}, json={"q": n}))  # noqa: E731
            tasks = {}
            for n in "abcd":
                tasks[n] = post(n)
                await asyncio.sleep(0.01)
            assert entered == ["a", "b"] and (lane.ongoing, len(lane.waiting)) == (2, 2)
            other = httpx.AsyncClient(transport=httpx.ASGITransport(app=gate, client=("10.0.0.9", 9)), base_url="http://t")
            async with other:  # another connection: the one refused (the next request on it would be held)
                refused = await other.post("/v1/answer", headers={"x-request-id": "r1"})
            assert (await c.get("/v1/models")).status_code == 200 and (await c.post("/other")).status_code == 200
            release["b"].set()  # b's slot goes to c, the first waiter
            await asyncio.sleep(0.01)
            assert entered[-1] == "c" and (await tasks["b"]).text == "b"
            tasks["d"].cancel()  # d's client leaves while waiting
            await asyncio.sleep(0.01)
            assert len(lane.waiting) == 0 and lane.ongoing == 2
            tasks["e"] = post("e")
            await asyncio.sleep(0.01)
            assert len(lane.waiting) == 1 and "e" not in entered
            for n in "ace":
                await asyncio.sleep(0.01)
                release[n].set()
            assert [(await tasks[n]).text for n in "ace"] == ["a", "c", "e"]
            assert (lane.ongoing, len(lane.waiting)) == (0, 0) and entered.count("d") == 0
            limits[0], gate.read_at = [], float("-inf")  # no application published: no gate
            free = await asyncio.gather(*(c.post("/v1/answer") for _ in range(6)))
        return refused, free

    refused, free = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.headers["x-request-id"] == "r1" and refused.json()["request_id"] == "r1"
    assert refused.json()["error"] == "overloaded"
    assert [r.status_code for r in free] == [200] * 6
    # an admitted request's body travels in the scope (no fetch back to the proxy) and reads the same;
    # one that passes no gate is read as usual
    assert bodies[0] == (b'{"q":"a"}', b'{"q":"a"}') and all(b[0] is None for b in bodies[-6:])


def test_admission_gate_refuses_a_retry_that_ignored_retry_after_once_that_time_has_passed():
    """A connection refused a moment ago that sends again before its Retry-After has passed is held until then
    (and a random part of half more) and refused, even with room by then (it cannot spin on refusals; nothing admitted waited in a hold); its next
    request is decided at once. Another connection is refused at once; with `hold_early_retries` false nothing
    is held."""
    import asyncio
    import time

    import httpx

    from kard_ray.serve.proxy import AdmissionGate, Limits, _Lane

    async def scenario(hold: bool):
        release = asyncio.Event()

        async def app(scope, receive, send):
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        lim = Limits(prefix="/v1/", ongoing=1, queued=1, retry_after_s=0.3, hold_early_retries=hold)
        gate = AdmissionGate(app, read_limits=lambda: [lim])

        def conn(port):
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=gate, client=("127.0.0.1", port)),
                                     base_url="http://t")

        async def timed(c):
            t = time.monotonic()
            r = await c.post("/v1/answer")
            return r.status_code, time.monotonic() - t

        async with conn(1) as a, conn(2) as b, conn(3) as spinner, conn(4) as fresh:
            held = [asyncio.create_task(a.post("/v1/answer")), asyncio.create_task(b.post("/v1/answer"))]
            await asyncio.sleep(0.01)  # a in the app, b waiting: full
            first = await timed(spinner)
            again = await timed(spinner)  # at once after its refusal: held 0.3 s, still full, refused
            other = await timed(fresh)
            retry = asyncio.create_task(timed(spinner))  # decided at once: refused (full), told again
            await asyncio.sleep(0.05)
            early = asyncio.create_task(timed(spinner))  # early again: held; room opens while it waits
            await asyncio.sleep(0.05)
            release.set()
            await asyncio.gather(*held)
            late = (await retry, await early, await timed(spinner))
        return first, again, other, late

    first, again, other, late = asyncio.run(scenario(hold=True))
    assert first[0] == 503 and first[1] < 0.1
    assert again[0] == 503 and 0.28 <= again[1] < 0.6  # held for its Retry-After (and up to half more), refused
    assert other[0] == 503 and other[1] < 0.1  # a connection not refused before is answered at once
    after_hold, early, next_one = late
    assert after_hold[0] == 503 and after_hold[1] < 0.1  # the request after a hold is decided at once
    assert early[0] == 503 and early[1] >= 0.2  # held while room opened (after 0.05 s), and still refused
    assert next_one[0] == 200 and next_one[1] < 0.1  # then decided at once: admitted
    first, again, other, late = asyncio.run(scenario(hold=False))
    assert [first[0], again[0], other[0]] == [503] * 3 and max(first[1], again[1], other[1]) < 0.1
    # the connections remembered stay bounded: past MAX_TOLD those whose Retry-After has passed go
    lane = _Lane()
    lane.MAX_TOLD = 3
    for port in range(3):
        lane.told_to_retry(("h", port), 0.0)
    lane.told_to_retry(("h", 9), time.monotonic() + 5)
    assert list(lane.told) == [("h", 9)] and lane.early_by(("h", 9), time.monotonic()) > 4
    assert lane.early_by(("h", 9), time.monotonic()) == 0.0  # told once: the next request is not held again


def test_admission_gate_frees_a_slot_when_the_answer_is_sent_not_when_the_proxy_returns():
    """Serve's proxy returns a little after the answer has gone out; a client's next request in between must find
    its slot free (else a closed-loop client at the capacity is refused by its own finished request)."""
    import asyncio

    import httpx

    from kard_ray.serve.proxy import AdmissionGate, Limits

    async def scenario():
        bookkeeping = asyncio.Event()

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            await bookkeeping.wait()  # the proxy's work after the answer

        gate = AdmissionGate(app, read_limits=lambda: [Limits(prefix="/v1/", ongoing=1, queued=0, retry_after_s=1)])
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            first = asyncio.create_task(c.post("/v1/answer"))
            await asyncio.sleep(0.05)  # answered; the app has not returned
            second = asyncio.create_task(c.post("/v1/answer"))
            await asyncio.sleep(0.05)
            bookkeeping.set()
            return (await first).status_code, (await second).status_code, gate.lanes["/v1/"].ongoing

    assert asyncio.run(scenario()) == (200, 200, 0)


def test_replayed_body_then_the_disconnect_skipping_the_body_sent_again():
    import asyncio

    from kard_ray.serve.proxy import replayed_body

    later = [{"type": "http.request", "body": b"x", "more_body": False}, {"type": "http.disconnect"}]

    async def receive():
        return later.pop(0)

    async def read():
        r = replayed_body(b"whole", receive)
        return [await r(), await r()]

    first, then = asyncio.run(read())
    assert first == {"type": "http.request", "body": b"whole", "more_body": False}
    assert then == {"type": "http.disconnect"}


def test_hey_csv_rows_give_codes_rates_and_the_most_answered_requests_in_flight():
    from kard_ray.serve.load import parse_hey_csv

    header = "response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n"
    rows = [  # (latency, status, sent at): three 200s overlap during [0.5, 1.0); the 503s do not count
        (1.0, 200, 0.0), (1.0, 200, 0.5), (0.5, 200, 0.5), (0.1, 503, 0.6), (0.1, 503, 0.6), (0.5, 200, 1.0),
        (0.2, 200, 2.0)]
    text = header + "".join(f"{t},0,0,0,{t},0,{s},{o}\n" for t, s, o in rows) + "not,a,row,,,,,\n"
    r = parse_hey_csv(text, concurrency=4, requested=8)
    assert r.codes == {200: 5, 503: 2} and r.failed == 1  # the unreadable row is a request without an answer
    assert r.wall_s == pytest.approx(2.2) and r.ok_rps == pytest.approx(5 / 2.2)
    assert r.max_in_flight(200) == 3  # at 1.0 one ends as another starts: still 3, not 4
    assert r.max_in_flight(503) == 2
    assert r.mean_in_flight(200) == pytest.approx((1.0 + 1.0 + 0.5 + 0.5 + 0.2) / 2.2)
