"""Distill the student(s) the configured methods need (KARD, RD, FT), as a Ray job.

    python jobs/train_student.py [--config configs/demo.yaml] [--resume] [key=value ...]
    ray job submit --working-dir . -- python jobs/train_student.py --config configs/strategyqa.yaml run_dir=s3://bucket/runs/sqa

Runs the pipeline stages `kard-ray train-student` names (kard_ray.cli.STAGE_COMMANDS), recorded in the run's manifest.
"""

import sys

from kard_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["train-student", *sys.argv[1:]]))
