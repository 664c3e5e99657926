"""Reranker candidate mining (Ray Data) and the held-out questions its Hits@k report uses.

For each (training question, kept rationale) — KARD.md §4:
  * BM25 top-K by the **rationale** (the passages the rationale would have retrieved) and top-K by the
    **question + options** (what inference will see; the configured retriever, BM25 by default),
    K = `reranker.candidates_k`; hits with score 0 matched no query term and are dropped;
  * the candidate pool is their union: the rationale's hits first, in rank order (so candidate 0 is
    the silver top passage), then the question's hits not already in it;
  * every candidate's silver score is its BM25 relevance to the rationale, read from the index's own
    score matrix (`BM25Index.score_rows`, the row-number form of `score_pairs`: no id map needed).

One row per (question, rationale) goes to `run.examples("reranker")` (parquet, `EXAMPLES_SCHEMA`),
with `_kard_mining.json` beside the part files recording what it was mined from, so a rerun mines
again only when its inputs changed. Mining runs on an actor pool of `knowledge.retrieval_actors`
actors (each loads the index once), `knowledge.retrieval_batch_size` rationales per batch.

Evaluation questions: the test split when test-time rationales exist (`eval.oracle_rationales_path`,
or the synthetic task's own), otherwise `reranker.holdout_fraction` of the training questions, chosen
by a hash of (seed, id) and never mined for training.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np
import pyarrow as pa

from kard_ray import io
from kard_ray.config import KardConfig, KnowledgeConfig
from kard_ray.io import RunDir

MINING_META = "_kard_mining.json"  # a leading "_" keeps parquet readers from treating it as data

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
])

INPUT_SCHEMA = pa.schema([("question_id", pa.string()), ("sample", pa.int64()), ("query", pa.string()),
                          ("rationale", pa.string())])


# ------------------------------------------------------------------------------------------------
# inputs


def question_query(question: str, options) -> str:
    """The inference-time query (question + options); the evaluation stage's own definition."""
    from kard_ray.evaluation.evaluate import question_query as qq

    return qq(question, list(options))


def read_questions(run: RunDir, split: str) -> dict[str, dict]:
    path = run.questions(split)
    if not io.exists(path):
        raise FileNotFoundError(f"{path}: {split} questions not found (run the questions stage first)")
    out = {}
    for i, q in enumerate(io.read_table(path).to_pylist()):
        if not q.get("id") or not isinstance(q.get("question"), str) or not q.get("options"):
            raise ValueError(f"{path}: row {i}: needs fields 'id', 'question' and 'options' (got id {q.get('id')!r})")
        out[q["id"]] = q
    return out


def kept_rationales(run: RunDir, questions: dict[str, dict]) -> list[dict]:
    """Answer-consistent, non-empty rationales without a generation error, ordered by (question, sample)."""
    from kard_ray.training.student import read_kept_rationales

    return read_kept_rationales(run, questions)


def test_rationales_path(cfg: KardConfig, run: RunDir) -> Optional[str]:
    """Test-time rationales ({id, rationales} JSONL or raw responses), when the run has some."""
    from kard_ray.evaluation.evaluate import oracle_rationales_path

    path = oracle_rationales_path(cfg, run)
    return path if path and io.exists(path) else None


def effective_holdout(cfg: KardConfig, run: RunDir) -> float:
    """Share of training questions held out of mining: 0 when test rationales exist."""
    return 0.0 if test_rationales_path(cfg, run) else cfg.reranker.holdout_fraction


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
        if is_holdout(r["question_id"], cfg.seed, frac):
            continue
        q = questions[r["question_id"]]
        rows.append({"question_id": r["question_id"], "sample": int(r["sample"]),
                     "query": question_query(q["question"], q["options"]), "rationale": r["text"]})
    if not rows:
        raise ValueError(f"{run.rationales}: no answer-consistent rationale of a training question to mine "
                         f"candidates for (holdout_fraction {frac})")
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


def eval_inputs(cfg: KardConfig, run: RunDir) -> tuple[Optional[pa.Table], str]:
    """(question_id, query, rationale) of the held-out questions, and where they come from.

    Test split with test-time rationales (first rationale of each) when there are some; else the
    held-out share of the training questions (first kept rationale); else (None, reason).
    """
    from kard_ray.teacher import load_teacher_rationales

    rows = []
    path = test_rationales_path(cfg, run)
    if path:
        source = f"test split, rationales from {path}"
        rationales = load_teacher_rationales(path)
        for qid, q in read_questions(run, "test").items():
            texts = [t for t in rationales.get(qid, []) if t and t.strip()]
            if texts:
                rows.append({"question_id": qid, "query": question_query(q["question"], q["options"]),
                             "rationale": texts[0]})
    elif cfg.reranker.holdout_fraction > 0:
        source = f"{cfg.reranker.holdout_fraction:g} of the training questions held out of mining"
        questions = read_questions(run, "train")
        seen = set()
        for r in kept_rationales(run, questions):
            qid = r["question_id"]
            if qid in seen or not is_holdout(qid, cfg.seed, cfg.reranker.holdout_fraction):
                continue
            seen.add(qid)
            q = questions[qid]
            rows.append({"question_id": qid, "query": question_query(q["question"], q["options"]),
                         "rationale": r["text"]})
    else:
        return None, "no test-time rationales and reranker.holdout_fraction = 0"
    if cfg.reranker.eval_questions:
        rows = rows[: cfg.reranker.eval_questions]
    if not rows:
        return None, f"no held-out question with a rationale ({source})"
    schema = pa.schema([("question_id", pa.string()), ("query", pa.string()), ("rationale", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema), source


# ------------------------------------------------------------------------------------------------
# mining on Ray Data


def _nonzero(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Hits that matched at least one query term (bm25s pads a short result list with score-0 rows)."""
    return np.asarray(rows)[np.asarray(scores) > 0]


def _list_column(values: pa.Array, lengths: list[int]) -> pa.ListArray:
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values)


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

        keep, pools, silvers, from_r, from_q = [], [], [], [], []
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
        }, schema=EXAMPLES_SCHEMA)


def mining_fingerprint(cfg: KardConfig, run: RunDir) -> str:
    """Hash of what the examples depend on: the mining settings, the knowledge config, the input files
    (names and sizes)."""
    def files(path: str) -> list:
        if not io.exists(path):
            return []
        fs, _ = io.resolve(path)
        return [(p.rsplit("/", 1)[-1], fs.get_file_info(io.resolve(p)[1]).size) for p in io.list_files(path)]

    blob = {"candidates_k": cfg.reranker.candidates_k, "holdout": effective_holdout(cfg, run), "seed": cfg.seed,
            "knowledge": cfg.section_hash("knowledge"), "rationales": files(run.rationales),
            "questions": files(run.questions("train")), "index": files(run.bm25_index)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def examples_current(cfg: KardConfig, run: RunDir) -> bool:
    meta = io.join(run.examples("reranker"), MINING_META)
    return io.exists(meta) and io.read_json(meta).get("fingerprint") == mining_fingerprint(cfg, run)


def mine_candidates(cfg: KardConfig, run: RunDir) -> str:
    """Mine candidates and silver scores for every kept training rationale; returns the examples path.

    Writes `run.examples("reranker")` (parquet, `EXAMPLES_SCHEMA`) and `_kard_mining.json` beside it
    ({fingerprint, rationales, examples, dropped}). Rationales that retrieve nothing (no indexed term)
    or leave fewer than two candidates are dropped and counted.
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
    io.write_json(io.join(out, MINING_META), {"fingerprint": mining_fingerprint(cfg, run),
                                               "rationales": inputs.num_rows, "examples": n,
                                               "dropped": inputs.num_rows - n})
    print(f"[reranker] mined candidates for {n} of {inputs.num_rows} rationales "
          f"(K={cfg.reranker.candidates_k}) -> {out}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# evaluation candidates


class EvalCandidates:
    """Ray Data actor: per held-out question, the BM25 top passage of its rationale (`silver_top_id`),
    and the retriever's top-k* for the question (`passage_*` columns, as `knowledge.retrieve` adds them,
    plus `retrieved_ids`, the same ids kept in retrieval order)."""

    def __init__(self, run_dir: str, cfg: KnowledgeConfig, k_star: int):
        from kard_ray.knowledge import Retriever

        self.retriever = Retriever.from_run_dir(run_dir, cfg)
        self.k_star = int(k_star)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kard_ray.knowledge.retriever import append_results

        bm25 = self.retriever.bm25
        rows, scores = bm25.search_rows(batch.column("rationale").to_pylist(), 1)
        top = [bm25.store.ids[int(r[0])].as_py() if s[0] > 0 else None for r, s in zip(rows, scores)]
        batch = batch.append_column("silver_top_id", pa.array(top, pa.string()))
        results = self.retriever.search_rows(batch.column("query").to_pylist(), self.k_star)
        batch = append_results(batch, results, self.retriever)
        return batch.append_column("retrieved_ids", batch.column("passage_ids"))
