"""Measure the knowledge layer on a corpus: ingest, build times, queries/s and memory per million passages.

    python -m kard_ray.knowledge.measure --corpus ../shared/data/strategyqa/wiki_passages.jsonl.gz \
        [--encoder PATH] [--queries 500] [--num-cpus 4] [key=value ...]   (overrides of the knowledge section)

Queries are sampled passages' "title + first sentence" (BM25) and own text (dense). Wall times depend on
what else runs on the machine, so CPU seconds of the single-process parts are printed beside them.
Memory (tracemalloc: Python objects and numpy arrays; Arrow buffers by their size), divided by the
passages and scaled to one million (the README's table).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
import tracemalloc

import numpy as np


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, nargs="+")
    p.add_argument("--encoder", default=None, help="HF encoder dir for the dense measurements (omit: BM25 only)")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--run-dir", default=None)
    p.add_argument("overrides", nargs="*", help="knowledge.* overrides, e.g. knowledge.words_per_passage=100")
    args = p.parse_args(argv)

    import ray

    from kard_ray import io
    from kard_ray.config import load_config
    from kard_ray.knowledge import BM25Index, build_indexes, ingest_corpus
    from kard_ray.knowledge.bm25 import build_bm25_from_parquet

    overrides = list(args.overrides)
    if args.encoder:
        overrides += [f"knowledge.dense.encoder={args.encoder}", "knowledge.retriever=dense"]
    cfg = load_config(None, overrides).knowledge
    run = io.RunDir(args.run_dir or tempfile.mkdtemp(prefix="kard_measure_"))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    res: dict = {"load_average_1m": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
    res["ingest"] = ingest_corpus(args.corpus, run, cfg)

    # BM25: build and search in this process (CPU seconds beside wall seconds)
    stats, wall, cpu = _timed(lambda: build_bm25_from_parquet(run.passages, run.bm25_index, cfg.bm25))
    res["bm25_build"] = {**stats, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    n = stats["passages"]
    table = io.read_table(run.passages)
    tracemalloc.start()
    BM25Index.build(table, cfg.bm25)
    build_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tracemalloc.start()
    index = BM25Index.load(run.bm25_index, mmap=False)  # score matrix + vocabulary in RAM
    loaded = tracemalloc.get_traced_memory()[0]
    index.store.rows([index.store.ids[0].as_py()])  # builds the id -> row map
    id_map = tracemalloc.get_traced_memory()[0] - loaded
    tracemalloc.stop()

    passages = table.to_pylist()
    sample = random.Random(0).sample(passages, min(args.queries, len(passages)))
    queries = [f"{s['title']} {_first_sentence(s['text'])}" for s in sample]
    (ids, _), wall, cpu = _timed(lambda: index.search(queries, 10))
    res["bm25_search"] = {"queries": len(queries), "k": 10, "qps_wall": round(len(queries) / wall, 1),
                          "qps_cpu": round(len(queries) / cpu, 1),
                          "rank1": round(float(np.mean([i[0] == s["id"] for i, s in zip(ids, sample)])), 4)}
    (ids100, _), wall, cpu = _timed(lambda: index.search(queries, 100))
    res["bm25_search"]["qps_cpu_k100"] = round(len(queries) / cpu, 1)
    _, wall, cpu = _timed(lambda: [index.score_pairs(q, i[:64]) for q, i in zip(queries, ids100)])
    res["bm25_search"]["score_pairs_64_per_s_cpu"] = round(len(queries) / cpu, 1)
    per_m = 1e6 / n
    res["bm25_memory_per_million_gb"] = {
        "build_peak_python": round(build_peak * per_m / 1e9, 2),
        "passages_arrow": round(table.nbytes * per_m / 1e9, 2),
        "score_matrix_on_disk": round(stats["matrix_bytes"] * per_m / 1e9, 3),
        "loaded_index": round(loaded * per_m / 1e9, 3),
        "id_map": round(id_map * per_m / 1e9, 3),
        "terms_in_slice": stats["terms"], "nnz_per_passage": round(stats["nnz"] / n, 1),
    }

    if args.encoder:
        from kard_ray.knowledge import Retriever

        d = build_indexes(run, cfg)["dense"]
        res["dense_build"] = {**d, "passages_per_s_embed": round(d["passages"] / d["embed_s"], 1)}
        retriever = Retriever.from_run_dir(run.root, cfg, num_threads=1)
        dq = [s["text"] for s in sample]
        hits, wall, cpu = _timed(lambda: retriever.search(dq, 10))
        res["dense_search"] = {"queries": len(dq), "qps_wall": round(len(dq) / wall, 1), "qps_cpu": round(len(dq) / cpu, 1),
                               "rank1": round(float(np.mean([h[0]["id"] == s["id"] for h, s in zip(hits, sample)])), 4)}
        res["dense_memory_per_million_gb"] = round(d["index_bytes"] * per_m / 1e9, 3)
    print(json.dumps(res, indent=2))
    ray.shutdown()
    return res


if __name__ == "__main__":
    main()
