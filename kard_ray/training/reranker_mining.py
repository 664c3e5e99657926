"""Reranker candidate mining on Ray Data (the pipeline's `mine` stage).

For each (training question, kept rationale) — KARD.md §4:
  * BM25 top-K by the **rationale** (the passages the rationale would have retrieved) and top-K by the
    **question + options** (what inference will see; the configured retriever, BM25 by default),
    K = `reranker.candidates_k`; hits with score 0 matched no query term and are dropped;
  * the candidate pool is their union: the rationale's hits first, in rank order (so candidate 0 is
    the silver top passage), then the question's hits not already in it;
  * every candidate's silver score is its BM25 relevance to the rationale, read from the index's own
    score matrix (`BM25Index.score_rows`, the row-number form of `score_pairs`: no id map needed).

One row per (question, rationale) goes to `run.examples("reranker")` (parquet, `EXAMPLES_SCHEMA`);
the pipeline's manifest decides when to mine again (its `mine` stage fingerprint). Mining runs on an
actor pool of `knowledge.retrieval_actors` actors (each loads the index once),
`knowledge.retrieval_batch_size` rationales per batch.

Held-out questions: when the run has no test-time rationales, `reranker.holdout_fraction` of the
training questions, chosen by a hash of (seed, id), are never mined: `kard_ray.evaluation.reranker`
measures Hits@k on them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from kard_ray import io
from kard_ray.config import KardConfig, KnowledgeConfig
from kard_ray.data.stage import read_questions, test_rationales_path, validation_group
from kard_ray.inference.formats import question_query
from kard_ray.io import RunDir
from kard_ray.teacher.kept import kept_rationales
from kard_ray.console import say

EXAMPLES_SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("sample", pa.int64()),
    ("query", pa.string()),  # question + options: the inference-time query
    ("rationale", pa.string()),
    ("candidate_ids", pa.list_(pa.string())),
    ("candidate_titles", pa.list_(pa.string())),
    ("candidate_texts", pa.list_(pa.string())),
    ("silver", pa.list_(pa.float32())),  # BM25(rationale, candidate)
    ("from_rationale", pa.list_(pa.bool_())),  # in the rationale's top-K
    ("from_question", pa.list_(pa.bool_())),  # in the question's top-K
    # the retriever's score for the question: its own where the passage is in the question's top-K, else
    # the lowest of that list (ranked below it); what a bi-encoder with a retrieval weight adds at inference
    ("question_scores", pa.list_(pa.float32())),
])

INPUT_SCHEMA = pa.schema([("question_id", pa.string()), ("sample", pa.int64()), ("query", pa.string()),
                          ("rationale", pa.string())])


# ------------------------------------------------------------------------------------------------
# inputs


def effective_holdout(cfg: KardConfig, run: RunDir) -> float:
    """Share of training questions held out of mining: 0 when test rationales exist (the reranker is
    then measured on the test split, `kard_ray.evaluation.reranker`) unless `reranker.eval_on` is holdout."""
    if cfg.reranker.eval_on == "auto" and test_rationales_path(cfg, run):
        return 0.0
    return cfg.reranker.holdout_fraction


def holdout_key(cfg: KardConfig, question_id: str) -> str:
    """What is held out as a whole: a question, or for the synthetic task an entity's questions."""
    return validation_group(question_id, cfg.data.dataset)


def is_holdout(question_id: str, seed: int, fraction: float) -> bool:
    """Deterministic, order-free choice: a question's place depends only on (seed, id)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x1f{question_id}".encode(), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


def mining_inputs(cfg: KardConfig, run: RunDir) -> pa.Table:
    """(question_id, sample, query, rationale) for every kept rationale of a non-held-out question."""
    questions = read_questions(run, "train")
    frac = effective_holdout(cfg, run)
    rows = []
    for r in kept_rationales(run, questions):
        if is_holdout(holdout_key(cfg, r["question_id"]), cfg.seed, frac):
            continue
        q = questions[r["question_id"]]
        rows.append({"question_id": r["question_id"], "sample": int(r["sample"]),
                     "query": question_query(q["question"], q["options"]), "rationale": r["text"]})
    if not rows:
        raise ValueError(f"{run.rationales}: no answer-consistent rationale of a training question to mine "
                         f"candidates for (holdout_fraction {frac})")
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


# ------------------------------------------------------------------------------------------------
# mining on Ray Data


def _nonzero(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Hits that matched at least one query term (bm25s pads a short result list with score-0 rows)."""
    return np.asarray(rows)[np.asarray(scores) > 0]


def _list_column(values: pa.Array, lengths: list[int]) -> pa.ListArray:
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def _question_scores(pool: np.ndarray, q_rows: np.ndarray, q_scores: np.ndarray) -> np.ndarray:
    """Each pool member's retrieval score for the question; members outside its top-K get the list's lowest."""
    found = dict(zip(np.asarray(q_rows).tolist(), np.asarray(q_scores, np.float32).tolist()))
    floor = float(np.min(q_scores)) if len(q_scores) else 0.0
    return np.asarray([found.get(r, floor) for r in pool.tolist()], np.float32)


class MineBatch:
    """Ray Data actor: one Retriever (index loaded once); a batch of rationales -> reranker examples."""

    def __init__(self, run_dir: str, cfg: KnowledgeConfig, k: int):
        from kard_ray.knowledge import Retriever

        self.retriever = Retriever.from_run_dir(run_dir, cfg)
        self.k = int(k)

    def __call__(self, batch: pa.Table) -> pa.Table:
        bm25 = self.retriever.bm25
        rationales = batch.column("rationale").to_pylist()
        queries = batch.column("query").to_pylist()
        r_rows, r_scores = bm25.search_rows(rationales, self.k)  # always BM25: the silver ranking
        unique_q = list(dict.fromkeys(queries))  # several rationales share one question
        q_hits = dict(zip(unique_q, self.retriever.search_rows(unique_q, self.k)))

        keep, pools, silvers, from_r, from_q, q_scores = [], [], [], [], [], []
        for i, (rationale, query) in enumerate(zip(rationales, queries)):
            r = _nonzero(r_rows[i], r_scores[i])
            q = _nonzero(*q_hits[query])
            r_set = set(r.tolist())
            pool = np.concatenate([r, np.asarray([x for x in q.tolist() if x not in r_set], dtype=np.int64)])
            silver = bm25.score_rows(rationale, pool).astype(np.float32)
            # No rationale passage or a single candidate: nothing to rank, no supervision signal.
            if len(r) == 0 or len(pool) < 2 or not np.any(silver > 0):
                continue
            q_set = set(q.tolist())
            keep.append(i)
            pools.append(pool.astype(np.int64))
            silvers.append(silver)
            from_r.append(np.arange(len(pool)) < len(r))
            from_q.append(np.asarray([x in q_set for x in pool.tolist()], dtype=bool))
            q_scores.append(_question_scores(pool, *q_hits[query]))

        lengths = [len(p) for p in pools]
        taken = bm25.store.take(np.concatenate(pools) if pools else np.zeros(0, np.int64))
        kept = batch.take(pa.array(keep, pa.int64()))
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        return pa.table({
            "question_id": kept.column("question_id").combine_chunks().cast(pa.string()),
            "sample": kept.column("sample").combine_chunks().cast(pa.int64()),
            "query": kept.column("query").combine_chunks().cast(pa.string()),
            "rationale": kept.column("rationale").combine_chunks().cast(pa.string()),
            "candidate_ids": _list_column(taken.column("id").combine_chunks(), lengths),
            "candidate_titles": _list_column(taken.column("title").combine_chunks(), lengths),
            "candidate_texts": _list_column(taken.column("text").combine_chunks(), lengths),
            "silver": _list_column(pa.array(cat(silvers, np.float32), pa.float32()), lengths),
            "from_rationale": _list_column(pa.array(cat(from_r, bool), pa.bool_()), lengths),
            "from_question": _list_column(pa.array(cat(from_q, bool), pa.bool_()), lengths),
            "question_scores": _list_column(pa.array(cat(q_scores, np.float32), pa.float32()), lengths),
        }, schema=EXAMPLES_SCHEMA)


def mine_candidates(cfg: KardConfig, run: RunDir) -> dict:
    """Mine candidates and silver scores for every kept training rationale.

    Writes `run.examples("reranker")` (parquet, `EXAMPLES_SCHEMA`) and returns {path, rationales,
    examples, dropped} (the pipeline's `mine` stage records it in the manifest, whose fingerprint
    decides when to mine again). Rationales that retrieve nothing (no indexed term) or leave fewer
    than two candidates are dropped and counted.
    """
    import ray

    if not io.exists(run.bm25_index):
        raise FileNotFoundError(f"{run.bm25_index}: no BM25 index (run the knowledge stage first)")
    inputs = mining_inputs(cfg, run)
    out = run.examples("reranker")
    if io.exists(out):
        io.remove(out)
    kc = cfg.knowledge
    ds = ray.data.from_arrow(inputs).map_batches(
        MineBatch, batch_format="pyarrow", batch_size=kc.retrieval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=kc.retrieval_actors), num_cpus=kc.num_cpus_per_retrieval_actor,
        fn_constructor_kwargs={"run_dir": run.root, "cfg": kc, "k": cfg.reranker.candidates_k})
    ds.write_parquet(out if io.is_uri(out) else io.resolve(out)[1])
    n = io.read_table(out, columns=["sample"]).num_rows if io.exists(out) else 0
    if n == 0:
        raise ValueError(f"candidate mining produced no example from {inputs.num_rows} rationales: "
                         f"no rationale retrieved a passage from {run.bm25_index}")
    say(f"[reranker] mined candidates for {n} of {inputs.num_rows} rationales "
        f"(K={cfg.reranker.candidates_k}) -> {out}")
    return {"path": out, "rationales": inputs.num_rows, "examples": n, "dropped": inputs.num_rows - n}
