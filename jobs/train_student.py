"""Train the student (KARD, RD and/or FT) as a Ray job.

    python jobs/train_student.py --config configs/demo.yaml [--variant kard] [key=value ...]
    ray job submit --working-dir . -- python jobs/train_student.py --config configs/strategyqa.yaml \
        student.num_workers=4 student.use_gpu=true student.strategy=deepspeed student.zero_stage=2

Needs the questions, knowledge and teacher stages' outputs in `run_dir` (builds the examples when they
are missing). Prints one JSON line of results per variant; the model lands in `<run>/models/student_<v>/`
with `train_log.jsonl` (loss per step) and `train_summary.json` beside it. A rerun resumes from the
run's last checkpoint (`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("--variant", action="append", choices=["kard", "rd", "ft"],
                   help="student variant(s) to train (repeatable; default: those cfg.methods need)")
    p.add_argument("--init-model", default=None,
                   help="HF name or path to start from (default: student.model; `tiny` builds one in the run dir)")
    p.add_argument("--fresh", action="store_true", help="delete earlier checkpoints of these variants first")
    p.add_argument("--fail-at-step", type=int, default=None,
                   help="chaos test: the last worker raises once at this step (Ray Train restarts the group)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.lr=3e-4 run_dir=/tmp/run")
    args = p.parse_args(argv)

    from kard_ray.config import load_config, resolve_local_paths
    from kard_ray.io import RunDir
    from kard_ray.pipeline import resolve_model, variants
    from kard_ray.runtime import init_ray
    from kard_ray.training.student import train_student

    cfg = resolve_local_paths(load_config(args.config, args.overrides))  # Ray workers run elsewhere
    import ray as _ray

    started_here = not _ray.is_initialized()  # leave a caller's Ray running
    ray = init_ray(cfg)
    run = RunDir(cfg.run_dir)
    init = args.init_model or resolve_model(cfg.student.model, cfg.student.tiny, run, "t5", cfg.seed)
    for v in args.variant or variants(cfg):
        r = train_student(cfg, run, v, init, resume=not args.fresh, fail_at_step=args.fail_at_step)
        r.pop("loss_curve", None)
        print(json.dumps({"variant": v, **r}), flush=True)
    if started_here:
        ray.shutdown()  # stop the Ray Data / Train workers before the interpreter exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
