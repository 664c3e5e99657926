"""The knowledge layer: corpus ingest, BM25 (bm25s), dense retrieval (HF encoder on Ray Data + faiss),
hybrid fusion, and retrieval online (`Retriever`) or as a Ray Data stage (`retrieve`).

    counts = ingest_corpus(cfg.knowledge.corpus_paths, run, cfg.knowledge, cfg.data.max_rejected_fraction)
    stats = build_indexes(run, cfg.knowledge)
    ds = retrieve(ds, "rationale", k=1, run_dir=run.root, cfg=cfg.knowledge)
    hits = Retriever.from_run_dir(run.root, cfg.knowledge).search(["question?"], k=5)
"""

from kard_ray.knowledge.bm25 import BM25Index
from kard_ray.knowledge.build import build_indexes
from kard_ray.knowledge.ingest import ingest_corpus
from kard_ray.knowledge.retriever import Retriever, retrieve, rrf_fuse
from kard_ray.knowledge.text import BM25Tokenizer, format_passage, split_words

__all__ = ["BM25Index", "BM25Tokenizer", "Retriever", "build_indexes", "format_passage", "ingest_corpus",
           "retrieve", "rrf_fuse", "split_words"]
