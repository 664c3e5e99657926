"""Mine reranker candidates, distill the reranker and measure its Hits@k, as a Ray job.

    python jobs/train_reranker.py [--config configs/demo.yaml] [--resume] [key=value ...]
    ray job submit --working-dir . -- python jobs/train_reranker.py --config configs/strategyqa.yaml run_dir=s3://bucket/runs/sqa

Runs the pipeline stages `kard-ray train-reranker` names (kard_ray.cli.STAGE_COMMANDS), recorded in the run's manifest.
"""

import sys

from kard_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["train-reranker", *sys.argv[1:]]))
