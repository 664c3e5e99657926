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
from kard_ray.training.reranker_mining import is_holdout
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


def evaluate_reranker(cfg: KardConfig, run: RunDir, model_dir: str) -> dict:
    """Hits@{1,3,5,10} of the silver top passage (BM25's top hit for a held-out question's rationale)
    among the question's top-k* candidates, in retrieval order vs reranker order.

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
    ds = ray.data.from_arrow(table).map_batches(
        EvalCandidates, batch_format="pyarrow", batch_size=kc.retrieval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=kc.retrieval_actors), num_cpus=kc.num_cpus_per_retrieval_actor,
        fn_constructor_kwargs={"run_dir": run.root, "cfg": kc, "k_star": rc.k_star})
    ds = rerank_dataset(ds, model_dir, cfg, k=rc.k_star)
    rows = sorted(ds.select_columns(["question_id", "silver_top_id", "retrieved_ids", "passage_ids"]).take_all(),
                  key=lambda r: r["question_id"])
    gold = [r["silver_top_id"] for r in rows]
    retrieved = [list(r["retrieved_ids"]) for r in rows]
    reranked = [list(r["passage_ids"]) for r in rows]
    metrics = {
        "n_questions": len(rows), "source": source, "k_star": rc.k_star, "retriever": kc.retriever,
        "silver_in_candidates": hits_at(retrieved, gold, (rc.k_star,))[f"hits@{rc.k_star}"],
        "bm25": hits_at(retrieved, gold), "reranker": hits_at(reranked, gold),
        "architecture": rc.architecture, "loss": rc.loss, "model_dir": model_dir,
    }
    io.write_json(path, metrics)
    b, r = metrics["bm25"], metrics["reranker"]
    say("[reranker] Hits@1/3/5/10 on {} held-out questions: retrieval {} -> reranker {}".format(
        len(rows), "/".join(f"{b[f'hits@{k}']:.3f}" for k in HITS_AT),
        "/".join(f"{r[f'hits@{k}']:.3f}" for k in HITS_AT)))
    return metrics
