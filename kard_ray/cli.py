"""`kard-ray` console script; `jobs/*.py` are thin wrappers around the same subcommands.

    kard-ray distill [--config configs/demo.yaml] [--from-stage S] [--only S ...] [key=value ...]
    kard-ray build-index | generate-rationales | train-student | train-reranker | evaluate  [--config ..] [key=value ...]
    kard-ray serve RUN_DIR [key=value ...]
    kard-ray config [--config ..] [key=value ...]     print the resolved config
    kard-ray config --reference                       every field with its default and help (Markdown)
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kard-ray", description="Knowledge-Augmented Reasoning Distillation on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    def common(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml, the offline demo)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.lr=3e-4 run_dir=/tmp/run")
        return sp

    d = common("distill", "run the whole pipeline (stages skip when finished and unchanged)")
    d.add_argument("--from-stage", default=None, help="rerun this stage and every later one")
    d.add_argument("--only", nargs="+", default=None, help="run only these stages")
    common("build-index", "ingest the corpus and build the BM25 (and dense) indexes")
    common("generate-rationales", "teacher rationales for the training questions")
    common("train-student", "distill the student(s) of the configured methods")
    common("train-reranker", "mine candidates and distill the reranker")
    common("evaluate", "evaluate the trained students on the test questions")
    s = sub.add_parser("serve", help="serve a finished run directory over HTTP with Ray Serve")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the run's config, e.g. serve.port=8080")
    c = common("config", "print the resolved config")
    c.add_argument("--reference", action="store_true", help="print every field with default and help as Markdown")
    return p


def _config(args):
    from kard_ray.config import load_config

    return load_config(args.config or DEFAULT_CONFIG, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kard_ray.config import ConfigError

    try:
        if args.command == "config":
            if args.reference:
                from kard_ray.config import field_help

                print("| key | default | meaning |\n|---|---|---|")
                for key, default, help in field_help():
                    print(f"| `{key}` | `{default}` | {help} |")
            else:
                print(_config(args))
            return 0
        if args.command == "serve":
            from kard_ray.serve import serve_run_dir

            serve_run_dir(args.run_dir, args.overrides)
            return 0

        cfg = _config(args)
        from kard_ray import pipeline

        if args.command == "distill":
            pipeline.run(cfg, from_stage=args.from_stage, only=args.only)
        else:
            stages = {
                "build-index": ["questions", "knowledge"],
                "generate-rationales": ["questions", "teacher"],
                "train-student": ["examples", "student"],
                "train-reranker": ["reranker"],
                "evaluate": ["evaluate"],
            }[args.command]
            pipeline.run(cfg, only=stages)
        return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
