"""Teacher rationales for the training questions, as a Ray job (resumable: rerun to finish).

    python jobs/generate_rationales.py --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/generate_rationales.py --config configs/strategyqa.yaml
    OPENAI_API_KEY=... python jobs/generate_rationales.py --config X teacher.backend=openai teacher.model=gpt-4o-mini
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.n_samples=5 run_dir=/tmp/run")
    args = p.parse_args(argv)

    import ray

    from kard_ray.config import load_config
    from kard_ray.io import RunDir
    from kard_ray.teacher import generate_rationales

    cfg = load_config(args.config, args.overrides)
    address = cfg.resources.address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster (resources.address, or the job's under `ray job submit`): no num_cpus
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # embedded: a local instance with resources.num_cpus logical CPUs
        ray.init(num_cpus=cfg.resources.num_cpus, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stats = generate_rationales(cfg, RunDir(cfg.run_dir))
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
