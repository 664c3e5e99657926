"""BM25 over passages with bm25s: build, save/load, batched top-k search, and pair scoring.

Each passage is indexed as `format_passage(title, text)` ("Title . text"), tokenised by
`BM25Tokenizer` (lower-case, one-character tokens kept, stopwords, optional stemming). Passages are
ordered by id inside the index, so an index does not depend on how ingest laid out its files.

Scores are bm25s's: per (term, passage) BM25 weights precomputed into a sparse CSC matrix
(term -> passages), a query's score for a passage being the sum over its query terms (a repeated query
term counts once per occurrence, as in Pyserini's bag-of-words queries). `score_pairs` reads the same
matrix entries in the same order, so it returns exactly what a full search gives for those passages.

Memory (README "Knowledge layer" has the measured numbers): the CSC matrix is 8 bytes per distinct
(term, passage) pair (float32 weight + int32 row), the vocabulary ~100 bytes per term; passages are
memory-mapped, and the id -> row map (~100 bytes per passage) is built on the first lookup by id.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import numpy as np
import pyarrow as pa

from kard_ray.config import BM25Config
from kard_ray.knowledge.store import PassageStore, check_unique_ids, local_dir, publish_dir
from kard_ray.knowledge.text import BM25Tokenizer, format_passage

META_FILE = "kard_bm25.json"
FORMAT_VERSION = 1


class BM25Index:
    """A bm25s index plus the passages it returns, in one directory."""

    def __init__(self, bm25, vocab: dict[str, int], store: PassageStore, cfg: BM25Config):
        self.bm25 = bm25
        self.vocab = vocab
        self.store = store
        self.cfg = cfg
        self.tokenizer = BM25Tokenizer(cfg)
        # Search runs bm25s's per-query scoring; threads help little under the GIL, so one by default.
        self.n_threads = 0

    def __len__(self) -> int:
        return len(self.store)

    # -- build ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, passages: pa.Table, cfg: BM25Config, chunk_rows: int = 20000) -> "BM25Index":
        """Index a table with columns id, title, text (ids unique)."""
        import bm25s

        for col in ("id", "title", "text"):
            if col not in passages.column_names:
                raise ValueError(f"passages table has no {col!r} column (columns: {passages.column_names})")
        if passages.num_rows == 0:
            raise ValueError("cannot build a BM25 index over zero passages")
        check_unique_ids(passages.column("id"), "BM25 build")
        passages = passages.select(["id", "title", "text"]).sort_by("id")
        tokenizer = BM25Tokenizer(cfg)
        vocab: dict[str, int] = {}
        corpus_ids: list[list[int]] = []
        # Tokenise in chunks so only one chunk's Python strings exist at a time.
        for batch in passages.to_batches(max_chunksize=chunk_rows):
            titles = batch.column("title").to_pylist()
            texts = batch.column("text").to_pylist()
            for title, text in zip(titles, texts):
                doc = []
                for tok in tokenizer(format_passage(title, text or "")):
                    tid = vocab.get(tok)
                    if tid is None:
                        tid = vocab[tok] = len(vocab)
                    doc.append(tid)
                corpus_ids.append(doc)
        if not vocab:
            raise ValueError("no passage has a single indexable token (all stopwords or empty?)")
        bm25 = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
        bm25.index(bm25s.tokenization.Tokenized(ids=corpus_ids, vocab=vocab), create_empty_token=False,
                   show_progress=False)
        return cls(bm25, vocab, PassageStore(passages), cfg)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str, extra_meta: dict | None = None) -> None:
        """Write the index to `path` (local directory or URI), replacing what was there."""
        with tempfile.TemporaryDirectory(prefix="kard_bm25_") as tmp:
            self.bm25.save(tmp, show_progress=False)
            self.store.save(tmp)
            meta = {"format_version": FORMAT_VERSION, "num_passages": len(self), "num_terms": len(self.vocab),
                    "bm25": self.cfg.__dict__, **(extra_meta or {})}
            with open(os.path.join(tmp, META_FILE), "w") as fh:
                json.dump(meta, fh, indent=2)
            publish_dir(tmp, path)

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> "BM25Index":
        """Load an index saved by `save`. With `mmap`, the score matrix and passages are memory-mapped
        (actors on one node share the pages)."""
        import bm25s

        d = local_dir(path)
        meta_path = os.path.join(d, META_FILE)
        if not os.path.exists(meta_path):
            if os.path.exists(os.path.join(d, "kard_bm25_shards.json")):
                raise ValueError(f"{path}: a sharded BM25 index; load it with kard_ray.knowledge.sharded.load_bm25")
            raise FileNotFoundError(f"{path}: not a kard-ray BM25 index (no {META_FILE}); build it with build_indexes")
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it")
        cfg = BM25Config(**meta["bm25"])
        bm25 = bm25s.BM25.load(d, mmap=mmap, show_progress=False)
        return cls(bm25, bm25.vocab_dict, PassageStore.load(d), cfg)

    # -- queries ---------------------------------------------------------------------------------
    def query_token_ids(self, query: str) -> list[int]:
        """Query terms present in the index vocabulary (unknown terms cannot score)."""
        vocab = self.vocab
        return [vocab[t] for t in self.tokenizer(query) if t in vocab]

    def search_rows(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (row numbers [n, k'], scores [n, k']) with k' = min(k, passages), best first.

        A query with no indexed term scores 0 everywhere; it gets the first k' rows with score 0.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        rows = np.tile(np.arange(k, dtype=np.int64), (len(queries), 1))
        scores = np.zeros((len(queries), k), dtype=np.float32)
        token_ids = [self.query_token_ids(q) for q in queries]
        live = [i for i, t in enumerate(token_ids) if t]
        if live:
            docs, sc = self.bm25.retrieve([token_ids[i] for i in live], k=k, sorted=True, show_progress=False,
                                          n_threads=self.n_threads, backend_selection="numpy")
            rows[live] = docs
            scores[live] = sc
        return rows, scores

    def search(self, queries: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Ids per query and scores [n, k'] (k' = min(k, passages)), descending."""
        rows, scores = self.search_rows(list(queries), k)
        ids = self.store.ids
        flat = ids.take(pa.array(rows.reshape(-1))).to_pylist() if rows.size else []
        kk = rows.shape[1] if rows.ndim == 2 else 0
        return [flat[i * kk:(i + 1) * kk] for i in range(len(rows))], scores

    def score_rows(self, query: str, rows: np.ndarray) -> np.ndarray:
        """BM25 score of `query` for each passage row, read from the same matrix as `search`."""
        scores_store = self.bm25.scores
        data, indices, indptr = scores_store["data"], scores_store["indices"], scores_store["indptr"]
        rows = np.asarray(rows, dtype=indices.dtype)
        acc = np.zeros(len(rows), dtype=np.dtype(self.bm25.dtype))
        qids = self.query_token_ids(query)
        for t in qids:  # same term order and float32 additions as bm25s's np.add.at
            start, end = int(indptr[t]), int(indptr[t + 1])
            col = indices[start:end]  # passage rows holding term t, ascending
            pos = np.searchsorted(col, rows)
            hit = pos < len(col)
            hit[hit] = col[pos[hit]] == rows[hit]
            acc[hit] += data[start + pos[hit]]
        if getattr(self.bm25, "nonoccurrence_array", None) is not None and qids:  # bm25l / bm25+
            acc += self.bm25.nonoccurrence_array[np.asarray(qids)].sum()
        return acc

    def score_pairs(self, query: str, passage_ids: list[str]) -> np.ndarray:
        """BM25 score of `query` against each given passage (float32, in the given order)."""
        return self.score_rows(query, self.store.rows(passage_ids))

    def get(self, ids: list[str]) -> list[dict]:
        """{id, title, text} for each id, in the given order."""
        return self.store.get(list(ids))


def build_bm25_from_parquet(passages_path: str, index_path: str, cfg: BM25Config) -> dict:
    """Read the passages parquet directory, build, save; returns timings and sizes.

    Runs wherever it is called: `build_indexes` calls it inside a Ray task so the driver never holds
    the corpus. Peak resident memory of that process is reported for the README's memory table.
    """
    import resource

    from kard_ray import io

    t0 = time.perf_counter()
    table = io.read_table(passages_path, columns=["id", "title", "text"])
    t_read = time.perf_counter() - t0
    index = BM25Index.build(table, cfg)
    t_build = time.perf_counter() - t0 - t_read
    del table
    index.save(index_path)
    d = local_dir(index_path)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".npy"))
    return {"passages": len(index), "terms": len(index.vocab), "nnz": int(len(index.bm25.scores["data"])),
            "read_s": round(t_read, 2), "build_s": round(t_build, 2),
            "total_s": round(time.perf_counter() - t0, 2), "matrix_bytes": int(size),
            "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
