"""Teacher rationales for the training questions, as a Ray job (resumable: rerun to finish).

    python jobs/generate_rationales.py --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/generate_rationales.py --config configs/strategyqa.yaml
    OPENAI_API_KEY=... python jobs/generate_rationales.py --config X teacher.backend=openai teacher.model=gpt-4o-mini
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.n_samples=5 run_dir=/tmp/run")
    args = p.parse_args(argv)

    from kard_ray.config import load_config, resolve_local_paths
    from kard_ray.io import RunDir
    from kard_ray.runtime import init_ray
    from kard_ray.teacher import generate_rationales

    cfg = resolve_local_paths(load_config(args.config, args.overrides))  # Ray workers run elsewhere
    init_ray(cfg)  # joins the job's cluster under `ray job submit`, else starts a local Ray
    stats = generate_rationales(cfg, RunDir(cfg.run_dir))
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
