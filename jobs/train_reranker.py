"""Reranker distillation as a Ray job: mine candidates (if needed), train on the trainer core, evaluate Hits@k.

    python jobs/train_reranker.py --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train_reranker.py --config configs/strategyqa.yaml \
        reranker.num_workers=2
    python jobs/train_reranker.py --init-model michiyasunaga/LinkBERT-base reranker.architecture=late_interaction

Needs the run's questions, BM25 index and rationales (the questions, knowledge and teacher stages).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("--init-model", default=None,
                   help="encoder to start from (default: reranker.model; `tiny` is built into the run directory)")
    p.add_argument("--no-resume", action="store_true", help="discard checkpoints of a previous run of this stage")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. reranker.loss=ce run_dir=/tmp/run")
    args = p.parse_args(argv)

    from kard_ray.config import load_config, resolve_local_paths
    from kard_ray.io import RunDir
    from kard_ray.pipeline import resolve_model
    from kard_ray.runtime import init_ray
    from kard_ray.training.reranker import train_reranker

    cfg = resolve_local_paths(load_config(args.config, args.overrides))  # Ray workers run elsewhere
    init_ray(cfg)
    run = RunDir(cfg.run_dir)
    init = resolve_model(args.init_model or cfg.reranker.model, cfg.reranker.tiny, run, "bert", cfg.seed)
    result = train_reranker(cfg, run, init, resume=not args.no_resume)
    result.pop("loss_curve", None)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
