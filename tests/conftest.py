"""Shared fixtures: one local Ray instance per test session, tiny offline models, the synthetic task.

Everything is built locally (no hub downloads): HF_HUB_OFFLINE is set before transformers loads.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The tests start their own local Ray; never join a cluster that happens to be configured.
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KARD_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    # The tests that need the test-size family runs go last: the runs start with the session, at idle priority
    # (`_family_runs_started`), and train on the cores the tests before them leave free.
    items.sort(key=lambda item: "family_runs" in item.fixturenames)  # stable: file order otherwise kept
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real StrategyQA files in ../shared/data; tests that need them skip on a user's clone."""
    d = SHARED_DATA / "strategyqa"
    if not (d / "train.jsonl").exists():
        pytest.skip(f"shared data not found at {d} (it ships beside the repo for CI, not in it); "
                    "set KARD_SHARED_DATA to its data/ folder to run this test")
    return d


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session.

    4 logical CPUs on a 2-core machine: Ray Data deadlocks when an actor pool takes every CPU
    (the read task cannot be scheduled; RAY_NOTES.md, ray#44687).
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another process left on the machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}})
    from kard_ray.runtime import configure_data_context

    configure_data_context()  # as every kard-ray job has it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_cfg():
    from kard_ray.config import SyntheticConfig

    # distractor_templates=own: the unit tests' small task keeps distractors a tiny reranker separates in tens
    # of steps; the facts-template distractors (the default) are the demo tests' and test_data's
    return SyntheticConfig(n_train_entities=40, n_test_entities=10, rationales_per_question=2, seed=7,
                           distractor_templates="own")


@pytest.fixture(scope="session")
def synthetic_task(synthetic_cfg):
    from kard_ray.data.synthetic import make_task

    return make_task(synthetic_cfg)


@pytest.fixture(scope="session")
def tiny_cfg():
    from kard_ray.config import TinyModelConfig

    return TinyModelConfig(d_model=64, n_layers=1, n_heads=2, d_ff=128, vocab_size=1000)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, synthetic_task, tiny_cfg) -> str:
    """A tiny T5 + BPE tokenizer trained on the synthetic task, saved with save_pretrained."""
    from kard_ray.data.synthetic import task_texts
    from kard_ray.models import save_tiny_model

    return save_tiny_model("t5", task_texts(synthetic_task), tiny_cfg, str(tmp_path_factory.mktemp("tiny_t5")))


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, synthetic_task, tiny_cfg) -> str:
    """A tiny Llama-style decoder-only student + BPE tokenizer trained on the synthetic task."""
    from kard_ray.data.synthetic import task_texts
    from kard_ray.models import save_tiny_model

    return save_tiny_model("causal", task_texts(synthetic_task), tiny_cfg, str(tmp_path_factory.mktemp("tiny_causal")))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, synthetic_task, tiny_cfg) -> str:
    """A tiny BERT encoder + tokenizer (reranker / embedder tests)."""
    from kard_ray.data.synthetic import task_texts
    from kard_ray.models import save_tiny_model

    return save_tiny_model("bert", task_texts(synthetic_task), tiny_cfg, str(tmp_path_factory.mktemp("tiny_bert")))


# The demo at test size (configs/demo.yaml with fewer entities and steps): RD and KARD students, the
# reranker, evaluation. Shared by the pipeline tests (the KARD effect, artifacts, stage skipping) and the
# Serve tests (served answers equal these offline predictions), so the suite trains it once. The second
# task family (configs/demo_people.yaml: the same config apart from its data section) runs at the same size.
DEMO_TEST_OVERRIDES = [
    "methods=[ft,rd,kard_bm25,kard_reranker]",
    "data.synthetic.n_test_entities=25",
    "student.max_steps=1000",  # 1,500 in configs/demo.yaml; at 800 KARD looped on 9% of towns names (README: Tests)
    "student.checkpoint_every_steps=0",
    "eval.oracle=false",
]
# The second family runs with decoder-only students (a tiny Llama-style causal LM): the same recipe on other
# data and another architecture, in one run instead of a third (README: Tests). 700 steps: its students were the
# suite's longest stage (731 s at 1,000); at 700, RD 0.24, KARD-BM25 0.67, KARD-reranker 0.99, none truncated
# (0.32 / 0.67 / 0.99 at 1,000), so the demo run, not this one, sets the wait.
PEOPLE_TEST_OVERRIDES = ["methods=[rd,kard_bm25,kard_reranker]",
                         *(o for o in DEMO_TEST_OVERRIDES[1:] if not o.startswith("student.max_steps=")),
                         "student.max_steps=700", "student.architecture=causal"]


FAMILY_RUNS = {  # fixture -> (config, test-size overrides, env var naming a run directory to reuse)
    "demo_run": ("demo.yaml", DEMO_TEST_OVERRIDES, "KARD_TEST_DEMO_RUN_DIR"),
    "people_run": ("demo_people.yaml", PEOPLE_TEST_OVERRIDES, "KARD_TEST_PEOPLE_RUN_DIR"),
}
# Both families at once, one core each, so one run's Ray start-up, data stages and evaluation overlap the
# other's training: 1,119 s for both, against 1,566 s one after the other at 1,200 steps; 983 s with the
# students in the CLI's process; 713 s (in a run of these two tests alone) with the rerankers there too
# (README "Tests").
# One core each, because two two-thread processes on two cores stall each other. A run started alone keeps
# the config's two threads.
CONCURRENT_OVERRIDES = ["student.cpus_per_worker=1", "student.num_workers=0", "reranker.num_workers=0"]
# the students and rerankers then train in the CLI's own process (Ray Train's local mode; the Ray Train worker
# path is tested in test_training_ray, test_retrain, test_distributed), whose torch gets one thread
CONCURRENT_ENV = {"OMP_NUM_THREADS": "1"}
IDLE_NICE = 19  # the family runs' priority: the lowest


def _start_demo_cli(config: str, overrides: list[str], run_dir: str, env_extra: dict | None = None):
    """The real CLI (`python jobs/distill.py`), as a user runs the demo, in its own process with its own
    embedded Ray; stdout and stderr together go to `<run_dir>.console.txt`."""
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "jobs" / "distill.py"), "--config", str(REPO / "configs" / config),
           *overrides, f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("KARD_VERBOSE", None)
    console = open(run_dir.rstrip("/") + ".console.txt", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: os.nice(IDLE_NICE))
    _lower_session_priority(proc.pid)
    return proc, console


def _lower_session_priority(pid: int) -> None:
    """Idle priority for a process and everything it starts (its embedded Ray's raylet, GCS and workers stay in
    its session). With the kernel's autogroup scheduling on, `nice` ranks tasks only inside one session, and
    sessions share the CPU as equals, so the session's own autogroup is lowered too."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(IDLE_NICE))
    except OSError:  # no autogroup scheduling here: the process's nice value alone ranks it
        pass


def _finished_run(proc, console, config: str, overrides: list[str], run_dir: str):
    """(config, manifest) of a test-size run once its process has exited 0 (`family_runs` stops it otherwise)."""
    from kard_ray import io
    from kard_ray.config import load_config

    code = proc.wait(timeout=3600)
    assert code == 0, Path(console.name).read_text()[-6000:]
    cfg = load_config(str(REPO / "configs" / config), overrides + [f"run_dir={run_dir}"])
    return cfg, io.read_json(io.RunDir(run_dir).manifest)


@pytest.fixture(scope="session", autouse=True)
def _family_runs_started(request, tmp_path_factory):
    """Starts the test-size runs this session's tests use when the session starts, at idle priority: they train
    while the other tests run, on the CPU those leave free, and barely slow them (the tests that wait for
    the runs are sorted last). {fixture name: (process, console, config, overrides, run_dir)}.
    KARD_TEST_DEMO_RUN_DIR / KARD_TEST_PEOPLE_RUN_DIR reuse a run directory (finished stages are skipped)."""
    wanted = [name for name in FAMILY_RUNS if any(name in item.fixturenames for item in request.session.items)]
    extra, env = (CONCURRENT_OVERRIDES, CONCURRENT_ENV) if len(wanted) > 1 else ([], {})
    started = {}
    try:
        for name in wanted:
            config, overrides, env_var = FAMILY_RUNS[name]
            run_dir = os.environ.get(env_var) or str(tmp_path_factory.mktemp(name))
            started[name] = (*_start_demo_cli(config, overrides + extra, run_dir, env), config, overrides + extra,
                             run_dir)
        yield started
    finally:  # a run still going when the session ends (or fails) is stopped
        _stop_runs(started)


def _stop_runs(started: dict) -> None:
    import signal

    for proc, console, *_ in started.values():
        if proc.poll() is None:  # the CLI and its embedded Ray: a session of their own
            RayNodes._kill_session(proc.pid, signal.SIGKILL)
            proc.wait()
        console.close()


@pytest.fixture(scope="session")
def family_runs(_family_runs_started) -> dict:
    """{fixture name: (config, manifest)} of the test-size runs, once they have finished."""
    try:
        return {name: _finished_run(*args) for name, args in _family_runs_started.items()}
    except BaseException:  # a run that failed or timed out stops the other too
        _stop_runs(_family_runs_started)
        raise


@pytest.fixture(scope="session")
def demo_run(family_runs):
    """(config, manifest) of the demo at test size."""
    return family_runs["demo_run"]


@pytest.fixture(scope="session")
def people_run(family_runs):
    """(config, manifest) of the second task family at test size."""
    return family_runs["people_run"]


@pytest.fixture(scope="session")
def demo_console(demo_run) -> str:
    """What `python jobs/distill.py` printed (stdout and stderr) for the shared demo run."""
    return Path(demo_run[0].run_dir.rstrip("/") + ".console.txt").read_text()


# ---------------------------------------------------------------- distributed: S3 and multi-node Ray
# An S3-compatible server (moto's, real HTTP on 127.0.0.1) and Ray clusters of several `ray start`
# nodes on this machine (loopback, one --temp-dir each). Everything started here is stopped here, and
# every process a cluster started is checked gone afterwards (tests/test_distributed.py uses these).

S3_BUCKET = "kard-test"


@pytest.fixture(scope="session")
def s3_server():
    """{"endpoint", "host_port", "bucket", "env"} of a moto S3 server with one bucket made by boto3.

    `env` holds the standard AWS variables a process needs to reach it (credentials, region and
    AWS_ENDPOINT_URL); they are set in this process for the session too, so the tests read the bucket
    through pyarrow like the pipeline does."""
    import logging
    import secrets

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "kard-test", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=S3_BUCKET)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"endpoint": endpoint, "host_port": f"{host}:{port}", "bucket": S3_BUCKET, "env": env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # Shut pyarrow's AWS SDK down while the server is still up: left to pyarrow's own exit hook, the
        # pytest process was seen hanging at exit after these tests (cf. apache/arrow#50188).
        import gc

        import pyarrow.fs as pafs

        gc.collect()
        pafs.finalize_s3()
        server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNodes:
    """A Ray cluster of `ray start --block` processes on 127.0.0.1: one head, worker nodes added and
    killed at will. Each node has its own --temp-dir, its own ports and a custom resource
    `kard_node_<name>: 1` naming it; token authentication as Ray 2.60's `ray start` enables it.

    `shutdown()` stops every node and then checks that no process of any node's session (the
    `ray start` process and everything it started: GCS, raylet, agents, workers) is left."""

    def __init__(self, env: dict[str, str], prefix: str = "krd"):
        import secrets
        import tempfile

        # Short: Ray's unix sockets live under the temp dir and a socket path may not exceed 107 bytes.
        self.root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.env = {**os.environ, **env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: dict[str, "subprocess.Popen"] = {}
        self.sessions: list[int] = []
        self.gcs_port = free_port()
        self.dashboard = ""

    # -- nodes ------------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], resources: dict | None, env: dict | None = None) -> None:
        import json
        import subprocess

        temp = os.path.join(self.root, name)
        os.makedirs(temp, exist_ok=True)
        resources = {f"kard_node_{name}": 1, **(resources or {})}
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
               f"--resources={json.dumps(resources)}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", "--object-store-memory=300000000",
               "--disable-usage-stats", *args]
        log = open(os.path.join(self.root, f"{name}.log"), "a")
        p = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        self.sessions.append(p.pid)  # start_new_session: the session id is the pid

    def start_head(self, num_cpus: float = 0, resources: dict | None = None, extra: list[str] = (),
                   env: dict | None = None, attempts: int = 5) -> None:
        """Start the head and wait for its job server; started again if it exits (see add_worker)."""
        import signal

        for attempt in range(attempts):
            dash = free_port()
            self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
                                 "--include-dashboard=true", f"--num-cpus={num_cpus}", *extra], resources, env)
            self.dashboard = f"http://127.0.0.1:{dash}"
            proc = self.procs["head"]
            self.wait_for(lambda: proc.poll() is not None or self.ray("job", "list").returncode == 0, 300,
                          "the head node's job server")
            if proc.poll() is None:
                return
            self.procs.pop("head")
            self._kill_session(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"the head node did not start in {attempts} attempts; see {self.root}/head.log")

    def add_worker(self, name: str, num_cpus: float, resources: dict | None = None, attempts: int = 5) -> None:
        """Start a worker node and wait until the GCS lists it alive. On a loaded machine a raylet can give
        up waiting for its agents (15 s) and the node exits: it is started again, up to `attempts` times."""
        import signal

        for attempt in range(attempts):
            self._start(name, [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"], resources)
            proc = self.procs[name]
            self.wait_for(lambda: proc.poll() is not None or name in self.alive_nodes(), 300, f"worker node {name}")
            if proc.poll() is None:
                return
            self.procs.pop(name)
            self._kill_session(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"worker node {name} did not start in {attempts} attempts; see {self.root}/{name}.log")

    def kill(self, name: str) -> None:
        """SIGKILL every process of a node's session at once: the node is lost, nothing shuts down."""
        import signal

        p = self.procs.pop(name)
        self._kill_session(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    @staticmethod
    def _session_procs(sid: int):
        import psutil

        out = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == sid:
                    out.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return out

    @staticmethod
    def _kill_session(sid: int, sig) -> None:
        import psutil

        for proc in RayNodes._session_procs(sid):
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def leftover(self) -> list[str]:
        """Processes of any node's session, or with this cluster's temp dir in their command line."""
        import psutil

        left = [p for sid in self.sessions for p in self._session_procs(sid)]
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.info["cmdline"] and self.root in " ".join(proc.info["cmdline"]) and proc.pid != os.getpid():
                    left.append(proc)
            except psutil.Error:
                continue
        out = []
        for p in {p.pid: p for p in left}.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                continue
        return out

    def shutdown(self) -> list[str]:
        """Stop the worker nodes, then the head (SIGTERM, then SIGKILL); returns what was left over."""
        import signal
        import subprocess
        import time

        # Workers: SIGKILL (a worker node holds nothing the run needs; SIGTERM drains for up to 30 s).
        # The head: SIGTERM, so GCS and dashboard stop cleanly.
        for name in [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else []):
            p = self.procs.pop(name)
            self._kill_session(p.pid, signal.SIGTERM if name == "head" else signal.SIGKILL)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + 30
        while self.leftover() and time.time() < deadline:
            time.sleep(1)
        for sid in self.sessions:
            self._kill_session(sid, signal.SIGKILL)
        time.sleep(1)
        left = self.leftover()
        # `ray start` records the head's address for a bare `ray.init()`; drop the record if it is ours.
        for current in ("/tmp/ray/ray_current_cluster", os.path.join(self.root, "ray_current_cluster")):
            try:
                if open(current).read().strip().endswith(f":{self.gcs_port}"):
                    os.unlink(current)
            except OSError:
                pass
        return left

    # -- CLI ----------------------------------------------------------------------------------------
    def ray(self, *args: str, timeout: float = 120):
        import subprocess

        cmd = ["ray", *args[:2], "--address", self.dashboard, *args[2:]] if args[0] in ("job", "list") else ["ray", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)

    def nodes(self) -> list[dict]:
        """`ray list nodes` as JSON (node_id, state, resources_total, ...), the state API's view."""
        import json

        r = self.ray("list", "nodes", "--format", "json", "--detail", "--limit", "1000")
        if r.returncode != 0:
            return []
        try:
            return json.loads(r.stdout)
        except ValueError:
            return []

    def alive_nodes(self) -> dict[str, str]:
        """{node name: node id} of the alive nodes started by this helper."""
        out = {}
        for n in self.nodes():
            if n.get("state") != "ALIVE":
                continue
            for key in n.get("resources_total", {}):
                if key.startswith("kard_node_"):
                    out[key.removeprefix("kard_node_")] = n["node_id"]
        return out

    @staticmethod
    def wait_for(cond, timeout: float, what: str, every: float = 1.0):
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            time.sleep(every)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s")

    def submit(self, entrypoint: list[str], working_dir: str | None) -> str:
        """`ray job submit --no-wait`; returns the job id."""
        import time

        for _ in range(30):  # the job agent registers a few seconds after the job server answers
            wd = ["--working-dir", working_dir] if working_dir else []
            r = self.ray("job", "submit", *wd, "--no-wait", "--", *entrypoint)
            if r.returncode == 0 or "No available agent" not in r.stderr:
                break
            time.sleep(3)
        assert r.returncode == 0, r.stderr[-3000:]
        return next(line.split("'")[1] for line in r.stdout.splitlines() if "submitted successfully" in line)

    def job_status(self, job_id: str) -> str | None:
        """succeeded | failed | stopped once the job is terminal, else None."""
        import re

        r = self.ray("job", "status", job_id)
        m = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", r.stdout + r.stderr)
        return m.group(1) if m else None

    def job_logs(self, job_id: str) -> str:
        return self.ray("job", "logs", job_id).stdout

    def wait_job(self, job_id: str, timeout: float) -> tuple[str | None, str]:
        import time

        deadline = time.time() + timeout
        final = None
        while final is None and time.time() < deadline:
            final = self.job_status(job_id)
            if final is None:
                time.sleep(3)
        return final, self.job_logs(job_id)


# Ray settings of the test clusters: Ray Train V2, offline models, and node loss noticed within ~3 s
# (the GCS health-checks raylets every second and gives up after three misses; default ~30 s).
CLUSTER_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "KARD_PRINT_RESULTS": "1",
               # On a loaded 2-core machine a node's agents can take over the raylet's default 15 s to
               # start; the raylet then aborts ("Timed out waiting for file ...agent_listen_port").
               "RAY_agent_register_timeout_ms": "180000"}


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One multi-node cluster for the distributed tests: a head with 0 CPUs (the driver and GCS only, as
    in cluster/aws.yaml) and three 2-CPU worker nodes, `a`, `b` and `c`, each offering one `kard_trainer`,
    so two training workers that each ask for one land on different nodes, and the third is spare capacity
    that takes over when one of them is lost (as a cluster with room, or an autoscaler's new node, would).
    Every node has the S3 settings in its environment, as nodes with an instance profile / IAM role would."""
    nodes = RayNodes({**CLUSTER_ENV, **s3_server["env"]})
    try:
        nodes.start_head(num_cpus=0)
        for name in ("a", "b", "c"):  # one after the other: two nodes' agents starting at once starve each other
            nodes.add_worker(name, num_cpus=2, resources={"kard_trainer": 1})
        yield nodes
    finally:
        left = nodes.shutdown()
        assert not left, f"processes of the test cluster still running: {left}"


def wait_for_health(proc, url: str, timeout_s: float, name: str, output) -> None:
    """Poll `url` until it answers 200; fail naming `name` with the tail of `output()` if `proc` exits or
    `timeout_s` passes first (shared by the tests that start an HTTP server in a subprocess)."""
    import time

    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"{name} did not start: {output()[-2000:]}")
        time.sleep(0.3)


def slice_passages(shared_data, limit=None) -> list[dict]:
    """The Wikipedia slice's non-empty passages, each id once (as ingest keeps them), at most `limit`."""
    import gzip
    import json

    rows, seen = [], set()
    with gzip.open(shared_data / "wiki_passages.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if (r.get("text") or "").strip() and r["id"] not in seen:
                seen.add(r["id"])
                rows.append({"id": str(r["id"]), "title": r.get("title") or "", "text": r["text"]})
                if limit and len(rows) >= limit:
                    break
    return rows
