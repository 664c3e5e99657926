"""BM25: kard-ray's retriever (bm25s inside `BM25Index`/`Retriever`) vs rank_bm25 (BM25Okapi).

Same passages (the Wikipedia slice), same tokenizer (`BM25Tokenizer`: both indexes see identical
tokens), same rationale queries, top-10, one thread each, one process (no Ray involved).

    python bench/bench_bm25.py [--queries 1000] [--baseline-seconds 40] [--data DIR] [--smoke]

rank_bm25 scores a query with a Python loop over every passage per query term (0.2-2 s a rationale
here, depending on the machine's load), so it runs the queries in order until `--baseline-seconds`
have passed (at most all of them); kard-ray is timed on those same queries (the ratio) and on all. Figures: index build s, queries/s batched (one `search` call with all
queries) and one at a time (`search([q])`, the online path), overlap of the two top-10 lists.
Last line: `RATIO bm25 <kard-ray q/s one-at-a-time / rank_bm25 q/s>` — the online (slower) kard-ray
figure, so the ratio is the conservative one.
"""

from __future__ import annotations

import numpy as np

import common


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1000, help="rationale queries for kard-ray")
    p.add_argument("--baseline-seconds", type=float, default=40.0,
                   help="time budget for rank_bm25: it answers the first queries until this has passed")
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args(argv)
    if args.smoke:
        args.queries, args.baseline_seconds = 50, 1.0
    repeats = args.repeats or (2 if args.smoke else 5)
    data = common.data_dir(args.data, (common.PASSAGES_FILE, common.RATIONALES_FILE))
    rep = common.Report("bm25", args)

    from rank_bm25 import BM25Okapi

    from kard_ray.config import BM25Config, KnowledgeConfig
    from kard_ray.knowledge import BM25Index, BM25Tokenizer, Retriever, format_passage

    common.set_threads(1)
    passages = common.load_passages(data, limit=2000 if args.smoke else None)
    queries = common.load_rationales(data, args.queries)
    rep.fig("passages", passages.num_rows)
    rep.fig("queries (kard-ray)", len(queries))
    cfg = BM25Config()

    # -- build: kard-ray tokenises + indexes (precomputes every term's scores); rank_bm25 tokenises
    # with the same tokenizer + counts. Medians of repeats (build is deterministic).
    titles, texts = passages.column("title").to_pylist(), passages.column("text").to_pylist()
    tok = BM25Tokenizer(cfg)
    holder: dict = {}

    def build_kard():
        holder["kard"] = BM25Index.build(passages, cfg)

    def build_rank():
        corpus = [tok(format_passage(t, x)) for t, x in zip(titles, texts)]
        holder["rank"] = BM25Okapi(corpus)

    b = common.interleaved({"kard": build_kard, "rank": build_rank}, repeats=max(1, repeats // 2), warmup=0)
    rep.fig("build_s kard-ray (median)", common.median(b["kard"]), "s")
    rep.fig("build_s rank_bm25 (median)", common.median(b["rank"]), "s")
    index, okapi = holder["kard"], holder["rank"]
    retriever = Retriever(index, KnowledgeConfig())
    ids = passages.column("id").to_pylist()  # rank_bm25 indexes the file order (kard-ray sorts by id)

    k = args.k

    # -- rank_bm25 first: it decides the subset. One pass (each query takes long; the per-query
    # spread is reported instead of repeats), after one warm-up query.
    def rank_search(q: str) -> list[str]:
        scores = okapi.get_scores(tok(q))
        top = np.argpartition(-scores, k)[:k] if len(scores) > k else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [ids[i] for i in top]

    rank_search(queries[0])
    per_q, rank_hits = [], []
    for q in queries:
        hits, dt = common.timed(lambda: rank_search(q))
        per_q.append(dt)
        rank_hits.append(hits)
        if sum(per_q) >= args.baseline_seconds and len(per_q) >= 3:
            break
    nb = len(per_q)
    sub = queries[:nb]
    qps_rank = nb / sum(per_q)
    rep.fig("queries (rank_bm25 subset)", nb)
    rep.fig("rank_bm25 q/s (subset)", qps_rank, "q/s")
    rep.fig("rank_bm25 s/query p50 / p90", f"{common.pct(per_q, 50):.3f} / {common.pct(per_q, 90):.3f}", "s")

    # -- kard-ray search: batched (offline stages) and one query per call (Serve's Retriever)
    t_batch = common.repeat(lambda: retriever.search(queries, k), repeats)
    t_single = common.repeat(lambda: [retriever.search([q], k) for q in queries], max(1, repeats // 2))
    t_sub_batch = common.repeat(lambda: retriever.search(sub, k), repeats)
    t_sub_single = common.repeat(lambda: [retriever.search([q], k) for q in sub], repeats)
    qps_batch = len(queries) / common.median(t_batch)
    qps_single = len(queries) / common.median(t_single)
    rep.fig("kard-ray q/s batched (all queries)", qps_batch, "q/s")
    rep.fig("kard-ray q/s one at a time (all queries)", qps_single, "q/s")
    qps_sub_batch = nb / common.median(t_sub_batch)
    qps_sub_single = nb / common.median(t_sub_single)
    rep.fig("kard-ray q/s batched (rank_bm25 subset)", qps_sub_batch, "q/s")
    rep.fig("kard-ray q/s one at a time (rank_bm25 subset)", qps_sub_single, "q/s")

    # -- sanity: both are BM25 over the same tokens (Lucene vs Okapi idf differ slightly)
    kard_hits = [[h["id"] for h in r] for r in retriever.search(sub, k)]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(kard_hits, rank_hits)]))
    top1 = float(np.mean([a[0] == b[0] for a, b in zip(kard_hits, rank_hits)]))
    rep.fig("top-10 overlap kard-ray vs rank_bm25", overlap)
    rep.fig("top-1 agreement", top1)
    if nb < len(queries):
        rep.note(f"rank_bm25 timed on the first {nb} of {len(queries)} queries ({common.pct(per_q, 50):.2f} s per "
                 f"query at this load; budget --baseline-seconds {args.baseline_seconds:g}); the ratio compares "
                 "kard-ray on those same queries, one query per call")

    ratio = qps_sub_single / qps_rank
    rep.finish(ratio, target=10.0, ratio_label="kard-ray q/s (one query per call) / rank_bm25 q/s", extra_ratios={
        "q/s batched / rank_bm25": round(qps_sub_batch / qps_rank, 1),
        "build time rank_bm25 / kard-ray": round(common.median(b["rank"]) / common.median(b["kard"]), 3)})
    return rep.data


if __name__ == "__main__":
    main()
