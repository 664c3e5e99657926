"""Ingest the corpus and build the retrieval indexes, as a Ray job.

    python jobs/build_index.py --config configs/strategyqa.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/build_index.py --config configs/strategyqa.yaml

Reads `knowledge.corpus_paths` (for the synthetic task with no corpus given: the corpus the questions
stage wrote, `<run>/inputs/synthetic_corpus.jsonl`), writes `<run>/passages/`, `<run>/index/bm25/`
and, for `knowledge.retriever` dense or hybrid, `<run>/index/embeddings/` + `<run>/index/faiss/`.
"""

from __future__ import annotations

import argparse
import json
import sys


def corpus_paths(cfg, run) -> list[str]:
    if cfg.knowledge.corpus_paths:
        return list(cfg.knowledge.corpus_paths)
    if cfg.data.dataset == "synthetic":
        from kard_ray.data.stage import synthetic_inputs

        path = synthetic_inputs(run)["corpus"]
        from kard_ray import io

        if not io.exists(path):
            raise SystemExit(f"{path} not found: run the questions stage first (it writes the synthetic corpus)")
        return [path]
    raise SystemExit("knowledge.corpus_paths is empty: name the corpus files or directories (JSONL/parquet) to index")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. knowledge.words_per_passage=100 run_dir=/tmp/run")
    args = p.parse_args(argv)

    import ray

    from kard_ray.config import load_config, resolve_local_paths
    from kard_ray.io import RunDir
    from kard_ray.knowledge import build_indexes, ingest_corpus
    from kard_ray.runtime import init_ray

    cfg = resolve_local_paths(load_config(args.config, args.overrides))  # Ray workers run elsewhere
    init_ray(cfg)  # joins the job's cluster under `ray job submit`, else starts a local Ray
    run = RunDir(cfg.run_dir)
    stats = {"ingest": ingest_corpus(corpus_paths(cfg, run), run, cfg.knowledge, cfg.data.max_rejected_fraction)}
    stats["indexes"] = build_indexes(run, cfg.knowledge)
    print(json.dumps(stats, indent=2))
    ray.shutdown()  # stop the Ray Data workers before the interpreter exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
