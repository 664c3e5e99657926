"""Dense retrieval: an HF encoder embeds passages on a Ray Data actor pool; faiss indexes the vectors.

    embed_passages(run, cfg)        passages parquet, in blocks -> EmbedBlocks actors -> part-{ids key}.parquet
                                    (resumable: finished blocks of a killed run are not embedded again)
    build_faiss_from_parquet(...)   embeddings parquet, streamed file by file -> faiss index directory
    DenseIndex.load(path).search(query_vectors, k)

The driver never holds the corpus: embeddings stream from the actors to parquet, and the faiss build
(a Ray task in `build_indexes`) reads them back in record batches. Passages are embedded as
`format_passage(title, text)`, queries as they are; vectors are L2-normalised, so inner product is
cosine similarity. Index types: exact inner product (`flat`, default), IVF-PQ (`ivfpq`: nlist lists,
pq_m sub-quantisers of 8 bits, nprobe lists searched; `refine` re-scores the best candidates with 8-bit
scalar-quantised or full vectors) or HNSW (`hnsw`). With `use_gpu_index` and
faiss-gpu on a GPU machine, flat and IVF indexes are built and searched on the GPUs.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa

from kard_ray import io
from kard_ray.config import DenseConfig
from kard_ray.console import say
from kard_ray.knowledge.store import local_dir, publish_dir
from kard_ray.knowledge.text import format_passage

INDEX_FILE = "faiss.index"
IDS_FILE = "ids.arrow"
META_FILE = "kard_dense.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# encoder


def mean_pool(encoder, input_ids, attention_mask, token_type_ids=None):
    """L2-normalised fp32 mean of an encoder's token states over real tokens, [n, hidden] (sentence-transformers'
    pooling): the dense index's passages and queries, and the bi-encoder reranker's both sides."""
    import torch

    kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    states = encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state.float()
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)


class Encoder:
    """An HF encoder (AutoModel + AutoTokenizer) that turns texts into L2-normalised vectors."""

    def __init__(self, name_or_path: str, pooling: str = "mean", max_length: int = 256,
                 device: str | None = None, num_threads: int | None = None, cpu_bf16: bool = False):
        import torch

        from kard_ray.models import cpu_has_native_bf16

        if num_threads:
            torch.set_num_threads(num_threads)  # fractional-CPU actors must not each grab every core
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pooling = pooling
        self.max_length = max_length
        from kard_ray.models import load_encoder, load_tokenizer  # a URI encoder is copied to a local cache

        self.tokenizer = load_tokenizer(name_or_path)
        self.model = load_encoder(name_or_path).to(self.device)
        self.model.eval()  # transformers 5 builds models in train mode (dropout on)
        self.dim = int(self.model.config.hidden_size)
        # bf16 autocast on a CPU with native bf16 (`knowledge.dense.cpu_bf16`); vectors are normalised in fp32
        self.autocast = bool(cpu_bf16) and self.device == "cpu" and cpu_has_native_bf16()

    @classmethod
    def from_config(cls, cfg: DenseConfig, num_threads: int | None = None) -> "Encoder":
        """The encoder `cfg` describes: passages and queries are embedded through this one constructor alike."""
        return cls(cfg.encoder, cfg.pooling, cfg.max_length, num_threads=num_threads, cpu_bf16=cfg.cpu_bf16)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sort by length so each mini-batch pads little; results go back to input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                if self.pooling == "cls":
                    vec = torch.nn.functional.normalize(self.model(**enc).last_hidden_state[:, 0].float(), dim=-1)
                else:
                    vec = mean_pool(self.model, **enc)
            out[idx] = vec.cpu().numpy()
        return out


def block_key(ids: pa.Array | pa.ChunkedArray) -> str:
    """A block's identity: blake2b of its passage ids. Its embeddings file is `part-{key}.parquet`, so a
    finished block is recognised by the passages it holds, whatever file layout ingest chose."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for pid in ids.to_pylist():
        h.update(pid.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _write_atomic(table: pa.Table, path: str) -> None:
    """Write parquet so that readers see the whole file or none (local: tmp + rename; object stores
    publish an object only when its upload completes)."""
    import uuid

    import pyarrow.parquet as pq

    fs, p = io.resolve(path)
    tmp = p if io.is_uri(path) else f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as fh:
        pq.write_table(table, fh)
    if tmp != p:
        fs.move(tmp, p)


class EmbedBlocks:
    """Ray Data class UDF over block descriptors (file, lo, hi): reads the block's passages, skips it when
    `part-{key}.parquet` already exists (a finished block of an earlier, killed run), else embeds it and
    publishes that file atomically. The encoder is loaded once per actor, and only when needed."""

    def __init__(self, out_dir: str, cfg: DenseConfig, num_threads: int):
        self.out_dir, self.journal = out_dir, cfg.embed_journal
        self.cfg, self.num_threads = cfg, num_threads
        self.batch_size = cfg.batch_size
        self.encoder = None

    def _embed(self, table: pa.Table) -> pa.Table:
        if self.encoder is None:
            self.encoder = Encoder.from_config(self.cfg, self.num_threads)
        texts = [format_passage(t, x) for t, x in zip(table.column("title").to_pylist(), table.column("text").to_pylist())]
        vecs = self.encoder.encode(texts, self.batch_size)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
        return pa.table({"id": table.column("id"), "embedding": emb})

    def __call__(self, batch: dict) -> dict:
        import uuid

        from kard_ray.knowledge.sharded import read_slices

        keys, rows, done = [], [], []
        for f, lo, hi in zip(batch["file"], batch["lo"], batch["hi"]):
            table = read_slices([(str(f), int(lo), int(hi))])
            key = block_key(table.column("id"))
            out = io.join(self.out_dir, f"part-{key}.parquet")
            skipped = io.exists(out)
            if not skipped:
                _write_atomic(self._embed(table), out)
                if self.journal:  # audit: which passages this run embedded (counted by the resume test)
                    io.write_bytes(io.join(self.out_dir, "_journal", f"{key}-{uuid.uuid4().hex[:8]}.ids"),
                                   "\n".join(table.column("id").to_pylist()).encode())
            keys.append(key)
            rows.append(table.num_rows)
            done.append(skipped)
        return {"key": np.array(keys), "rows": np.array(rows), "skipped": np.array(done)}


def plan_embed_blocks(passages_path: str, block_rows: int) -> list[dict]:
    """Blocks of at most `block_rows` consecutive passages per parquet file, from file metadata only."""
    import pyarrow.parquet as pq

    blocks = []
    for f in io.list_files(passages_path, suffixes=(".parquet",)):
        fs, p = io.resolve(f)
        with fs.open_input_file(p) as fh:
            n = pq.ParquetFile(fh).metadata.num_rows
        blocks += [{"file": f, "lo": lo, "hi": min(n, lo + block_rows)} for lo in range(0, n, block_rows)]
    return blocks


EMBEDDER_FILE = "_embedder.json"  # beside the blocks: what embedded them (a resume reuses blocks only under the same)


def embedder_identity(cfg: DenseConfig) -> dict:
    """Everything that decides a passage's vector: the encoder (its name and, for a local, URI or packaged
    model, a digest of its files), pooling, input length and bf16."""
    from kard_ray.models import unpackaged

    return {"encoder": cfg.encoder, "encoder files": io.tree_digest(unpackaged(cfg.encoder)), "pooling": cfg.pooling,
            "max_length": cfg.max_length, "cpu_bf16": cfg.cpu_bf16}


def _open_embeddings(embeddings_path: str, cfg: DenseConfig, resume: bool) -> None:
    """Start the embeddings directory afresh unless resuming blocks embedded exactly as `cfg` would embed them."""
    identity = embedder_identity(cfg)
    meta = io.join(embeddings_path, EMBEDDER_FILE)
    if io.exists(embeddings_path):
        same = resume and io.exists(meta) and io.read_json(meta) == identity
        if resume and not same:
            say(f"[index] dense: {io.display(embeddings_path)} holds vectors of other encoder settings (or of "
                "unrecorded ones); embedding every passage again")
        if not same:
            io.remove(embeddings_path)
    io.makedirs(embeddings_path)
    io.write_json(meta, identity)


def embed_passages(passages_path: str, embeddings_path: str, cfg: DenseConfig, resume: bool = False) -> dict:
    """Embed every passage on an actor pool of `cfg.num_actors` encoders -> parquet (id, embedding),
    one file per block of `cfg.embed_block_rows` passages.

    Resumable: a block whose file exists (keyed by its passage ids) is not embedded again, so a run
    killed mid-way continues where it stopped — only while the encoder settings are the same
    (`embedder_identity`, recorded in `_embedder.json`; any change embeds every passage again) (`resume=True`; `build_indexes` passes
    `knowledge.dense.resume_embedding`); files of blocks no longer in the corpus are removed. `resume=False`
    (the default: benchmarks time a full embed) starts from scratch. Returns {embed_s, blocks, embedded, skipped_blocks, passages}.
    """
    import ray

    if cfg.encoder is None:
        raise ValueError("knowledge.dense.encoder is not set: name an HF encoder or a local model directory")
    t0 = time.perf_counter()
    _open_embeddings(embeddings_path, cfg, resume)
    blocks = plan_embed_blocks(passages_path, cfg.embed_block_rows)
    if not blocks:
        raise ValueError(f"{passages_path}: no passages to embed")
    ds = ray.data.from_items(blocks, override_num_blocks=min(len(blocks), 4 * max(1, cfg.num_actors)))
    ds = ds.map_batches(
        EmbedBlocks, batch_format="numpy", batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
        fn_constructor_kwargs={"out_dir": embeddings_path, "cfg": cfg, "num_threads": max(1, int(cfg.num_cpus_per_actor))})
    res = ds.to_pandas()  # one small row per block
    keep = {f"part-{k}.parquet" for k in res["key"]}
    for f in io.list_files(embeddings_path, suffixes=(".parquet",)):
        if posixpath.basename(f) not in keep:  # a block of an older corpus
            io.remove(f)
    skipped = res["skipped"].astype(bool)
    return {"embed_s": round(time.perf_counter() - t0, 2), "blocks": len(res), "skipped_blocks": int(skipped.sum()),
            "embedded": int(res["rows"][~skipped].sum()), "passages": int(res["rows"].sum())}


# ----------------------------------------------------------------------------------------------
# faiss


def _gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _iter_embeddings(path: str, batch_rows: int = 65536):
    """(ids, vectors float32 [n, d]) record batch by record batch, file by file."""
    import pyarrow.parquet as pq

    for f in io.list_files(path, suffixes=(".parquet",)):
        fs, p = io.resolve(f)
        with fs.open_input_file(p) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_rows, columns=["id", "embedding"]):
                col = batch.column("embedding")
                flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                yield batch.column("id"), flat.reshape(len(col), -1)


def _count_rows(path: str) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in io.list_files(path, suffixes=(".parquet",)):
        fs, p = io.resolve(f)
        with fs.open_input_file(p) as fh:
            n += pq.ParquetFile(fh).metadata.num_rows
    return n


def _make_index(d: int, n: int, cfg: DenseConfig):
    import faiss

    if cfg.index_type == "flat":
        return faiss.IndexFlatIP(d), None
    if cfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        return index, None
    if d % cfg.pq_m:
        raise ValueError(f"knowledge.dense.pq_m={cfg.pq_m} must divide the embedding size {d}")
    if n < 256:
        raise ValueError(f"index_type=ivfpq needs at least 256 passages to train 8-bit PQ codes, got {n}; use flat")
    nlist = cfg.nlist
    if n < 39 * nlist:  # faiss wants >= 39 training points per list
        nlist = max(1, n // 39)
        warnings.warn(f"knowledge.dense.nlist={cfg.nlist} is too many lists for {n} passages; using {nlist}")
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    if cfg.refine is None:
        return index, quantizer
    # PQ codes rank the candidates; the refine codes (1 or 4 bytes per dimension) re-score the best of them
    fine = (faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            if cfg.refine == "sq8" else faiss.IndexFlatIP(d))
    refined = faiss.IndexRefine(index, fine)
    refined.k_factor = cfg.refine_k_factor
    return refined, (quantizer, index, fine)


def build_faiss_from_parquet(embeddings_path: str, index_path: str, cfg: DenseConfig) -> dict:
    """Stream the embeddings into a faiss index; save index + row ids to `index_path`."""
    import resource

    import faiss

    t0 = time.perf_counter()
    n = _count_rows(embeddings_path)
    if n == 0:
        raise ValueError(f"no embeddings under {embeddings_path}")
    d = next(_iter_embeddings(embeddings_path, 1))[1].shape[1]
    index, _quantizer = _make_index(d, n, cfg)  # keep the quantizer alive with the index
    nlist = int(index.nlist) if hasattr(index, "nlist") else 0
    use_gpu = cfg.use_gpu_index and cfg.index_type != "hnsw" and _gpu_available()
    if cfg.use_gpu_index and not use_gpu:
        warnings.warn("knowledge.dense.use_gpu_index: faiss-gpu or a GPU is missing (or index_type=hnsw); building on CPU")
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:  # IVF-PQ: train on a uniform sample, read batch by batch
        n_train = min(n, 64 * max(256, nlist))  # faiss: 39-256 points per centroid (PQ has 256 per sub-space)
        index.train(_sample_vectors(embeddings_path, n, n_train))
    id_chunks = []
    for ids, vecs in _iter_embeddings(embeddings_path):
        index.add(np.ascontiguousarray(vecs))
        id_chunks.append(ids)
    if use_gpu:
        index = faiss.index_gpu_to_cpu(index)
    ids = pa.chunked_array(id_chunks, pa.string())
    recall = None
    if cfg.index_type != "flat" and cfg.recall_queries > 0:
        recall = recall_vs_exact(DenseIndex(index, ids, cfg), embeddings_path, _sample_vectors(embeddings_path, n, cfg.recall_queries))
    with tempfile.TemporaryDirectory(prefix="kard_faiss_") as tmp:
        faiss.write_index(index, os.path.join(tmp, INDEX_FILE))
        with pa.OSFile(os.path.join(tmp, IDS_FILE), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("id", pa.string())])) as w:
            w.write_table(pa.table({"id": ids}))
        meta = {"format_version": FORMAT_VERSION, "dim": d, "num_passages": n, "dense": cfg.__dict__}
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        size = os.path.getsize(os.path.join(tmp, INDEX_FILE))
        publish_dir(tmp, index_path)
    return {"passages": n, "dim": d, "index_type": cfg.index_type, "faiss_build_s": round(time.perf_counter() - t0, 2),
            "index_bytes": int(size), "gpu": use_gpu, "recall_at_10_vs_exact": recall,
            "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _sample_vectors(embeddings_path: str, n: int, m: int, seed: int = 0) -> np.ndarray:
    """About `m` vectors drawn uniformly while streaming the embeddings (never all of them in memory)."""
    rng = np.random.default_rng(seed)
    sample = [vecs[rng.random(len(vecs)) < m / n] for _, vecs in _iter_embeddings(embeddings_path)]
    return np.ascontiguousarray(np.concatenate(sample))


def exact_topk(embeddings_path: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k passage ROWS (embedding stream order) for `queries`, streamed."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_r = np.full((len(queries), k), -1, dtype=np.int64)
    offset = 0
    for _, vecs in _iter_embeddings(embeddings_path):
        s = queries @ vecs.T
        r = np.broadcast_to(np.arange(offset, offset + len(vecs)), s.shape)
        cs, cr = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
        top = np.argsort(-cs, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(cs, top, 1), np.take_along_axis(cr, top, 1)
        offset += len(vecs)
    return best_r


def recall_vs_exact(index: "DenseIndex", embeddings_path: str, queries: np.ndarray, k: int = 10) -> float:
    """recall@k of `index` against exact search: the share of the exact top-k that the index returns."""
    exact = exact_topk(embeddings_path, queries, k)
    got, _ = index.search(queries, k)
    hits = [len(set(e.tolist()) & set(g.tolist())) for e, g in zip(exact, got)]
    return round(float(np.sum(hits)) / float(exact.size), 4)


class DenseIndex:
    """A faiss index over passage vectors and the passage id of each row."""

    def __init__(self, index, ids: pa.ChunkedArray | pa.Array, cfg: DenseConfig):
        self.index = index
        self.ids = ids
        self.cfg = cfg
        self._configure()

    def _configure(self) -> None:
        import faiss

        try:
            faiss.extract_index_ivf(self.index).nprobe = self.cfg.nprobe
        except (RuntimeError, AttributeError, TypeError):
            pass  # not an IVF index
        if hasattr(self.index, "k_factor"):  # IndexRefine: a search-time setting
            self.index.k_factor = self.cfg.refine_k_factor

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, ids: list[str], vectors: np.ndarray, cfg: DenseConfig) -> "DenseIndex":
        """In-memory build (tests, small corpora); `build_faiss_from_parquet` is the streaming path."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index, _ = _make_index(vectors.shape[1], len(vectors), cfg)
        if not index.is_trained:
            index.train(vectors)
        index.add(vectors)
        return cls(index, pa.array(ids, pa.string()), cfg)

    def save(self, path: str) -> None:
        import faiss

        with tempfile.TemporaryDirectory(prefix="kard_faiss_") as tmp:
            faiss.write_index(self.index, os.path.join(tmp, INDEX_FILE))
            with pa.OSFile(os.path.join(tmp, IDS_FILE), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("id", pa.string())])) as w:
                w.write_table(pa.table({"id": self.ids}))
            with open(os.path.join(tmp, META_FILE), "w") as fh:
                json.dump({"format_version": FORMAT_VERSION, "dim": int(self.index.d), "num_passages": len(self),
                           "dense": self.cfg.__dict__}, fh, indent=2)
            publish_dir(tmp, path)

    @classmethod
    def load(cls, path: str, cfg: DenseConfig | None = None) -> "DenseIndex":
        """Load a saved index; `cfg` overrides search-time settings (nprobe, use_gpu_index)."""
        import faiss

        d = local_dir(path)
        meta_path = os.path.join(d, META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path}: not a kard-ray dense index (no {META_FILE}); build it with build_indexes")
        with open(meta_path) as fh:
            meta = json.load(fh)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: index format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it")
        cfg = cfg or DenseConfig(**meta["dense"])
        index = faiss.read_index(os.path.join(d, INDEX_FILE))
        if cfg.use_gpu_index and meta["dense"]["index_type"] != "hnsw" and _gpu_available():
            index = faiss.index_cpu_to_all_gpus(index)
        ids = pa.ipc.open_file(pa.memory_map(os.path.join(d, IDS_FILE), "r")).read_all().column("id")
        return cls(index, ids, cfg)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [n, k'], scores [n, k']) best first, k' = min(k, size); rows of -1 (IVF lists too few) are
        possible and must be skipped by the caller."""
        k = min(k, len(self))
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(64, 2 * k)  # the beam must be at least k wide
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return rows.astype(np.int64), scores.astype(np.float32)
