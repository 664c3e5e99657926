"""Ingest the corpus and build the retrieval indexes, as a Ray job.

    python jobs/build_index.py [--config configs/demo.yaml] [--resume] [key=value ...]
    ray job submit --working-dir . -- python jobs/build_index.py --config configs/strategyqa.yaml run_dir=s3://bucket/runs/sqa

Runs the pipeline stages `kard-ray build-index` names (kard_ray.cli.STAGE_COMMANDS), recorded in the run's manifest.
"""

import sys

from kard_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["build-index", *sys.argv[1:]]))
