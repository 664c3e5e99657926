"""How well the reranker puts the rationale's passage first: Hits@k and MRR of the silver passage.

The silver passage of a held-out question is BM25's top hit for its (test-time or held-out) teacher
rationale; it is looked for among the question's retrieved top-k* candidates, in retrieval order and in
reranker order. Held-out questions: the test split when test-time rationales exist
(`eval.oracle_rationales_path`, or the synthetic task's own), otherwise the training questions held out
of mining (`kard_ray.training.reranker_mining.is_holdout`).

    metrics = evaluate_reranker(cfg, run, run.model("reranker"))   # -> <run>/eval/reranker_metrics.json
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from kard_ray import io
from kard_ray.config import KardConfig, KnowledgeConfig
from kard_ray.data.stage import read_questions, test_rationales_path
from kard_ray.inference.formats import question_query
from kard_ray.inference.reranker import rerank_dataset
from kard_ray.io import RunDir
from kard_ray.teacher.kept import kept_rationales
from kard_ray.training.reranker_mining import holdout_key, is_holdout
from kard_ray.console import say

HITS_AT = (1, 3, 5, 10)
METRICS_FILE = "reranker_metrics.json"


def hits_at(ranked: list[list[str]], gold: list[Optional[str]], ks=HITS_AT) -> dict:
    """Share of questions whose gold id is among the first k of its ranking, per k; and MRR."""
    n = len(ranked)
    out = {f"hits@{k}": (sum(g is not None and g in r[:k] for r, g in zip(ranked, gold)) / n if n else 0.0)
           for k in ks}
    rr = [1.0 / (r.index(g) + 1) for r, g in zip(ranked, gold) if g is not None and g in r]
    out["mrr"] = sum(rr) / n if n else 0.0
    return out


def eval_inputs(cfg: KardConfig, run: RunDir) -> tuple[Optional[pa.Table], str]:
    """(question_id, query, rationale) of the held-out questions, and where they come from.

    Test split with test-time rationales (first rationale of each) when there are some; else the
    held-out share of the training questions (first kept rationale); else (None, reason).
    """
    from kard_ray.teacher import load_teacher_rationales

    rows = []
    path = test_rationales_path(cfg, run)
    if path and cfg.reranker.eval_on == "auto":
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
            if qid in seen or not is_holdout(holdout_key(cfg, qid), cfg.seed, cfg.reranker.holdout_fraction):
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


class ZeroShotDense:
    """The zero-shot baselines inside the candidate lists: each candidate's cosine to the question under the
    run's dense encoder (`knowledge.dense.encoder`, its stored passage embeddings: `build_indexes` writes them
    whenever an encoder is set), and the reciprocal-rank fusion of that order with the retrieval order
    (`knowledge.rrf_k`). Holds every stored embedding (passages x dim float32): an evaluation-size corpus."""

    def __init__(self, run_dir: str, cfg: KnowledgeConfig):
        import numpy as np

        from kard_ray.knowledge.dense import Encoder

        run = RunDir(run_dir)
        table = io.read_table(run.embeddings, columns=["id", "embedding"])
        self.row = {pid: i for i, pid in enumerate(table.column("id").to_pylist())}
        col = table.column("embedding").combine_chunks()
        self.vectors = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
        self.encoder = Encoder.from_config(cfg.dense, num_threads=1)
        self.batch_size, self.rrf_k = cfg.dense.batch_size, cfg.rrf_k

    def orders(self, queries: list[str], candidates: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
        """(dense order, hybrid order) of each query's candidate ids (ties keep retrieval order)."""
        import numpy as np

        q = self.encoder.encode(queries, self.batch_size)
        dense, hybrid = [], []
        for qv, ids in zip(q, candidates):
            missing = [pid for pid in ids if pid not in self.row]
            if missing:
                raise KeyError(f"passage {missing[0]!r} has no stored embedding: rebuild the knowledge stage")
            scores = self.vectors[[self.row[pid] for pid in ids]] @ qv
            order = np.argsort(-scores, kind="stable")
            dense.append([ids[i] for i in order])
            dense_rank = np.empty(len(ids), np.int64)
            dense_rank[order] = np.arange(1, len(ids) + 1)
            fused = 1.0 / (self.rrf_k + np.arange(1, len(ids) + 1)) + 1.0 / (self.rrf_k + dense_rank)
            hybrid.append([ids[i] for i in np.argsort(-fused, kind="stable")])
        return dense, hybrid


class EvalCandidates:
    """Ray Data actor: per held-out question, the BM25 top passage of its rationale (`silver_top_id`),
    and the retriever's top-k* for the question (`passage_*` columns, as `knowledge.retrieve` adds them,
    plus `retrieved_ids`, the same ids kept in retrieval order); with `zero_shot`, also `dense_ids` and
    `hybrid_ids` (`ZeroShotDense`)."""

    def __init__(self, run_dir: str, cfg: KnowledgeConfig, k_star: int, zero_shot: bool = False):
        from kard_ray.knowledge import Retriever

        self.retriever = Retriever.from_run_dir(run_dir, cfg)
        self.k_star = int(k_star)
        self.zero_shot = ZeroShotDense(run_dir, cfg) if zero_shot else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from kard_ray.knowledge.retriever import append_results

        bm25 = self.retriever.bm25
        rows, scores = bm25.search_rows(batch.column("rationale").to_pylist(), 1)
        top = [bm25.store.ids[int(r[0])].as_py() if s[0] > 0 else None for r, s in zip(rows, scores)]
        batch = batch.append_column("silver_top_id", pa.array(top, pa.string()))
        results = self.retriever.search_rows(batch.column("query").to_pylist(), self.k_star)
        batch = append_results(batch, results, self.retriever)
        batch = batch.append_column("retrieved_ids", batch.column("passage_ids"))
        if self.zero_shot is not None:
            dense, hybrid = self.zero_shot.orders(batch.column("query").to_pylist(),
                                                  batch.column("retrieved_ids").to_pylist())
            batch = batch.append_column("dense_ids", pa.array(dense, pa.list_(pa.string())))
            batch = batch.append_column("hybrid_ids", pa.array(hybrid, pa.list_(pa.string())))
        return batch


def evaluate_reranker(cfg: KardConfig, run: RunDir, model_dir: str) -> dict:
    """Hits@{1,3,5,10} and MRR of the silver top passage (BM25's top hit for a held-out question's
    rationale) among the question's top-k* candidates, in retrieval order vs reranker order (and, when
    the run has dense embeddings, zero-shot dense and hybrid order: `ZeroShotDense`).

    Writes `<run>/eval/reranker_metrics.json` and returns it. The reranking runs as the batch stage
    (`rerank_dataset`), the same path evaluation uses.
    """
    import ray

    rc = cfg.reranker
    path = run.path("eval", METRICS_FILE)
    table, source = eval_inputs(cfg, run)
    if table is None:
        metrics = {"skipped": source}
        io.write_json(path, metrics)
        say(f"[reranker] Hits@k not measured: {source}")
        return metrics
    kc = cfg.knowledge
    zero_shot = kc.dense.encoder is not None and io.exists(run.embeddings)
    ds = ray.data.from_arrow(table).map_batches(
        EvalCandidates, batch_format="pyarrow", batch_size=kc.retrieval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=kc.retrieval_actors), num_cpus=kc.num_cpus_per_retrieval_actor,
        fn_constructor_kwargs={"run_dir": run.root, "cfg": kc, "k_star": rc.k_star, "zero_shot": zero_shot})
    # the candidates come out of retrieval in few large blocks: split them so every reranking actor gets work
    ds = rerank_dataset(ds.repartition(4 * rc.num_actors), model_dir, cfg, k=rc.k_star)
    orders = {"bm25": "retrieved_ids", "reranker": "passage_ids"}
    if zero_shot:
        orders.update({"dense": "dense_ids", "hybrid": "hybrid_ids"})
    rows = sorted(ds.select_columns(["question_id", "silver_top_id", *orders.values()]).take_all(),
                  key=lambda r: r["question_id"])
    gold = [r["silver_top_id"] for r in rows]
    ranked = {name: [list(r[col]) for r in rows] for name, col in orders.items()}
    metrics = {
        "n_questions": len(rows), "source": source, "k_star": rc.k_star, "retriever": kc.retriever,
        "silver_in_candidates": hits_at(ranked["bm25"], gold, (rc.k_star,))[f"hits@{rc.k_star}"],
        **{name: hits_at(lists, gold) for name, lists in ranked.items()},
        "orders": {"bm25": f"{kc.retriever} retrieval order", "reranker": "the distilled reranker",
                   **({"dense": f"zero-shot cosine under {kc.dense.encoder}",
                       "hybrid": f"reciprocal-rank fusion of retrieval and dense (k={kc.rrf_k})"} if zero_shot else {})},
        "architecture": rc.architecture, "loss": rc.loss, "lora_r": rc.lora.r, "init_model": rc.model,
        "model_dir": model_dir,
    }
    io.write_json(path, metrics)
    say("[reranker] Hits@1/3/5/10 on {} held-out questions: {}".format(len(rows), "; ".join(
        f"{name} " + "/".join(f"{metrics[name][f'hits@{k}']:.3f}" for k in HITS_AT) for name in orders)))
    return metrics
