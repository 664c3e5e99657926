"""BM25 over passages with bm25s: build, save/load, batched top-k search, and pair scoring.

Each passage is indexed as `format_passage(title, text)` ("Title . text"), tokenised by
`BM25Tokenizer` (lower-case, one-character tokens kept, stopwords, optional stemming). Passages are
ordered by id inside the index, so an index does not depend on how ingest laid out its files.

Scores are bm25s's: per (term, passage) BM25 weights precomputed into a sparse CSC matrix
(term -> passages), a query's score for a passage being the sum over its query terms (a repeated query
term counts once per occurrence, as in Pyserini's bag-of-words queries). `score_pairs` reads the same
matrix entries in the same order, so it returns exactly what a full search gives for those passages.
Search does not score every passage: `exact_top_k` (MaxScore pruning, below) scores only the passages that
can reach the top k, with the same float32 sums, so its top-k equals scoring everything (ties: smaller row).

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
        self._pruning: PostingLists | None = None  # built on the first search
        self.prune: bool | None = None  # exact_top_k's choice; True/False force it (benchmarks)

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

    def search_rows(self, queries: list[str], k: int, floors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (row numbers [n, k'], scores [n, k']) with k' = min(k, passages), best first; equal
        scores in the smaller row first.

        Scores are bm25s's float32 sums, bit for bit; only the passages that can reach the top k are
        scored (`exact_top_k`). Passages no query term matches score 0 and fill a short list from row 0.
        `floors` (one per query, from `seed_scores` of other shards): only passages scoring at least the
        floor are ranked exactly; below it the list holds whatever pruning left (a shard's part of a
        corpus-wide top k, whose k-th best is at least the floor).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        rows = np.zeros((len(queries), k), dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        for i, q in enumerate(queries):
            rows[i], scores[i] = self.top_k(self.query_token_ids(q), k, 0.0 if floors is None else float(floors[i]))
        return rows, scores

    def _lists(self) -> "PostingLists":
        if self._pruning is None:
            self._pruning = PostingLists.of(self.bm25)
        return self._pruning

    def top_k(self, qids: list[int], k: int, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and scores of one query given as vocabulary ids (repeats count once each)."""
        lists = self._lists()
        if lists.exact:
            return exact_top_k(lists, qids, k, self.prune, floor)
        scores = self.bm25.get_scores_from_ids(qids) if qids else np.zeros(len(self), np.float32)
        return select_top_k(np.arange(len(scores)), scores, k)

    def seed_scores(self, queries: list[str], k: int) -> np.ndarray:
        """[n, k]: per query, the k best exact scores (descending, 0-padded) of the passages holding its
        rarest terms (`exact_top_k`'s seed): real passages' scores, so across shards their k-th best is a
        lower bound on the corpus-wide k-th best score (the floor `search_rows` takes)."""
        out = np.zeros((len(queries), k), dtype=np.float32)
        lists = self._lists()
        if not lists.exact:
            return out
        for i, q in enumerate(queries):
            qids = self.query_token_ids(q)
            if qids:
                _, sc = seed_of(lists, qids, k)
                sc = -np.sort(-sc)[:k]
                out[i, :len(sc)] = sc
        return out

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
        rows = np.asarray(rows, dtype=np.int64)
        acc = np.zeros(len(rows), dtype=np.dtype(self.bm25.dtype))
        qids = self.query_token_ids(query)
        lists = PostingLists(data, indices, indptr)
        for t in qids:  # same term order and float32 additions as bm25s's np.add.at
            acc += lists.weights_at(t, rows)
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


# ------------------------------------------------------------------------------------------------
# exact top-k with pruning (MaxScore)
#
# bm25s scores a query by adding every posting of every query term into a dense array of all passages,
# so a query costs O(sum of its terms' posting lists) + O(passages): both grow with the corpus, and the
# common terms of a query dominate. MaxScore (Turtle & Flood 1995) keeps the answer exact while scoring
# only passages that can still reach the top k: with theta a lower bound on the k-th best score, terms
# whose upper bounds sum below theta are "non-essential" -- a passage holding only those cannot reach
# theta -- so the candidates are the postings of the essential (rare) terms. Their essential weights are
# looked up first; then the non-essential terms one at a time, largest bound first, each time dropping the
# candidates that could no longer reach theta with the remaining terms at their bounds, so the common terms
# (the longest lists) are searched for a few passages only. The survivors' scores are the same float32 sums
# in the same term order as bm25s's. Across shards, a floor under theta comes from every shard's seed
# (`ShardedBM25.search_rows`). bm25s has no pruning; this is the part it does not do.


class PostingLists:
    """The index's CSC matrix seen as posting lists, with each term's largest weight."""

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray):
        self.data, self.indices, self.indptr = data, indices, indptr
        self.upper: np.ndarray | None = None
        self.n_docs = 0
        self.exact = False
        self.scored = 0  # passages the last exact_top_k scored (all of them when it scored densely)

    @classmethod
    def of(cls, bm25) -> "PostingLists":
        st = bm25.scores
        # Plain ndarray views of the memory-mapped arrays: slicing an np.memmap builds a memmap object
        # each time, ~2 us, and a query slices ~25 posting lists per shard.
        lists = cls(np.asarray(st["data"]), np.asarray(st["indices"]), np.asarray(st["indptr"]))
        lists.n_docs = int(st["num_docs"])
        indptr = np.asarray(lists.indptr, dtype=np.int64)
        lengths = np.diff(indptr)
        upper = np.zeros(len(lengths), dtype=np.float64)
        nonempty = lengths > 0
        if nonempty.any():
            upper[nonempty] = np.maximum.reduceat(lists.data, indptr[:-1][nonempty])
        lists.upper = upper
        # Pruning needs weights > 0 (an unmatched passage scores 0, below every match) and no per-query
        # constant: true for lucene / robertson-with-positive-idf / atire; bm25l and bm25+ add a
        # non-occurrence score, so they keep bm25s's full scoring.
        lists.exact = getattr(bm25, "nonoccurrence_array", None) is None and (
            len(lists.data) == 0 or float(np.min(lists.data)) > 0)
        return lists

    def column(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = int(self.indptr[t]), int(self.indptr[t + 1])
        return self.indices[s:e], self.data[s:e]

    def df(self, t: int) -> int:
        return int(self.indptr[t + 1]) - int(self.indptr[t])

    def weights_at(self, t: int, rows: np.ndarray, sorted_rows: bool = False) -> np.ndarray:
        """Term t's weight for each of `rows`, 0 where t is absent (`sorted_rows`: rows ascending and
        distinct, which lets a short posting list be searched in the rows instead)."""
        col, w = self.column(t)
        out = np.zeros(len(rows), dtype=w.dtype if len(w) else np.float32)
        if len(col) == 0 or len(rows) == 0:
            return out
        if sorted_rows and len(col) < len(rows):  # binary-search the shorter side
            pos = np.minimum(np.searchsorted(rows, col), len(rows) - 1)
            hit = rows[pos] == col
            out[pos[hit]] = w[hit]
            return out
        # The rows in the column's own dtype: searchsorted would otherwise cast the whole column (a common
        # term's posting list) to int64 on every call, a cost linear in the corpus.
        pos = np.minimum(np.searchsorted(col, rows.astype(col.dtype, copy=False)), len(col) - 1)
        hit = col[pos] == rows
        out[hit] = w[pos[hit]]
        return out

    def union(self, terms) -> np.ndarray:
        """The rows holding any of `terms`, ascending."""
        cols = [self.column(t)[0] for t in terms]
        if not cols:
            return np.zeros(0, np.int64)
        if sum(len(c) for c in cols) * 32 > self.n_docs:  # many postings: a bitmap beats sorting them
            mask = np.zeros(self.n_docs, dtype=bool)
            for c in cols:
                mask[c] = True
            return np.flatnonzero(mask)
        if len(cols) == 1:  # a posting list is already ascending and distinct
            return np.asarray(cols[0], dtype=np.int64)
        rows = np.sort(np.concatenate(cols)).astype(np.int64)  # (np.unique hashes first: slower here)
        return rows[np.concatenate(([True], rows[1:] != rows[:-1]))]

    def score(self, qids: list[int], rows: np.ndarray) -> np.ndarray:
        """Exact float32 scores of `rows` (ascending, distinct): the terms added in query order, as bm25s
        adds them."""
        weights = {t: self.weights_at(t, rows, sorted_rows=True) for t in set(qids)}
        acc = np.zeros(len(rows), dtype=np.float32)
        for t in qids:
            acc += weights[t]
        return acc


# Above this share of the corpus in the essential postings, pruning saves nothing: score densely.
DENSE_SHARE = 0.25
# Below this many passages + postings a dense pass (~10 ns each) costs less than pruning's fixed
# per-query work (~0.3 ms of set and sort calls, measured on the 18k-passage slice).
DENSE_BELOW = 200_000


def seed_of(lists: PostingLists, qids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The passages holding the query's rarest terms, taken in order until there are k (or every
    term is taken), and their exact scores."""
    seed_terms, seed = [], np.zeros(0, np.int64)
    for t in sorted(set(qids), key=lists.df):
        seed_terms.append(t)
        seed = lists.union(seed_terms)
        if len(seed) >= k:
            break
    return seed, lists.score(qids, seed)


def exact_top_k(lists: PostingLists, qids: list[int], k: int, prune: bool | None = None, floor: float = 0.0):
    """The top k (rows, scores) of one query, exactly as a full scoring ranks them (ties: smaller row
    first). `prune`: None decides by size (small corpora score densely), True/False forces it.
    `floor`: a known lower bound on the k-th best score (of a larger corpus this one is a shard of);
    passages below it may be missing from the answer."""
    if not qids:
        return select_top_k(np.zeros(0, np.int64), np.zeros(0, np.float32), k, lists.n_docs)
    terms = sorted(set(qids), key=lists.df)
    if prune is None:
        prune = lists.n_docs + sum(lists.df(t) for t in terms) > DENSE_BELOW
    if not prune:
        return _dense_top_k(lists, qids, k)
    # 1. A lower bound on the k-th best score: the exact scores of the rarest terms' passages (a floor from
    #    every shard's seeds is at least this shard's own).
    theta = floor
    if floor <= 0:
        seed, seed_scores = seed_of(lists, qids, k)
        if len(seed) < k:  # fewer than k passages match at all: they are the answer, the rest score 0
            lists.scored = len(seed)
            return select_top_k(seed, seed_scores, k, lists.n_docs)
        theta = float(np.partition(seed_scores, len(seed) - k)[len(seed) - k])
    # 2. Non-essential terms: the smallest upper bounds (times repeats) whose sum stays below theta.
    counts = {t: qids.count(t) for t in terms}
    by_bound = sorted(terms, key=lambda t: counts[t] * lists.upper[t])
    bound, rest, essential = 0.0, 0.0, []
    for i, t in enumerate(by_bound):
        bound += counts[t] * float(lists.upper[t])
        if bound * (1 + 1e-4) >= theta:  # margin for float32 rounding of the sums
            essential = by_bound[i:]
            break
        rest = bound  # what the non-essential terms can add, at most
    # 3. Candidates: every passage holding an essential term (every passage scoring theta or more does:
    #    the other terms together stay below it).
    if sum(lists.df(t) for t in essential) > DENSE_SHARE * lists.n_docs:
        return _dense_top_k(lists, qids, k)
    non_essential = by_bound[:len(by_bound) - len(essential)]
    return _score_candidates(lists, qids, counts, k, lists.union(essential), essential, non_essential, rest, theta)


def _score_candidates(lists: PostingLists, qids: list[int], counts: dict[int, int], k: int, cand: np.ndarray,
                      essential: list[int], non_essential: list[int], rest: float,
                      theta: float) -> tuple[np.ndarray, np.ndarray]:
    """MaxScore's steps 4-5 over the candidates (the passages holding an essential term); `counts`: each
    query term's repeats."""
    # 4. Their essential weights are cheap (each list is searched in the candidates). Then the non-essential
    #    terms, largest bound first: after each, only the candidates that could still reach theta with the
    #    remaining terms at their upper bounds stay, so the common terms are looked up for few passages.
    weights = {t: lists.weights_at(t, cand, sorted_rows=True) for t in essential}
    partial = np.zeros(len(cand), dtype=np.float64)
    for t in essential:
        partial += counts[t] * weights[t]
    for t in [None, *reversed(non_essential)]:
        if t is not None:
            weights[t] = lists.weights_at(t, cand, sorted_rows=True)
            partial += counts[t] * weights[t]
            rest -= counts[t] * float(lists.upper[t])
        keep = (partial + max(rest, 0.0)) * (1 + 1e-4) >= theta
        if not keep.all():
            cand, partial = cand[keep], partial[keep]
            weights = {u: w[keep] for u, w in weights.items()}
    # 5. The survivors' exact scores: the same float32 additions in the same term order as bm25s.
    scores = np.zeros(len(cand), dtype=np.float32)
    for t in qids:
        scores += weights[t]
    lists.scored = len(cand)
    return select_top_k(cand, scores, k, lists.n_docs)


def _dense_top_k(lists: PostingLists, qids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.zeros(lists.n_docs, dtype=np.float32)
    lists.scored = lists.n_docs
    for t in qids:  # a term's rows are distinct, so a fancy-index add equals bm25s's np.add.at
        col, w = lists.column(t)
        scores[col] += w
    rows = np.flatnonzero(scores)
    return select_top_k(rows, scores[rows], k, lists.n_docs)


def select_top_k(rows: np.ndarray, scores: np.ndarray, k: int, n_docs: int | None = None):
    """The k best (rows, scores), descending, equal scores in the smaller row first; when fewer than k
    are given and `n_docs` is, the list is filled with the smallest other rows at score 0."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= kth  # every tie of the k-th score, so the smaller rows can win
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    rows, scores = rows[order], scores[order].astype(np.float32)
    if n_docs is not None and len(rows) < k:
        fill = np.setdiff1d(np.arange(min(n_docs, k + len(rows)), dtype=np.int64), rows)[:k - len(rows)]
        rows = np.concatenate([rows, fill])
        scores = np.concatenate([scores, np.zeros(len(fill), np.float32)])
    return rows, scores
