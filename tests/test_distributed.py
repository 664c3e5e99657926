"""Distributed for real, on one machine: S3-compatible storage, a multi-node `ray start` cluster, a lost
node, and Ray's autoscaler with its fake multi-node provider.

* The S3 server is moto's (real HTTP on 127.0.0.1, a bucket made with boto3; `s3_server` in conftest).
* `ray_cluster` (conftest) is one head with 0 CPUs and three worker nodes `a`, `b`, `c`, each started
  with `ray start --block` in its own session and --temp-dir, with the S3 settings in its environment.
* One `ray job submit --working-dir .` of jobs/distill.py runs the whole pipeline with run_dir=s3://...:
  the student on 2 Ray Train workers on different nodes (each asks for the `kard_trainer` resource the
  worker nodes offer once), dense embedding and batch retrieval on the worker nodes (the head has no
  CPU), every artifact and checkpoint in the bucket. Mid-training the test SIGKILLs a node that holds a
  training worker; the student must resume on the surviving and the spare node from the last S3
  checkpoint at its exact step and the pipeline finish.
* The autoscaler test runs a pipeline stage on a head of 0 CPUs whose worker types are read from
  cluster/aws.yaml, and watches nodes come for the stage and go after the idle timeout.

Timings measured here are printed (`-s` shows them) and quoted in the README.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from kard_ray import io

REPO = Path(__file__).resolve().parents[1]

# The spare node is up before the job starts, so the kill comes right after the first checkpoint (+10 steps).
MAX_STEPS, CKPT_EVERY, LOG_EVERY = 600, 150, 10


def _s3_files(uri: str) -> list[str]:
    """Every object under `uri` (relative paths)."""
    fs, inner = io.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(i.path[len(inner) + 1:] for i in infos if i.type == pafs.FileType.File)


def _checkpoint_steps(uri: str) -> list[int]:
    """Steps of the checkpoint directories under `uri` that hold rank 0's meta.json."""
    return sorted(int(m.group(1)) for f in _s3_files(uri) if (m := re.fullmatch(r"checkpoint_step(\d+)/meta\.json", f)))


def _logged_steps(uri: str) -> list[int]:
    """Steps in a train log that rank 0 rewrites in the bucket while the test polls it: a read racing a
    rewrite can see a cut-off object (pyarrow sizes the object, then reads it), so a line that does not
    parse ends the list; the next poll sees the whole log."""
    try:
        text = io.read_bytes(uri).decode()
    except (FileNotFoundError, OSError):
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"]) if line.strip() else None
        except (ValueError, KeyError):
            break
    return steps


def _stage_status(run: io.RunDir, stage: str) -> str | None:
    """A stage's status in the manifest the job rewrites in the bucket (None while unreadable: see above)."""
    try:
        return io.read_json(run.manifest)["stages"].get(stage, {}).get("status") if io.exists(run.manifest) else None
    except (ValueError, OSError):
        return None


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


def _train_worker_nodes(ray_cluster) -> list[str]:
    """Names of the nodes that hold an alive Ray Train worker now (the state API's actor table)."""
    r = ray_cluster.ray("list", "actors", "--format", "json", "--detail", "--limit", "10000",
                        "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE")
    try:
        actors = json.loads(r.stdout) if r.returncode == 0 else []
    except ValueError:  # a warning on stdout: ask again on the next poll
        return []
    names = {v: k for k, v in ray_cluster.alive_nodes().items()}
    return sorted(names.get(a["node_id"], "?") for a in actors)


@pytest.fixture(scope="module")
def two_node_run(ray_cluster, s3_server, tiny_bert_dir):
    """Submit the pipeline; once a checkpoint is in S3 and training is past it, SIGKILL one of the two nodes
    holding a training worker; wait for the job. The resume time below is node loss -> failure detected ->
    worker group restarted on the surviving and the spare node -> checkpoint restored -> first step trained."""
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

    # Kill between checkpoints: once a checkpoint exists and training is 10 steps past it (so every rank
    # has reported it), before the next one.
    # Where the two workers are is read once training has begun (the CLI takes seconds; the placement does
    # not change until a node is lost), so the kill itself is immediate.
    seen_at: dict[int, float] = {}
    killed, placed = None, None
    next_status = time.time() + 15
    deadline = time.time() + 900
    while killed is None and time.time() < deadline:
        for c in _checkpoint_steps(ckpts):
            seen_at.setdefault(c, time.time())
        steps = _logged_steps(log)
        last = steps[-1] if steps else 0
        if steps and placed is None:
            found = _train_worker_nodes(ray_cluster)
            placed = found if len(found) == 2 and "?" not in found else None
            continue
        done = [c for c, t in seen_at.items() if c + 10 <= last and time.time() - t >= 2]
        if done and placed and last < MAX_STEPS - 10:
            victim, survivor = placed
            ray_cluster.kill(victim)
            killed = {"t": time.time(), "last_logged": last, "expected_resume": max(done), "node": victim,
                      "survivor": survivor, "log_before": io.read_bytes(log)}
            break
        if time.time() > next_status:  # the manifest in the bucket, not the slow `ray job status` CLI
            next_status = time.time() + 5
            if _stage_status(run, "student") in ("done", "failed"):
                break  # the student finished without a kill: fails below
        time.sleep(0.3)
    assert killed, f"never saw a checkpoint to resume from (checkpoints {sorted(seen_at)}, log {_logged_steps(log)[-3:]})\n" \
                   f"{ray_cluster.job_logs(job_id)[-4000:]}"

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
    t_end = time.time()
    result = {"job_id": job_id, "status": status, "logs": logs, "run": run, "killed": killed,
              "resume_s": None if resumed_at is None else resumed_at - killed["t"], "total_s": t_end - t0,
              "nodes": ray_cluster.alive_nodes(), "all_nodes": ray_cluster.nodes()}
    print(f"\n[two-node job] {status} in {t_end - t0:.0f} s; node {killed['node']} killed after step {killed['last_logged']}, "
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
    assert [s for s, e in stages.items() if e["status"] == "done"] == \
        ["questions", "knowledge", "teacher", "examples", "student", "evaluate"]  # in data-flow order
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
    # before the loss on the victim and a survivor; after it on the survivor and the spare node
    victim, survivor = r["killed"]["node"], r["killed"]["survivor"]
    (spare,) = {"a", "b", "c"} - {victim, survivor}
    assert {victim, survivor} in [set(n) for n in by_attempt.values()], by_attempt
    assert {survivor, spare} in [set(n) for n in by_attempt.values()], by_attempt
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
    # The bucket holds exactly the checkpoints the config keeps (the last 2), each once (beside Ray Train's
    # own checkpoint_manager_snapshot.json).
    ckpt_dirs = sorted({f.split("/")[0] for f in _s3_files(run.path("checkpoints", "student_kard")) if f.startswith("checkpoint_step")})
    assert ckpt_dirs == [f"checkpoint_step{s:08d}" for s in (MAX_STEPS - CKPT_EVERY, MAX_STEPS)], ckpt_dirs
    assert io.read_json(run.manifest)["stages"]["evaluate"]["status"] == "done"
    assert r["resume_s"] is not None
    print(f"\n[lost node] resumed at step {expected}; node loss -> first step trained again: {r['resume_s']:.1f} s")


# ------------------------------------------------------------------------------------------------
# the autoscaler: Ray's fake multi-node provider, node types from cluster/aws.yaml

AUTOSCALE_IDLE_MIN = 0.25  # the YAML's 10 minutes, shortened for the test


def _autoscaling_config(launcher_yaml: Path, gcs_address: str) -> dict:
    """The cluster config `ray.cluster_utils.AutoscalingCluster` generates (fake_multinode provider,
    head type `ray.head.default`), with the head and worker shapes of a launcher YAML: its resources per
    node type, min_workers as written, max_workers capped at 2.

    Written here rather than by AutoscalingCluster: the wheel lacks the fake provider's example.yaml
    that its constructor reads, and its start()/shutdown() run `ray stop --force`, which stops every
    Ray on the machine, not only its own."""
    doc = yaml.safe_load(launcher_yaml.read_text())
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    workers = {name: {"resources": {**spec["resources"], "object_store_memory": 150 * 1024 * 1024},
                      "node_config": {}, "min_workers": spec["min_workers"], "max_workers": min(spec["max_workers"], 2)}
               for name, spec in types.items() if name != doc["head_node_type"]}
    return {"cluster_name": "kard-fake", "max_workers": sum(w["max_workers"] for w in workers.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": {**workers, "ray.head.default": {"resources": head["resources"], "node_config": {},
                                                                     "max_workers": 0}},
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": doc.get("upscaling_speed", 1.0),
            "idle_timeout_minutes": AUTOSCALE_IDLE_MIN, "docker": {}, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


@pytest.mark.timeout(1200)
def test_autoscaler_launches_workers_for_a_stage_and_releases_them(s3_server):
    from conftest import CLUSTER_ENV, RayNodes

    launcher = REPO / "cluster" / "aws.yaml"
    env = {**CLUSTER_ENV, **s3_server["env"], "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    nodes = RayNodes(env, prefix="krdas")
    env["RAY_TMPDIR"] = nodes.root  # the nodes the provider starts put their files here too
    config = _autoscaling_config(launcher, f"127.0.0.1:{nodes.gcs_port}")
    cfg_path = Path(nodes.root, "autoscaling.json")
    cfg_path.write_text(json.dumps(config))
    head_cpus = config["available_node_types"]["ray.head.default"]["resources"]["CPU"]
    assert head_cpus == 0
    run_dir = f"s3://{s3_server['bucket']}/autoscale"
    seen: dict[str, dict] = {}
    try:
        nodes.start_head(num_cpus=head_cpus, extra=[f"--autoscaling-config={cfg_path}"], env=env)
        # min_workers 0: no worker before there is work. The head's own entry can lag its job server on a
        # loaded machine (seen: no node listed yet; and not within 60 s while the suite's family runs trained
        # beside it at idle priority), hence a wait for exactly the head.
        nodes.wait_for(lambda: set(nodes.alive_nodes()) == {"head"}, 180, "the head alone in the node list")
        # No --working-dir: the fake provider's nodes share the head's session directory, and one released
        # there takes the job's unpacked working_dir with it. The code is this machine's install (an image's).
        job = nodes.submit(["python", str(REPO / "jobs" / "build_index.py"), "--config", str(REPO / "configs" / "demo.yaml"),
                            f"run_dir={run_dir}", "data.synthetic.n_train_entities=20",
                            "data.synthetic.n_test_entities=2"], None)
        t0 = time.time()
        status = None
        while status is None and time.time() - t0 < 900:
            for n in nodes.nodes():
                if n.get("state") == "ALIVE" and not any(k.startswith("kard_node_") for k in n["resources_total"]):
                    seen.setdefault(n["node_id"], {"resources": n["resources_total"], "t": time.time() - t0})
            status = nodes.job_status(job)
        logs = nodes.job_logs(job)
        assert status == "succeeded", logs[-5000:]
        manifest = io.read_json(io.join(run_dir, "manifest.json"))
        assert manifest["stages"]["questions"]["status"] == manifest["stages"]["knowledge"]["status"] == "done"
        assert io.exists(io.join(run_dir, "index", "bm25"))

        # Launched for the stage: CPU nodes of the YAML's cpu type only (no GPU node for a CPU stage), at
        # most its max_workers.
        cpu_type = config["available_node_types"]["cpu_worker"]["resources"]
        assert 1 <= len(seen) <= config["available_node_types"]["cpu_worker"]["max_workers"], seen
        for n in seen.values():
            assert n["resources"].get("CPU") == cpu_type["CPU"] and "GPU" not in n["resources"], n
        # Released once idle for idle_timeout_minutes.
        t_done = time.time()
        nodes.wait_for(lambda: set(nodes.alive_nodes()) == {"head"} and
                       all(n.get("state") != "ALIVE" for n in nodes.nodes() if n["node_id"] in seen),
                       120 + AUTOSCALE_IDLE_MIN * 60, "idle worker nodes to be released", every=2)
        print(f"\n[autoscaler] {len(seen)} cpu_worker node(s) launched (first after {min(n['t'] for n in seen.values()):.0f} s), "
              f"stage done in {t_done - t0:.0f} s, released {time.time() - t_done:.0f} s after it "
              f"(idle timeout {AUTOSCALE_IDLE_MIN * 60:.0f} s)")
    finally:
        left = nodes.shutdown()
        assert not left, f"processes of the autoscaling cluster still running: {left}"
