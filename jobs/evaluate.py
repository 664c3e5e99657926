"""Evaluate the trained students on the test questions (every configured method), as a Ray job.

    python jobs/evaluate.py [--config configs/demo.yaml] [--resume] [key=value ...]
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/strategyqa.yaml run_dir=s3://bucket/runs/sqa

Runs the pipeline stages `kard-ray evaluate` names (kard_ray.cli.STAGE_COMMANDS), recorded in the run's manifest.
"""

import sys

from kard_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["evaluate", *sys.argv[1:]]))
