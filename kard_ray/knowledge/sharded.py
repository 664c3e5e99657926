"""Sharded BM25 that is exact: N bm25s shards scored with the corpus's GLOBAL statistics.

A shard holds a contiguous slice of the passages parquet (planned from file metadata only: no read, no
shuffle) and is an ordinary `BM25Index` directory, except that its score matrix is computed with the
whole corpus's document frequencies, passage count N and average length. A (term, passage) weight is
then the same float32 a single index over everything holds, and a query's score for a passage (the
float32 sum over its query terms, in query order) is bit-identical; the sharded top-k (each shard's
top-k, merged) equals the single index's top-k, ties aside.

Build (`build_sharded_bm25`, Ray tasks; nothing but counts passes through the driver):

    tokenize_shard[i]  (one task per shard)  read slice -> sort by id -> token ids, (doc, term, tf),
                                             the shard vocabulary hash-split into P partitions of (term, df)
    reduce_df[j]       (one task per partition) sum the df of partition j's terms over shards and hand
                                             each shard back the global df of ITS terms (no process
                                             ever holds the corpus vocabulary)
    finish_shard[i]    idf(global df, N), tfc(tf, doc length, global avgdl) with bm25s's own scorer
                                             functions; CSC with bm25s's builder; save

Memory per build task is bounded by the shard: ~passages text + 4 B per token + 12 B per distinct
(passage, term) pair of the shard. Retrieval (`ShardedBM25`) fans queries out to `BM25ShardActor`s
(each holds one shard or a few, memory-mapped) and merges top-k; passages are read from the shards'
memory-mapped Arrow files by global row (shard offset + row in shard).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kard_ray import io
from kard_ray.config import BM25Config
from kard_ray.knowledge.bm25 import BM25Index
from kard_ray.knowledge.store import PassageStore, check_unique_ids, local_dir, publish_dir
from kard_ray.knowledge.text import BM25Tokenizer, format_passage

META_FILE = "kard_bm25_shards.json"
FORMAT_VERSION = 1
SHARD_DIR = "shard-{:05d}"
FLOORS_ABOVE = 1_000_000  # passages in the largest shard


def is_sharded(path: str) -> bool:
    return io.exists(io.join(path, META_FILE))


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------------------------
# planning: contiguous slices of the parquet files, from their metadata


def plan_slices(passages_path: str, n_shards: int) -> list[list[tuple[str, int, int]]]:
    """Split the rows of every parquet file under `passages_path` (sorted file order) into `n_shards`
    contiguous, equally sized slices: per shard a list of (file, first row, end row)."""
    import pyarrow.parquet as pq

    files = io.list_files(passages_path, suffixes=(".parquet",))
    counts = []
    for f in files:
        fs, p = io.resolve(f)
        with fs.open_input_file(p) as fh:
            counts.append(pq.ParquetFile(fh).metadata.num_rows)
    total = sum(counts)
    if total == 0:
        raise ValueError(f"{passages_path}: no passages to index")
    if n_shards > total:
        raise ValueError(f"knowledge.bm25.shards={n_shards} is more than the {total} passages")
    bounds = [total * i // n_shards for i in range(n_shards + 1)]
    shards: list[list[tuple[str, int, int]]] = [[] for _ in range(n_shards)]
    start = 0
    for f, n in zip(files, counts):
        for s in range(n_shards):
            lo, hi = max(start, bounds[s]), min(start + n, bounds[s + 1])
            if lo < hi:
                shards[s].append((f, lo - start, hi - start))
        start += n
    return shards


def read_slices(slices: list[tuple[str, int, int]]) -> pa.Table:
    """The rows of the slices (only the row groups that overlap each slice are read)."""
    import pyarrow.parquet as pq

    parts = []
    for f, lo, hi in slices:
        fs, p = io.resolve(f)
        with fs.open_input_file(p) as fh:
            pf = pq.ParquetFile(fh)
            groups, offset, first = [], 0, None
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < hi and offset + n > lo:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            t = pf.read_row_groups(groups, columns=["id", "title", "text"])
            parts.append(t.slice(lo - first, hi - lo))
    return pa.concat_tables(parts).combine_chunks() if parts else None


# ----------------------------------------------------------------------------------------------
# build phase 1: tokenize a shard


def _partition_of(terms: list[str], n_parts: int) -> np.ndarray:
    # crc32, not hash(): Python's str hash differs from process to process.
    return np.fromiter((zlib.crc32(t.encode("utf-8")) % n_parts for t in terms), dtype=np.int32, count=len(terms))


def tokenize_shard(slices, cfg: BM25Config, n_parts: int, chunk_rows: int = 20000):
    """Read + sort the shard, tokenize it. Returns n_parts + 2 objects: [(passages, tokens), state,
    part_0, ..., part_P-1] where part_j = (terms of partition j in shard-vocab order, their df here)."""
    t0 = time.perf_counter()
    table = read_slices(slices)
    check_unique_ids(table.column("id"), "BM25 shard build")
    table = table.sort_by("id")
    tokenizer = BM25Tokenizer(cfg)
    vocab: dict[str, int] = {}
    lengths, docs, tids, tfs = [], [], [], []
    row0 = 0
    for batch in table.to_batches(max_chunksize=chunk_rows):
        flat, lens = [], []
        for title, text in zip(batch.column("title").to_pylist(), batch.column("text").to_pylist()):
            toks = tokenizer(format_passage(title, text or ""))
            lens.append(len(toks))
            for tok in toks:
                tid = vocab.get(tok)
                if tid is None:
                    tid = vocab[tok] = len(vocab)
                flat.append(tid)
        lens = np.asarray(lens, dtype=np.int64)
        # (doc, term) pairs with their counts, sorted by doc then term (what bm25s's Counter gives per doc)
        doc_of = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        keys, tf = np.unique((doc_of << 32) | np.asarray(flat, dtype=np.int64), return_counts=True)
        docs.append((keys >> 32).astype(np.int32) + row0)
        tids.append((keys & 0xFFFFFFFF).astype(np.int32))
        tfs.append(tf.astype(np.int32))
        lengths.append(lens.astype(np.int32))
        row0 += len(lens)
    docs, tids, tfs = np.concatenate(docs), np.concatenate(tids), np.concatenate(tfs)
    lengths = np.concatenate(lengths)
    terms = list(vocab)  # vocab order == token id order
    del vocab
    df = np.bincount(tids, minlength=len(terms)).astype(np.int64)
    part = _partition_of(terms, n_parts)
    term_arr = pa.array(terms, pa.string())
    parts = []
    for j in range(n_parts):
        sel = np.flatnonzero(part == j)
        parts.append((term_arr.take(pa.array(sel)), df[sel]))
    state = {"table": table, "terms": term_arr, "part": part, "lengths": lengths, "docs": docs, "tids": tids,
             "tfs": tfs, "n_docs": int(len(lengths)), "n_tokens": int(lengths.sum()),
             "tokenize_s": round(time.perf_counter() - t0, 2), "peak_rss_bytes": _peak_rss()}
    return [(state["n_docs"], state["n_tokens"]), state] + parts


# ----------------------------------------------------------------------------------------------
# build phase 2: global document frequencies, partition by partition


def reduce_df(*parts) -> list[np.ndarray]:
    """parts[i] = (terms, df) of one partition in shard i -> per shard, the GLOBAL df of its terms."""
    import pyarrow.compute as pc

    all_terms = pa.concat_arrays([t for t, _ in parts])
    all_df = np.concatenate([d for _, d in parts])
    uniq = pc.unique(all_terms)
    pos = pc.index_in(all_terms, value_set=uniq).to_numpy()
    total = np.bincount(pos, weights=all_df, minlength=len(uniq)).astype(np.int64)
    out, start = [], 0
    for terms, _ in parts:
        out.append(total[pos[start:start + len(terms)]])
        start += len(terms)
    return out if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------------------------
# build phase 3: scores with global statistics, with bm25s's scorer functions


def score_shard_bm25(state: dict, global_df: np.ndarray, n_docs: int, avgdl: float, cfg: BM25Config):
    """A bm25s.BM25 whose matrix holds the weights a single index over the whole corpus would."""
    import bm25s
    from bm25s.scoring import (_build_idf_array, _build_nonoccurrence_array, _select_idf_scorer,
                               _select_tfc_scorer)

    bm25 = bm25s.BM25(k1=cfg.k1, b=cfg.b, method=cfg.method)
    n_vocab = len(global_df)
    df_dict = dict(enumerate(global_df.tolist()))
    idf_fn = _select_idf_scorer(bm25.idf_method)
    l_avg = np.float64(avgdl)  # a numpy float64, as bm25s's np.mean: same promotions, same float32 weights
    idf = _build_idf_array(doc_frequencies=df_dict, n_docs=n_docs, compute_idf_fn=idf_fn, dtype=bm25.dtype)
    nonocc = None
    if bm25.method in bm25.methods_requiring_nonoccurrence:
        nonocc = _build_nonoccurrence_array(doc_frequencies=df_dict, n_docs=n_docs, compute_idf_fn=idf_fn,
                                            calculate_tfc_fn=_select_tfc_scorer(bm25.method), l_d=l_avg,
                                            l_avg=l_avg, k1=bm25.k1, b=bm25.b, delta=bm25.delta, dtype=bm25.dtype)
    del df_dict
    docs, tids = state["docs"], state["tids"]
    tfc = _select_tfc_scorer(bm25.method)(tf_array=state["tfs"].astype(bm25.dtype),
                                          l_d=state["lengths"][docs].astype(np.int64), l_avg=l_avg,
                                          k1=bm25.k1, b=bm25.b, delta=bm25.delta)
    weights = idf[tids] * tfc
    del tfc
    if nonocc is not None:
        weights -= nonocc[tids]
    weights = weights.astype(bm25.dtype)
    data, indices, indptr = bm25._np_csc(data=weights, rows=docs, cols=tids, shape=(state["n_docs"], n_vocab))
    bm25.scores = {"data": data.astype(bm25.dtype), "indices": indices, "indptr": indptr, "num_docs": state["n_docs"]}
    bm25.nonoccurrence_array = nonocc
    return bm25


def finish_shard(state: dict, *global_dfs, n_docs: int, avgdl: float, cfg: BM25Config, shard: int,
                 n_shards: int, dest: str) -> dict:
    """Assemble this shard's global df (from each partition's reducer), score, save to `dest`."""
    t0 = time.perf_counter()
    global_df = np.zeros(len(state["terms"]), dtype=np.int64)
    for j, df in enumerate(global_dfs):
        global_df[np.flatnonzero(state["part"] == j)] = df
    bm25 = score_shard_bm25(state, global_df, n_docs, avgdl, cfg)
    terms = state["terms"].to_pylist()
    vocab = dict(zip(terms, range(len(terms))))
    bm25.vocab_dict = vocab
    bm25.unique_token_ids_set = set(range(len(terms)))
    index = BM25Index(bm25, vocab, PassageStore(state["table"]), cfg)
    index.save(dest, extra_meta={"global": {"n_docs": n_docs, "avgdl": avgdl, "shard": shard, "n_shards": n_shards}})
    return {"shard": shard, "passages": len(index), "terms": len(vocab), "nnz": int(len(data_of(bm25))),
            "tokenize_s": state["tokenize_s"], "score_s": round(time.perf_counter() - t0, 2),
            "tokenize_peak_rss_bytes": state["peak_rss_bytes"], "peak_rss_bytes": _peak_rss()}


def data_of(bm25) -> np.ndarray:
    return bm25.scores["data"]


# ----------------------------------------------------------------------------------------------
# build orchestration


def build_sharded_bm25(passages_path: str, index_path: str, cfg: BM25Config, n_shards: int | None = None) -> dict:
    """Build `n_shards` (default `cfg.shards`) exact shards in parallel Ray tasks; write `index_path`."""
    import ray

    n_shards = n_shards or cfg.shards
    t0 = time.perf_counter()
    slices = plan_slices(passages_path, n_shards)
    n_parts = n_shards
    opts = {"num_cpus": cfg.num_cpus_per_build_task, "max_retries": 1}
    tok = ray.remote(tokenize_shard).options(num_returns=n_parts + 2, **opts)
    outs = [tok.remote(s, cfg, n_parts) for s in slices]
    states = [o[1] for o in outs]
    red = ray.remote(reduce_df).options(num_returns=n_shards, **opts) if n_shards > 1 else \
        ray.remote(reduce_df).options(**opts)
    per_part = [red.remote(*[outs[i][2 + j] for i in range(n_shards)]) for j in range(n_parts)]
    if n_shards == 1:
        per_part = [[r] for r in per_part]
    sizes = ray.get([o[0] for o in outs])  # N and the average length: two numbers per shard
    n_docs = sum(n for n, _ in sizes)
    avgdl = float(np.float64(sum(t for _, t in sizes)) / np.float64(n_docs))
    t_stats = time.perf_counter() - t0

    local = not io.is_uri(index_path)
    stage = f"{os.path.abspath(index_path)}.building-{uuid.uuid4().hex[:8]}" if local else index_path
    if not local and io.exists(index_path):
        io.remove(index_path)
    fin = ray.remote(finish_shard).options(**opts)
    shard_stats = ray.get([fin.remote(states[i], *[per_part[j][i] for j in range(n_parts)], n_docs=n_docs,
                                      avgdl=avgdl, cfg=cfg, shard=i, n_shards=n_shards,
                                      dest=io.join(stage, SHARD_DIR.format(i)))
                           for i in range(n_shards)])
    del states, outs, per_part
    meta = {"format_version": FORMAT_VERSION, "n_shards": n_shards, "num_passages": n_docs, "avgdl": avgdl,
            "shard_sizes": [s["passages"] for s in shard_stats], "bm25": cfg.__dict__}
    io.write_json(io.join(stage, META_FILE), meta)
    if local:
        old = f"{os.path.abspath(index_path)}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(index_path):
            os.replace(index_path, old)
        os.replace(stage, index_path)  # readers see the old index or the new one
        shutil.rmtree(old, ignore_errors=True)
    return {"passages": n_docs, "shards": n_shards, "terms": sum(s["terms"] for s in shard_stats),
            "nnz": sum(s["nnz"] for s in shard_stats), "stats_s": round(t_stats, 2),
            "total_s": round(time.perf_counter() - t0, 2),
            "peak_rss_bytes": max(max(s["peak_rss_bytes"], s["tokenize_peak_rss_bytes"]) for s in shard_stats),
            "per_shard": shard_stats}


# ----------------------------------------------------------------------------------------------
# retrieval


class BM25ShardActor:
    """Holds one or a few shards (memory-mapped); answers top-k and pair scores in shard-local rows."""

    def __init__(self, path: str, shards: list[int]):
        d = local_dir(path)
        self.shards = {s: BM25Index.load(os.path.join(d, SHARD_DIR.format(s))) for s in shards}

    def search_rows(self, queries: list[str], k: int, floors: np.ndarray | None = None
                    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {s: idx.search_rows(queries, k, floors) for s, idx in self.shards.items()}

    def seed_scores(self, queries: list[str], k: int) -> dict[int, np.ndarray]:
        return {s: idx.seed_scores(queries, k) for s, idx in self.shards.items()}

    def score_rows(self, query: str, rows_by_shard: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        return {s: self.shards[s].score_rows(query, r) for s, r in rows_by_shard.items()}

    def shard_ids(self) -> list[int]:
        return list(self.shards)

    def peak_rss_bytes(self) -> int:
        return _peak_rss()


def start_shard_actors(path: str, cfg: BM25Config) -> list:
    """One Ray actor per `cfg.shards_per_actor` shards of the sharded index at `path`."""
    import ray

    meta = io.read_json(io.join(path, META_FILE))
    n = meta["n_shards"]
    per = max(1, cfg.shards_per_actor)
    cls = ray.remote(BM25ShardActor).options(num_cpus=cfg.num_cpus_per_shard_actor)
    actors = [cls.remote(path, list(range(s, min(n, s + per)))) for s in range(0, n, per)]
    ray.get([a.peak_rss_bytes.remote() for a in actors])  # loaded (fail here, not at the first query)
    return actors


class ShardedStore:
    """The passages of all shards by global row (shard offset + row in shard), memory-mapped."""

    def __init__(self, stores: list[PassageStore]):
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in stores])]).astype(np.int64)
        self.table = pa.concat_tables([s.table for s in stores])
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def ids(self) -> pa.ChunkedArray:
        return self.table.column("id")

    rows = PassageStore.rows
    take = PassageStore.take
    get = PassageStore.get


@dataclass
class _Shard:
    offset: int
    size: int


class ShardedBM25:
    """`BM25Index`'s query interface over a sharded index: search_rows / score_rows / score_pairs / get /
    store, with global rows. Shards are searched in `actors` (Ray actor handles), or in this process
    when `actors` is None (small indexes, tests)."""

    def __init__(self, path: str, cfg: BM25Config | None = None, actors: list | None = None):
        d = local_dir(path)
        meta = io.read_json(os.path.join(d, META_FILE))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: sharded index format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it")
        self.path, self.meta = path, meta
        self.cfg = BM25Config(**meta["bm25"])
        n = meta["n_shards"]
        dirs = [os.path.join(d, SHARD_DIR.format(s)) for s in range(n)]
        self.store = ShardedStore([PassageStore.load(x) for x in dirs])
        self.shards = [_Shard(int(self.store.offsets[s]), int(self.store.offsets[s + 1] - self.store.offsets[s]))
                       for s in range(n)]
        self.actors = actors
        # Search in two rounds (see search_rows) where shards are large: measured in-process, one thread, the
        # floor round cost ~7% at 1M passages in 2 shards and saved ~20% at 5M in 4 (README "Pruned exact search").
        self.floors = n > 1 and max(sh.size for sh in self.shards) > FLOORS_ABOVE
        self.local = None
        self.actor_shards: list[list[int]] = []
        if actors is None:
            self.local = BM25ShardActor(path, list(range(n)))
        else:
            import ray

            self.actor_shards = ray.get([a.shard_ids.remote() for a in actors])
            held = sorted(s for group in self.actor_shards for s in group)
            if held != list(range(n)):
                raise ValueError(f"{path}: the shard actors hold shards {held}, the index has {n}")

    def __len__(self) -> int:
        return len(self.store)

    def _fan_out(self, method: str, *args, per_actor_args=None) -> dict:
        import ray

        if self.local is not None:
            return getattr(self.local, method)(*(per_actor_args[0] if per_actor_args else args))
        refs = [getattr(a, method).remote(*(per_actor_args[i] if per_actor_args else args))
                for i, a in enumerate(self.actors)]
        out: dict = {}
        for part in ray.get(refs):
            out.update(part)
        return out

    def search_rows(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (global rows [n, k'], scores [n, k']), k' = min(k, passages), best first; equal scores
        in the smaller global row first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        k = min(k, len(self))
        if not queries:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        floors = None
        if self.floors:
            # Round 1: every shard's seed scores (real passages' exact scores, cheap); the k-th best of them
            # all is a lower bound on the corpus-wide k-th best score, higher than any one shard finds alone.
            # Round 2 then prunes each shard against that floor: fewer essential terms and candidates.
            seeds = self._fan_out("seed_scores", queries, k)
            floors = -np.sort(-np.concatenate([seeds[s] for s in sorted(seeds)], axis=1), axis=1)[:, k - 1]
        res = self._fan_out("search_rows", queries, k, floors)
        rows = np.concatenate([res[s][0] + self.shards[s].offset for s in range(len(self.shards))], axis=1)
        scores = np.concatenate([res[s][1] for s in range(len(self.shards))], axis=1).astype(np.float32)
        order = np.lexsort((rows, -scores), axis=-1)[:, :k]
        return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)

    def search(self, queries: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        rows, scores = self.search_rows(list(queries), k)
        flat = self.store.ids.take(pa.array(rows.reshape(-1))).to_pylist() if rows.size else []
        kk = rows.shape[1]
        return [flat[i * kk:(i + 1) * kk] for i in range(len(rows))], scores

    def score_rows(self, query: str, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self.store.offsets, rows, side="right") - 1
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"passage rows out of range [0, {len(self)})")
        wanted = {int(s): rows[shard_of == s] - self.shards[s].offset for s in np.unique(shard_of)}
        if self.local is not None:
            got = self.local.score_rows(query, wanted)
        else:
            args = [(query, {s: r for s, r in wanted.items() if s in group}) for group in self.actor_shards]
            got = self._fan_out("score_rows", per_actor_args=args)
        out = np.zeros(len(rows), dtype=np.float32)
        for s, sc in got.items():
            out[shard_of == s] = sc
        return out

    def score_pairs(self, query: str, passage_ids: list[str]) -> np.ndarray:
        return self.score_rows(query, self.store.rows(passage_ids))

    def get(self, ids: list[str]) -> list[dict]:
        return self.store.get(list(ids))


def load_bm25(path: str, cfg: BM25Config | None = None, actors: list | None = None, start_actors: bool = False):
    """A single `BM25Index` or a `ShardedBM25` (searching in `actors`, or in actors started here when
    `start_actors`, or in this process)."""
    if not is_sharded(path):
        return BM25Index.load(path)
    if actors is None and start_actors:
        actors = start_shard_actors(path, cfg or BM25Config())
    return ShardedBM25(path, cfg, actors)
