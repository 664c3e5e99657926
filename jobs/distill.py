"""The whole KARD pipeline as a Ray job.

    python jobs/distill.py                                    # offline demo, embedded local Ray
    python jobs/distill.py --config configs/strategyqa.yaml run_dir=s3://bucket/runs/sqa
    ray job submit --working-dir . -- python jobs/distill.py --config configs/demo.yaml
    python jobs/distill.py --from-stage student student.lr=3e-4   # rerun from a stage
"""

import sys

from kard_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["distill", *sys.argv[1:]]))
