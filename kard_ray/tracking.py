"""Experiment tracking: one MLflow run per `pipeline.run`, written when the pipeline finishes.

What is recorded (`tracking.mlflow: true`, the `tracking` extra: `pip install -e ".[tracking]"`):
params = the resolved config (dotted keys), metrics = every logged step of every training in the run
directory (`<model>/train_log.jsonl`: loss, learning rate, grad norm under `<model>/...`) and the
evaluation metrics (`eval/<method>/accuracy`, ...), artifacts = results.md, accuracy.png,
metrics.json, the manifest and each training's summary.

Written from the run directory after the stages, not live from the training workers: a training that
lost a worker resumes from its checkpoint and trains some steps again, and the run directory's train log
is the one record without those repeats (rank 0 rewrites it from the checkpoint), so every step is
logged exactly once. The tracking store: `tracking.uri`, else a SQLite store in the run directory
(`sqlite:///<run_dir>/mlflow.db`, artifacts under `<run_dir>/mlartifacts`; MLflow 3 keeps its plain-file
store in maintenance mode and refuses it by default).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from kard_ray import io
from kard_ray.config import KardConfig

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value


def tracking_uri(cfg: KardConfig) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment or None for the store's default)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri, None
    if io.is_uri(cfg.run_dir):
        raise ValueError(f"tracking.uri: run_dir {cfg.run_dir!r} is a URI, where no SQLite store can live; "
                         "set tracking.uri (e.g. http://mlflow:5000 or sqlite:////shared/mlflow.db)")
    root = os.path.abspath(cfg.run_dir)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}", "file://" + os.path.join(root, "mlartifacts")


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"student.lr": "0.0015", ...}: the config as MLflow params (lists and nulls as JSON)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:PARAM_VALUE_LIMIT]
    return out


def _train_metrics(name: str, log_path: str) -> list:
    """One MLflow Metric per logged value of a train log (loss, lr, grad_norm, ... per step)."""
    from mlflow.entities import Metric

    out = []
    now = int(time.time() * 1000)
    for _, line in io.iter_text_lines(log_path):
        if not line.strip():
            continue
        entry = json.loads(line)
        step = int(entry["step"])
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(Metric(f"{name}/{key}", float(value), now, step))
    return out


def _eval_metrics(metrics: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    out = []
    for method, m in metrics.get("methods", {}).items():
        for key in ("accuracy", "parsed_accuracy", "answered", "unreadable", "truncated", "n"):
            if key in m:
                out.append(Metric(f"eval/{method}/{key}", float(m[key]), now, 0))
    return out


def _log_batches(client, run_id: str, metrics: list, batch: int = 1000) -> None:
    for i in range(0, len(metrics), batch):  # MLflow caps one log_batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + batch])


def record_run(cfg: KardConfig, run: io.RunDir, manifest: dict, status: str = "FINISHED") -> str:
    """Write this pipeline run to MLflow; returns the MLflow run id."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri, artifacts = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    mlrun = client.create_run(exp_id, run_name=os.path.basename(run.root.rstrip("/")) or run.root,
                              tags={"kard.run_dir": run.root, "kard.config_hash": manifest.get("config_hash", "")})
    rid = mlrun.info.run_id
    params = [Param(k, v) for k, v in flat_params(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):  # MLflow caps one log_batch at 100 params
        client.log_batch(rid, params=params[i:i + 100])
    for model in sorted(_trained_models(run)):
        _log_batches(client, rid, _train_metrics(model, run.path("models", model, "train_log.jsonl")))
        summary = run.path("models", model, "train_summary.json")
        if io.exists(summary):
            client.log_text(rid, io.read_bytes(summary).decode(), f"train/{model}_summary.json")
    metrics_path = run.path("eval", "metrics.json")
    if io.exists(metrics_path):
        _log_batches(client, rid, _eval_metrics(io.read_json(metrics_path)))
        for name in ("results.md", "metrics.json"):
            client.log_text(rid, io.read_bytes(run.path("eval", name)).decode(), f"eval/{name}")
        png = run.path("eval", "accuracy.png")
        if io.exists(png):
            with mlflow.utils.file_utils.TempDir() as tmp:
                local = os.path.join(tmp.path(), "accuracy.png")
                with open(local, "wb") as fh:
                    fh.write(io.read_bytes(png))
                client.log_artifact(rid, local, "eval")
    client.log_text(rid, json.dumps(manifest, indent=2, default=str), "manifest.json")
    client.set_terminated(rid, status)
    return rid


def _trained_models(run: io.RunDir) -> list[str]:
    models = run.path("models")
    if not io.exists(models):
        return []
    names = {p[len(models):].strip("/").split("/")[0] for p in io.list_files(models, ("train_log.jsonl",))}
    return [n for n in names if n]
