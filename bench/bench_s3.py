"""S3 storage vs local disk on the demo's stages: the same test-size run twice in one local Ray, run_dir on
local disk, then on S3 (a moto server on 127.0.0.1, reached through pyarrow like any S3 endpoint).

    python bench/bench_s3.py [--entities 40] [--steps 60] [--out bench/results/s3.json] [--smoke]

Prints seconds per stage for both and the ratio S3 / local. The S3 server runs in this process on
loopback, so the figure is kard-ray's own overhead of object storage (Ray Data writing parquet through
S3, indexes and models copied up and cached down, checkpoints uploaded), not a network's latency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["KARD_PRINT_RESULTS"] = "0"


def start_s3() -> tuple[object, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Before Ray starts, so its workers inherit them (as nodes with credentials in their environment).
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def start_ray(attempts: int = 3) -> None:
    """One local Ray for both runs; on a loaded machine a node's agents can miss the raylet's 15 s
    start-up window, so the start is retried."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a start-up timeout
            print(f"ray.init attempt {attempt + 1} failed: {e}", file=sys.stderr)
            ray.shutdown()
    raise RuntimeError("could not start a local Ray")


def run_once(run_dir: str, args) -> dict[str, float]:
    from kard_ray import pipeline
    from kard_ray.config import load_config

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
        f"run_dir={run_dir}", "methods=[rd,kard_bm25]", f"data.synthetic.n_train_entities={args.entities}",
        "data.synthetic.n_test_entities=4", f"student.max_steps={args.steps}", "student.checkpoint_every_steps=20",
        "student.tiny.d_model=32", "student.tiny.n_heads=2", "student.tiny.d_ff=64", "eval.max_new_tokens=8",
        "eval.oracle=false", "resources.num_cpus=4"])
    t0 = time.time()
    manifest = pipeline.run(cfg)
    out = {s: e["seconds"] for s, e in manifest["stages"].items() if e.get("status") == "done"}
    out["total"] = round(time.time() - t0, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--entities", type=int, default=40)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="a tiny run (12 entities, 20 steps): the script works")
    args = p.parse_args()
    if args.smoke:
        args.entities, args.steps = 12, 20
    server, endpoint = start_s3()
    start_ray()
    try:
        local = run_once(tempfile.mkdtemp(prefix="kard_bench_local_"), args)
        s3 = run_once("s3://bench/run", args)
    finally:
        server.stop()
    load = os.getloadavg()
    print(f"\n| stage | local s | S3 s | S3 / local |\n|---|---|---|---|")
    for stage in local:
        if stage in s3:
            print(f"| {stage} | {local[stage]:.1f} | {s3[stage]:.1f} | {s3[stage] / max(local[stage], 0.05):.2f} |")
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"RATIO s3_over_local_total {s3['total'] / local['total']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"local": local, "s3": s3, "load": load, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
