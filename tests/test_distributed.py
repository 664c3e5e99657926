"""Distributed for real, on one machine: S3-compatible storage, a multi-node `ray start` cluster, a lost
node, and Ray's autoscaler with its fake multi-node provider.

* The S3 server is moto's (real HTTP on 127.0.0.1, a bucket made with boto3; `s3_server` in conftest).
* `ray_cluster` (conftest) is one head with 0 CPUs and two worker nodes `a` and `b`, each started with
  `ray start --block` in its own session and --temp-dir, with the S3 settings in its environment.
* One `ray job submit` of jobs/distill.py runs the whole pipeline with run_dir=s3://...: the student on
  2 Ray Train workers on different nodes (each asks for the `kard_trainer` resource the worker nodes
  offer once), dense embedding and batch retrieval on the worker nodes (the head has no CPU), every
  artifact and checkpoint in the bucket. Mid-training the test SIGKILLs worker node `b` and starts `c`;
  the student must resume from the last S3 checkpoint at its exact step and the pipeline finish.
* The autoscaler test runs a pipeline stage on a head of 0 CPUs whose worker types are read from
  cluster/aws.yaml, and watches nodes come for the stage and go after the idle timeout.

Timings measured here are printed (`-s` shows them) and quoted in the README.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from kard_ray import io

REPO = Path(__file__).resolve().parents[1]

MAX_STEPS, CKPT_EVERY, LOG_EVERY = 90, 30, 5


def _s3_files(uri: str) -> list[str]:
    """Every object under `uri` (relative paths)."""
    fs, inner = io.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(i.path[len(inner) + 1:] for i in infos if i.type == pafs.FileType.File)


def _checkpoint_steps(uri: str) -> list[int]:
    """Steps of the checkpoint directories under `uri` that hold rank 0's meta.json."""
    return sorted(int(m.group(1)) for f in _s3_files(uri) if (m := re.fullmatch(r"checkpoint_step(\d+)/meta\.json", f)))


def _logged_steps(uri: str) -> list[int]:
    try:
        text = io.read_bytes(uri).decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line)["step"] for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# S3 through pyarrow, the endpoint in the URI


def test_s3_uri_parameters_reach_every_io_helper(s3_server, tmp_path, monkeypatch):
    """run_dir=s3://bucket/x?endpoint_override=...&scheme=http: the parameters stay on every derived path
    and reach Ray Train's storage; credentials come from the environment only."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the URI alone must name the endpoint
    base = f"s3://{s3_server['bucket']}/uri_params?endpoint_override={s3_server['host_port']}&scheme=http&region=us-east-1"
    run = io.RunDir(base)
    assert run.manifest.endswith("/uri_params/manifest.json?endpoint_override=" + s3_server["host_port"] + "&scheme=http&region=us-east-1")
    io.write_json(run.manifest, {"ok": 1})
    assert io.read_json(run.manifest) == {"ok": 1} and io.exists(run.manifest)
    assert io.list_files(base) == [run.manifest]

    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text('{"a": 1}')
    io.upload_dir(str(local), run.model("m"))
    copy = io.local_copy(run.model("m"))
    assert json.loads(Path(copy, "config.json").read_text()) == {"a": 1}
    assert io.local_copy(run.model("m")) == copy  # unchanged remote: the cached copy is reused
    with io.staged_dir(run.model("m")) as d:
        Path(d, "config.json").write_text('{"a": 2}')
    assert json.loads(Path(io.local_copy(run.model("m")), "config.json").read_text()) == {"a": 2}

    with pytest.raises(RuntimeError):
        with io.staged_dir(run.model("failed")) as d:
            Path(d, "half.bin").write_bytes(b"x")
            raise RuntimeError("the writer failed")
    assert not io.exists(run.model("failed"))  # nothing uploaded after an error

    path, fs = io.train_storage(run.checkpoints)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_server['bucket']}/uri_params/checkpoints"
    with fs.open_output_stream(f"{path}/probe") as fh:  # the same endpoint as the rest of the run
        fh.write(b"1")
    assert io.exists(io.join(run.checkpoints, "probe"))


# ------------------------------------------------------------------------------------------------
# the whole pipeline on two nodes, run_dir on S3, a node lost mid-training


@pytest.fixture(scope="module")
def two_node_run(ray_cluster, s3_server, tiny_bert_dir):
    """Submit the pipeline, kill worker node `b` once the student has a checkpoint, start `c`, wait."""
    bucket = s3_server["bucket"]
    run_dir = f"s3://{bucket}/two_nodes"
    encoder = f"s3://{bucket}/encoders/tiny_bert"
    io.upload_dir(tiny_bert_dir, encoder)  # the dense encoder is read from the bucket, like every input
    entry = ["python", "jobs/distill.py", "--config", "configs/demo.yaml", f"run_dir={run_dir}", "methods=[kard_bm25]",
             "data.synthetic.n_train_entities=40", "data.synthetic.n_test_entities=2",
             "knowledge.retriever=hybrid", f"knowledge.dense.encoder={encoder}", "knowledge.dense.num_cpus_per_actor=0.5",
             "student.tiny.d_model=32", "student.tiny.n_heads=2", "student.tiny.d_ff=64", "student.tiny.n_layers=1",
             "student.num_workers=2", "student.cpus_per_worker=1", "student.resources_per_worker={kard_trainer: 1}",
             "student.batch_size=4", f"student.max_steps={MAX_STEPS}", f"student.checkpoint_every_steps={CKPT_EVERY}",
             f"student.log_every_steps={LOG_EVERY}", "student.max_failures=3",
             "eval.max_new_tokens=8", "eval.oracle=false", "eval.num_cpus_per_actor=0.5"]
    t0 = time.time()
    job_id = ray_cluster.submit(entry, str(REPO))
    run = io.RunDir(run_dir)
    ckpts, log = run.path("checkpoints", "student_kard"), run.path("models", "student_kard", "train_log.jsonl")

    # Kill `b` between checkpoints: once a checkpoint exists and training is 10 steps past it (so every rank
    # has reported it), before the next one.
    seen_at: dict[int, float] = {}
    killed = None
    next_status = time.time() + 15
    deadline = time.time() + 900
    while killed is None and time.time() < deadline:
        for c in _checkpoint_steps(ckpts):
            seen_at.setdefault(c, time.time())
        steps = _logged_steps(log)
        last = steps[-1] if steps else 0
        done = [c for c, t in seen_at.items() if c + 10 <= last and time.time() - t >= 2]
        if done and last < MAX_STEPS - 10:
            expected = max(done)
            ray_cluster.kill("b")
            killed = {"t": time.time(), "last_logged": last, "expected_resume": expected,
                      "log_before": io.read_bytes(log)}
            break
        if time.time() > next_status:
            next_status = time.time() + 15
            if ray_cluster.job_status(job_id):
                break  # the job ended without a checkpoint to resume from: fails below
        time.sleep(0.3)
    assert killed, f"never saw a checkpoint to resume from (checkpoints {sorted(seen_at)}, log {_logged_steps(log)[-3:]})\n" \
                   f"{ray_cluster.job_logs(job_id)[-4000:]}"
    # The replacement node, started in the background so the log is watched meanwhile.
    import threading

    starter = threading.Thread(target=ray_cluster.add_worker, args=("c", 2, {"kard_trainer": 1}), daemon=True)
    starter.start()

    # Resumed: rank 0 of the new worker group rewrites the train log (from the checkpoint's copy) at its
    # first flush, so the first change of the log after the kill is the first step trained after it.
    resumed_at = None
    while resumed_at is None and time.time() < deadline:
        try:
            if io.read_bytes(log) != killed["log_before"]:
                resumed_at = time.time()
        except OSError:
            pass
        time.sleep(0.3)
    status, logs = ray_cluster.wait_job(job_id, timeout=max(60, deadline - time.time()))
    starter.join(timeout=60)
    t_end = time.time()
    result = {"job_id": job_id, "status": status, "logs": logs, "run": run, "killed": killed,
              "resume_s": None if resumed_at is None else resumed_at - killed["t"], "total_s": t_end - t0,
              "nodes": ray_cluster.alive_nodes(), "all_nodes": ray_cluster.nodes()}
    print(f"\n[two-node job] {status} in {t_end - t0:.0f} s; node b killed after step {killed['last_logged']}, "
          f"training resumed {result['resume_s']:.1f} s later" if resumed_at else f"\n[two-node job] {status}")
    return result


def _actors(ray_cluster, job_id: str) -> list[dict]:
    jobs = json.loads(ray_cluster.ray("list", "jobs", "--format", "json", "--detail").stdout)
    (ray_job,) = [j["job_id"] for j in jobs if j.get("submission_id") == job_id]
    r = ray_cluster.ray("list", "actors", "--format", "json", "--detail", "--limit", "10000",
                        "--filter", f"job_id={ray_job}")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.timeout(1500)
def test_pipeline_job_on_two_nodes_with_run_dir_on_s3(two_node_run, ray_cluster):
    r = two_node_run
    assert r["status"] == "succeeded", r["logs"][-6000:]
    run: io.RunDir = r["run"]
    manifest = io.read_json(run.manifest)
    stages = manifest["stages"]
    assert {"questions", "knowledge", "teacher", "examples", "student", "evaluate"} <= set(stages)
    assert all(s["status"] == "done" for s in stages.values()), stages
    files = _s3_files(run.root)
    for prefix in ["manifest.json", "config.yaml", "questions/train.parquet", "questions/test.parquet", "passages/",
                   "index/bm25/", "index/faiss/", "index/embeddings/", "rationales/", "examples/student_kard/",
                   "models/init_t5/config.json", "models/student_kard/config.json",
                   "models/student_kard/train_summary.json", "checkpoints/student_kard/", "eval/metrics.json",
                   "eval/results.md", "eval/predictions/kard_bm25/"]:
        assert any(f == prefix or f.startswith(prefix) for f in files), f"{prefix} not in the bucket"
    assert "| kard_bm25 |" in r["logs"], "the job prints the results table"
    # Nothing was written to a local path named like the URI (a stage that forgot it was on S3).
    strays = [str(p) for p in Path(ray_cluster.root).rglob("*") if p.name in ("s3:", "two_nodes")]
    assert strays == []

    # Where things ran (the state API's actor table for this job).
    names = {n["node_id"]: next((k.removeprefix("kard_node_") for k in n["resources_total"] if k.startswith("kard_node_")), "?")
             for n in r["all_nodes"]}
    actors = _actors(ray_cluster, r["job_id"])
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(workers) >= 4, workers  # two per attempt: before and after the lost node
    by_attempt: dict[str, list[str]] = {}
    for a in workers:
        by_attempt.setdefault(a.get("placement_group_id") or a["actor_id"], []).append(names[a["node_id"]])
    for nodes in by_attempt.values():
        assert len(nodes) == 2 and len(set(nodes)) == 2 and "head" not in nodes, by_attempt
    assert {"a", "b"} in [set(n) for n in by_attempt.values()]
    assert {"a", "c"} in [set(n) for n in by_attempt.values()]
    for kind in ("Embed", "Retrieve"):
        placed = {names[a["node_id"]] for a in actors if kind in a["class_name"]}
        assert placed and "head" not in placed, (kind, sorted({a["class_name"] for a in actors}))
    summary = io.read_json(run.path("models", "student_kard", "train_summary.json"))
    assert summary["world"] == 2 and summary["steps"] == MAX_STEPS, summary


@pytest.mark.timeout(1500)
def test_lost_node_resumes_from_the_s3_checkpoint_at_the_exact_step(two_node_run):
    r = two_node_run
    assert r["status"] == "succeeded", r["logs"][-6000:]
    run: io.RunDir = r["run"]
    expected = r["killed"]["expected_resume"]
    resumed = [int(s) for s in re.findall(r"\[\w+\] resumed from \S+ at step (\d+)", r["logs"])]
    assert resumed == [expected], (resumed, r["killed"])
    assert r["killed"]["last_logged"] < MAX_STEPS  # it really was mid-training
    # Every step once in the final log: none lost, none counted twice across the two attempts.
    assert _logged_steps(run.path("models", "student_kard", "train_log.jsonl")) == list(range(1, MAX_STEPS + 1))
    # The bucket holds exactly the checkpoints the config keeps (the last 2), each once.
    ckpt_dirs = sorted({f.split("/")[0] for f in _s3_files(run.path("checkpoints", "student_kard")) if f.startswith("checkpoint_")})
    assert ckpt_dirs == [f"checkpoint_step{s:08d}" for s in (MAX_STEPS - CKPT_EVERY, MAX_STEPS)], ckpt_dirs
    assert io.read_json(run.manifest)["stages"]["evaluate"]["status"] == "done"
    assert r["resume_s"] is not None
    print(f"\n[lost node] resumed at step {expected}; node loss -> first step trained again: {r['resume_s']:.1f} s")
