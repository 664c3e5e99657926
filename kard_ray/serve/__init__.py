"""Ray Serve: the distilled student as an HTTP service.

    Ingress (FastAPI) ──► Retriever (BM25/dense/hybrid) ──► Reranker ──► Generator (student, dynamic batching)

    serve run kard_ray.serve:build_app run_dir=runs/demo
    serve deploy configs/serve.yaml
    kard-ray serve runs/demo serve.port=8080

POST /v1/answer {question, options[], k?, candidates?, return_passages?} ->
{answer_index, answer_letter, answer_text, rationale, generation, method, passages[], timings_ms};
POST /v1/retrieve; POST /v1/chat/completions and GET /v1/models (OpenAI, `stream: true` as SSE);
POST /v1/rerank (Cohere/Jina shape); GET /healthz, /readyz; OpenAPI at /docs. Bounded queues answer
overload with 503 + Retry-After (kard_ray.serve.proxy), SIGTERM drains (app.drain).
"""

from kard_ray.serve.api import Limits, request_models
from kard_ray.serve.app import (APP_NAME, DEPLOYMENTS, app_from_config, build_app, deployment_options, drain,
                                load_run_config, served_method, serve_run_dir, start)

__all__ = ["APP_NAME", "DEPLOYMENTS", "Limits", "app_from_config", "build_app", "deployment_options", "drain",
           "load_run_config", "request_models", "served_method", "serve_run_dir", "start"]
