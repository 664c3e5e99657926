"""The batch recipe of what passages a method's student gets at test time (the table in
`kard_ray.methods`); Serve's Ingress runs the same recipe online, one deployment call per step.

    ds = passages_for(ds, "kard_reranker", cfg, run)   # rows with `query` (and `oracle_query`)
"""

from __future__ import annotations

from kard_ray import io
from kard_ray.config import KardConfig
from kard_ray.inference.reranker import rerank_dataset
from kard_ray.methods import METHODS

QUERY_COLUMN = {"question": "query", "oracle_rationale": "oracle_query"}


def passages_for(ds, method: str, cfg: KardConfig, run: io.RunDir):
    """Add passage_ids/_titles/_texts/_scores (best first, `eval.k` of them) as the method picks them."""
    from kard_ray.knowledge import retrieve

    m = METHODS[method]
    if m.query is None:
        return ds
    depth = m.retrieve_depth(cfg.eval.k, cfg.reranker.k_star)
    ds = retrieve(ds, QUERY_COLUMN[m.query], depth, run.root, cfg.knowledge)
    if m.rerank:
        ds = rerank_dataset(ds, run.model("reranker"), cfg, k=cfg.eval.k)
    return ds


def batch_passages(batch: dict) -> tuple[list, list]:
    """(passages as the student reads them, passage ids) of each question in a Ray Data batch (none
    for a method without retrieval)."""
    from kard_ray.knowledge import format_passage

    n = len(batch["id"])
    if "passage_texts" not in batch:
        return [None] * n, [[] for _ in range(n)]
    passages = [[format_passage(t, x) for t, x in zip(batch["passage_titles"][i], batch["passage_texts"][i])]
                for i in range(n)]
    return passages, [list(batch["passage_ids"][i]) for i in range(n)]
