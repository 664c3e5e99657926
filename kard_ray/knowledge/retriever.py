"""Retrieval over the run's indexes: online (`Retriever`, for Serve and evaluation) and batch (`retrieve`,
a Ray Data stage whose actors each load the indexes once).

`knowledge.retriever` picks the ranking: `bm25`, `dense`, or `hybrid` — BM25 and dense lists (each
`knowledge.rrf_depth` deep) fused by reciprocal rank fusion, score = sum over lists of
1 / (rrf_k + rank), rank starting at 1. `score_pairs` is always BM25 (the reranker's silver labels).
Both paths call the same `Retriever.search_rows`, so batch and online results are identical.

A sharded BM25 index (`knowledge.bm25.shards` > 1) is searched in shard actors (`knowledge.bm25.search_in_actors`):
the Retriever fans each query batch out to them and merges top-k (`sharded.ShardedBM25`); `retrieve`
starts one set of shard actors on the driver and every batch actor shares it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kard_ray import io
from kard_ray.config import KnowledgeConfig
from kard_ray.knowledge.bm25 import BM25Index
from kard_ray.knowledge.sharded import ShardedBM25, is_sharded, load_bm25, start_shard_actors


def rrf_fuse(ranked: list[tuple[np.ndarray, np.ndarray]], k: int, rrf_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of several (rows, scores) lists for one query -> top-k (rows, fused scores).

    Rows < 0 (faiss padding) are skipped. Ties are broken by the smaller row, so the result is
    deterministic.
    """
    fused: dict[int, float] = {}
    for rows, _ in ranked:
        rank = 0
        for r in rows:
            if r < 0:
                continue
            rank += 1
            fused[int(r)] = fused.get(int(r), 0.0) + 1.0 / (rrf_k + rank)
    best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return (np.array([r for r, _ in best], dtype=np.int64), np.array([s for _, s in best], dtype=np.float32))


class Retriever:
    """Loads the run's indexes once; `search` returns passages with scores, best first."""

    def __init__(self, bm25: BM25Index | ShardedBM25, cfg: KnowledgeConfig, dense=None, encoder=None):
        self.bm25 = bm25
        self.cfg = cfg
        self.dense = dense
        self.encoder = encoder
        self._dense_rows = None
        if dense is not None:
            # faiss row -> passage-store row, once, so dense hits need no per-query id lookup.
            self._dense_rows = bm25.store.rows(dense.ids.to_pylist())

    @classmethod
    def from_run_dir(cls, run_dir: str, cfg: KnowledgeConfig, num_threads: int | None = None,
                     shard_actors: list | None = None) -> "Retriever":
        """Load the run's indexes. A sharded BM25 index is searched in `shard_actors` (handles from
        `start_shard_actors`, shared), else in actors started here (`knowledge.bm25.search_in_actors`),
        else in this process."""
        run = io.RunDir(run_dir)
        bm25 = load_bm25(run.bm25_index, cfg.bm25, actors=shard_actors, start_actors=cfg.bm25.search_in_actors)
        dense = encoder = None
        if cfg.retriever in ("dense", "hybrid"):
            from kard_ray.knowledge.dense import DenseIndex, Encoder

            dense = DenseIndex.load(run.faiss_index, cfg.dense)
            encoder = Encoder.from_config(cfg.dense, num_threads)
        return cls(bm25, cfg, dense, encoder)

    def __len__(self) -> int:
        return len(self.bm25)

    # -- ranking ---------------------------------------------------------------------------------
    def _dense_search(self, queries: list[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        vecs = self.encoder.encode(queries, self.cfg.dense.batch_size)
        rows, scores = self.dense.search(vecs, k)
        out = []
        for r, s in zip(rows, scores):
            keep = r >= 0
            out.append((self._dense_rows[r[keep]], s[keep]))
        return out

    def search_rows(self, queries: list[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (passage-store rows, scores), best first, at most k."""
        queries = ["" if q is None else str(q) for q in queries]
        if not queries:
            return []
        mode = self.cfg.retriever
        if mode == "bm25":
            rows, scores = self.bm25.search_rows(queries, k)
            return list(zip(rows, scores))
        if mode == "dense":
            return self._dense_search(queries, k)
        depth = max(k, self.cfg.rrf_depth)
        b_rows, b_scores = self.bm25.search_rows(queries, depth)
        dense = self._dense_search(queries, depth)
        return [rrf_fuse([(b_rows[i], b_scores[i]), dense[i]], k, self.cfg.rrf_k) for i in range(len(queries))]

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        """Per query: [{id, title, text, score}] best first."""
        results = self.search_rows(queries, k)
        out = []
        for rows, scores in results:
            passages = self.bm25.store.take(rows).to_pylist()
            for p, s in zip(passages, scores):
                p["score"] = float(s)
            out.append(passages)
        return out

    def score_pairs(self, query: str, passage_ids: list[str]) -> np.ndarray:
        """BM25 relevance of `query` to each given passage (the reranker's silver labels)."""
        return self.bm25.score_pairs(query, passage_ids)

    def get(self, ids: list[str]) -> list[dict]:
        return self.bm25.get(ids)


# ----------------------------------------------------------------------------------------------
# batch retrieval as a Ray Data stage


class RetrieveBatch:
    """Ray Data class UDF: one Retriever per actor (indexes loaded once, not per batch)."""

    def __init__(self, run_dir: str, cfg: KnowledgeConfig, query_column: str, k: int, prefix: str,
                 shard_actors: list | None = None):
        import os

        threads = max(1, int(cfg.num_cpus_per_retrieval_actor))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.retriever = Retriever.from_run_dir(run_dir, cfg, num_threads=threads, shard_actors=shard_actors)
        self.query_column, self.k, self.prefix = query_column, k, prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.query_column not in batch.column_names:
            raise KeyError(f"retrieve: no column {self.query_column!r} (columns: {batch.column_names})")
        results = self.retriever.search_rows(batch.column(self.query_column).to_pylist(), self.k)
        return append_results(batch, results, self.retriever, self.prefix)


def append_results(batch: pa.Table, results: list[tuple[np.ndarray, np.ndarray]], retriever: Retriever,
                   prefix: str = "") -> pa.Table:
    """Add list columns {prefix}passage_ids / _scores / _titles / _texts to `batch` (vectorised)."""
    lengths = np.array([len(r) for r, _ in results], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    all_rows = np.concatenate([r for r, _ in results]) if len(results) else np.zeros(0, np.int64)
    all_scores = np.concatenate([s for _, s in results]).astype(np.float32) if len(results) else np.zeros(0, np.float32)
    taken = retriever.bm25.store.take(all_rows)
    cols = {
        "passage_ids": taken.column("id").combine_chunks(),
        "passage_scores": pa.array(all_scores, pa.float32()),
        "passage_titles": taken.column("title").combine_chunks(),
        "passage_texts": taken.column("text").combine_chunks(),
    }
    for name, values in cols.items():
        col = f"{prefix}{name}"
        if col in batch.column_names:
            batch = batch.drop_columns([col])
        batch = batch.append_column(col, pa.ListArray.from_arrays(offsets, values))
    return batch


def retrieve(ds, query_column: str, k: int, run_dir: str, cfg: KnowledgeConfig, prefix: str = ""):
    """Add retrieved passages to every row of `ds`, querying with `query_column`.

    Columns added: {prefix}passage_ids (list<str>), {prefix}passage_scores (list<float>),
    {prefix}passage_titles, {prefix}passage_texts (list<str>), best first. Runs on an actor pool of
    `cfg.retrieval_actors` actors (`cfg.num_cpus_per_retrieval_actor` CPUs each), batches of
    `cfg.retrieval_batch_size` queries; each actor loads the indexes once.
    """
    import ray

    if k < 1:
        raise ValueError(f"retrieve: k must be >= 1, got {k}")
    index = io.RunDir(run_dir).bm25_index
    shard_actors = None
    if cfg.bm25.search_in_actors and is_sharded(index):
        # one set of shard actors for the whole stage (owned by this driver), not one per batch actor
        shard_actors = start_shard_actors(index, cfg.bm25)
    return ds.map_batches(
        RetrieveBatch, batch_format="pyarrow", batch_size=cfg.retrieval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.retrieval_actors),
        num_cpus=cfg.num_cpus_per_retrieval_actor,
        fn_constructor_kwargs={"run_dir": run_dir, "cfg": cfg, "query_column": query_column, "k": k, "prefix": prefix,
                               "shard_actors": shard_actors})
