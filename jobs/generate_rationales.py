"""Teacher rationales for the training questions, as a Ray job (resumable: rerun to finish).

    python jobs/generate_rationales.py [--config configs/demo.yaml] [--resume] [key=value ...]
    ray job submit --working-dir . -- python jobs/generate_rationales.py --config configs/strategyqa.yaml run_dir=s3://bucket/runs/sqa

Runs the pipeline stages `kard-ray generate-rationales` names (kard_ray.cli.STAGE_COMMANDS), recorded in the run's manifest.
"""

import sys

from kard_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["generate-rationales", *sys.argv[1:]]))
