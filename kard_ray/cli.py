"""`kard-ray` console script; every `jobs/*.py` is `sys.exit(cli.main(["<command>", *sys.argv[1:]]))`.

    kard-ray distill [--config configs/demo.yaml] [--from-stage S] [--only S ...] [--resume] [--verbose] [key=value ...]
    kard-ray build-index | generate-rationales | train-student | train-reranker | evaluate  [--config ..] [key=value ...]
    kard-ray serve RUN_DIR [key=value ...]
    kard-ray status RUN_DIR [key=value ...]           the manifest as a table: what ran, what would rerun and why
    kard-ray config [--config ..] [key=value ...]     print the resolved config
    kard-ray config --reference                       every field with its default and help (Markdown)

Dotted overrides (`key=value`) may stand anywhere on the command line, before or after the flags.
The stage commands run their stages through the pipeline (`kard_ray.pipeline.run`), so the manifest
records them and a later `distill` skips what they finished.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")

# Each stage command is a slice of the pipeline.
STAGE_COMMANDS = {
    "build-index": (["questions", "knowledge"], "ingest the corpus and build the BM25 (and dense) indexes"),
    "generate-rationales": (["questions", "teacher"], "teacher rationales for the training questions"),
    "train-student": (["examples", "student"], "distill the student(s) of the configured methods"),
    "train-reranker": (["mine", "reranker"], "mine candidates, distill the reranker, measure its Hits@k"),
    "evaluate": (["evaluate"], "evaluate the trained students on the test questions"),
}
_VALUE_FLAGS = {"--config", "--from-stage"}  # flags that take exactly one value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kard-ray", description="Knowledge-Augmented Reasoning Distillation on Ray",
                                epilog="Dotted overrides (key=value) may stand anywhere on the command line.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml, the offline demo)")
        if name != "config":
            sp.add_argument("--resume", action="store_true",
                            help="resume the named stages' training from their last checkpoint (only ever an "
                                 "identical run) instead of training from scratch")
            sp.add_argument("--verbose", action="store_true",
                            help="Ray's worker output and internal logs on the console too (by default they go "
                                 "to <run>/logs/ and the console shows stages, progress, warnings, results)")
        return sp

    d = common("distill", "run the whole pipeline (stages skip when finished and unchanged)")
    d.add_argument("--from-stage", default=None, help="rerun this stage and every later one")
    d.add_argument("--only", nargs="+", default=None, help="run only these stages")
    for name, (_, help) in STAGE_COMMANDS.items():
        sp = common(name, help)
        if name == "generate-rationales":
            sp.add_argument("--estimate", action="store_true", help="print the requests, tokens and dollars the "
                            "teacher stage would spend, and stop (nothing is requested)")
    s = sub.add_parser("serve", help="serve a finished run directory over HTTP with Ray Serve")
    s.add_argument("run_dir")
    st = sub.add_parser("status", help="a run's stages (status, time, counts, fingerprint, why it would rerun) "
                                       "and its results; overrides ask what a changed config would rerun")
    st.add_argument("run_dir", help="run directory: local path or URI (file://, s3://)")
    c = common("config", "print the resolved config")
    c.add_argument("--reference", action="store_true", help="print every field with default and help as Markdown")
    return p


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(arguments for argparse, `key=value` overrides), wherever the overrides stand."""
    args, overrides, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in _VALUE_FLAGS and i + 1 < len(argv):
            args += [tok, argv[i + 1]]
            i += 2
            continue
        if not tok.startswith("-") and "=" in tok:
            overrides.append(tok)
        else:
            args.append(tok)
        i += 1
    return args, overrides


def _config(args, overrides: list[str]):
    from kard_ray.config import load_config

    return load_config(args.config or DEFAULT_CONFIG, overrides)


def _print_config(args, overrides: list[str]) -> None:
    if args.reference:
        from kard_ray.config import field_help

        print("| key | default | meaning |\n|---|---|---|")
        for key, default, help in field_help():
            print(f"| `{key}` | `{default}` | {help} |")
    else:
        print(_config(args, overrides))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    from kard_ray.config import ConfigError

    try:
        if args.command == "config":
            _print_config(args, overrides)
            return 0
        if args.command == "status":
            from kard_ray.pipeline import status_table
            from kard_ray.serve.app import load_run_config

            print(status_table(load_run_config(args.run_dir, overrides)), end="")
            return 0
        if args.command == "serve":
            from kard_ray.serve import serve_run_dir

            serve_run_dir(args.run_dir, overrides)
            return 0
        from kard_ray import console, pipeline

        console.set_verbose(args.verbose)
        cfg = _config(args, overrides)
        if getattr(args, "estimate", False):
            from kard_ray.teacher.estimate import print_estimate

            pipeline.run(cfg, only=["questions"])
            print_estimate(cfg)
            return 0
        if args.command == "distill":
            pipeline.run(cfg, from_stage=args.from_stage, only=args.only, resume=args.resume)
        else:
            pipeline.run(cfg, only=STAGE_COMMANDS[args.command][0], resume=args.resume)
        return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
