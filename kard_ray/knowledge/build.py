"""`build_indexes`: the run's BM25 index, and its dense index when the retriever needs one.

Each build runs in a Ray task that reads the passages (or embeddings) itself from the run directory
and writes the index back there, so the driver never holds the corpus. One bm25s index builds in memory
(the whole tokenised corpus in one process, README: memory per million passages); with
`knowledge.bm25.shards` > 1 the shards build in parallel tasks, each holding its slice only (`sharded`).
"""

from __future__ import annotations

import time

from kard_ray import io
from kard_ray.config import KnowledgeConfig
from kard_ray.console import say


def build_indexes(run: io.RunDir, cfg: KnowledgeConfig) -> dict:
    """Build `run.bm25_index` always, and embeddings + `run.faiss_index` whenever `knowledge.dense.encoder`
    is set (dense/hybrid retrieval needs them; the reranker report orders candidates by them too).

    Returns timings and sizes: {"bm25": {...}, "dense": {...}} (dense only when built).
    """
    import ray

    from kard_ray.knowledge.bm25 import build_bm25_from_parquet

    if not io.exists(run.passages):
        raise FileNotFoundError(f"{run.passages}: no passages; run ingest_corpus first")
    out: dict = {}
    t0 = time.perf_counter()
    if cfg.bm25.shards > 1:
        from kard_ray.knowledge.sharded import build_sharded_bm25

        out["bm25"] = build_sharded_bm25(run.passages, run.bm25_index, cfg.bm25)
    else:
        task = ray.remote(num_cpus=1)(build_bm25_from_parquet)
        out["bm25"] = ray.get(task.remote(run.passages, run.bm25_index, cfg.bm25))
    say(f"[index] BM25: {out['bm25']['passages']} passages, {out['bm25']['terms']} terms "
        f"({cfg.bm25.shards} shard(s)) in {out['bm25']['total_s']} s -> {run.bm25_index}")
    if cfg.dense.encoder is not None:  # dense/hybrid retrieval; with bm25, the reranker report's dense baselines
        from kard_ray.knowledge.dense import build_faiss_from_parquet, embed_passages

        stats = embed_passages(run.passages, run.embeddings, cfg.dense, resume=cfg.dense.resume_embedding)
        gpus = 1 if cfg.dense.use_gpu_index else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus)(build_faiss_from_parquet)
        stats.update(ray.get(task.remote(run.embeddings, run.faiss_index, cfg.dense)))
        out["dense"] = stats
        say(f"[index] dense ({cfg.dense.index_type}): {stats['passages']} passages x {stats['dim']} embedded in "
            f"{stats['embed_s']} s, indexed in {stats['faiss_build_s']} s -> {run.faiss_index}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
