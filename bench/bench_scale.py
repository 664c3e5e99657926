"""The knowledge layer at millions of passages: generated text of ~100 words per passage.

    nice -n 10 python bench/bench_scale.py --passages 1000000 [--shards 2] [--single-max 1000000] --out bench/results/scale_1m.json

Per size: ingest (Ray Data: read 4 JSONL files, chunk, hash dedup, unique ids, parquet) passages/s; sharded
BM25 build time; peak RSS of EVERY process (a sampler polls the driver and all Ray workers, by task/actor
name); batched query rate through the shard actors and one-at-a-time through the `Retriever` (what Serve
calls); sharded vs single-index exactness (single built up to --single-max passages); dense embedding
rate with the tiny encoder on a sample; IVF-PQ build and recall@10 vs exact on that sample.

The generated corpus: a Zipf(1.1) vocabulary of 200,000 words, 100 words per document, a title of two
words, 1% exact duplicate documents (dedup removes them). Queries: 8 words from a random passage plus 2
random vocabulary words.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time

import numpy as np

import common

VOCAB = 200_000


# ------------------------------------------------------------------------------------------------
# inputs


def generate_corpus(out_dir: str, n: int, n_files: int = 4, seed: int = 0) -> int:
    """`n` documents of 100 words in `n_files` JSONL files; ~1% are exact copies of an earlier one."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(VOCAB)], dtype=object)
    os.makedirs(out_dir, exist_ok=True)
    per = -(-n // n_files)
    doc = 0
    for f in range(n_files):
        with open(os.path.join(out_dir, f"corpus-{f}.jsonl"), "w") as fh:
            for start in range(f * per, min(n, (f + 1) * per), 50_000):
                m = min(50_000, min(n, (f + 1) * per) - start)
                ids = np.minimum(rng.zipf(1.1, size=(m, 102)) - 1, VOCAB - 1)
                lines = []
                for r in range(m):
                    row = ids[r] if rng.random() > 0.01 or doc < 10 else ids[0]  # ~1% copies
                    lines.append(json.dumps({"id": f"d{doc}", "title": " ".join(words[row[:2]]),
                                             "text": " ".join(words[row[2:]])}))
                    doc += 1
                fh.write("\n".join(lines) + "\n")
    return doc


class RssSampler:
    """Peak resident memory of the driver and every Ray worker process, by process title."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.psutil, self.interval = psutil, interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self.psutil.Process()
        while not self._stop.is_set():
            # this driver and its descendants only (its GCS, raylet and their workers): the machine is
            # shared, and other sessions' Ray processes must not count
            try:
                procs = [me] + me.children(recursive=True)
            except self.psutil.Error:
                procs = [me]
            for p in procs:
                try:
                    name = "driver" if p.pid == me.pid else (p.cmdline() or ["?"])[0].split()[0][:60]
                    rss = p.memory_info().rss
                    self.peak[name] = max(self.peak.get(name, 0), rss)
                except (self.psutil.Error, AttributeError, KeyError, TypeError):
                    pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        return {k: round(v / 2**30, 2) for k, v in sorted(self.peak.items(), key=lambda kv: -kv[1])[:8]}


def make_queries(run, n: int, seed: int = 1) -> list[str]:
    import pyarrow.parquet as pq

    from kard_ray import io

    rng = random.Random(seed)
    f = io.list_files(run.passages, suffixes=(".parquet",))[0]
    texts = pq.read_table(f, columns=["text"]).column("text").to_pylist()
    out = []
    for _ in range(n):
        w = rng.choice(texts).split()
        s = rng.randrange(0, max(1, len(w) - 8))
        out.append(" ".join(w[s:s + 8] + [f"w{rng.randrange(VOCAB)}", f"w{rng.randrange(VOCAB)}"]))
    return out


# ------------------------------------------------------------------------------------------------
# phases


def bench_bm25(rep, run, args, n: int, queries: list[str]) -> None:
    from kard_ray.config import BM25Config
    from kard_ray.knowledge.sharded import build_sharded_bm25

    cfg = BM25Config(shards=args.shards)
    with RssSampler() as rss:
        stats, dt = common.timed(lambda: build_sharded_bm25(run.passages, run.bm25_index, cfg))
    rep.fig("bm25 sharded build s", round(dt, 1), "s")
    rep.fig("bm25 build passages/s", round(n / dt, 1), "p/s")
    rep.fig("bm25 nnz per passage", round(stats["nnz"] / n, 1))
    rep.fig("bm25 build peak RSS per process (GiB)", rss.report())
    rep.fig("bm25 build max RSS of one process GiB", max(rss.report().values()), "GiB")
    bench_queries(rep, run, args, n, queries)


def bench_queries(rep, run, args, n: int, queries: list[str]) -> None:
    """Query rates on the built index (batched through shard actors, one at a time through the
    `Retriever`, in-process pruned vs full scoring) and, up to --single-max, exactness vs one index."""
    from kard_ray.config import BM25Config, KnowledgeConfig
    from kard_ray.knowledge import Retriever
    from kard_ray.knowledge.sharded import load_bm25

    cfg = BM25Config(shards=args.shards)
    kcfg = KnowledgeConfig(bm25=cfg)
    retriever = Retriever.from_run_dir(run.root, kcfg, num_threads=1)  # shard actors, as Serve loads it
    sharded = retriever.bm25
    sharded.search_rows(queries[:16], 10)  # warm
    _, dt = common.timed(lambda: [sharded.search_rows(queries[i:i + 256], 10)
                                                   for i in range(0, len(queries), 256)])
    cores = min(os.cpu_count() or 1, len(sharded.actors))
    rep.fig("bm25 batched q/s (256 per call, shard actors)", round(len(queries) / dt, 1), "q/s")
    rep.fig("bm25 batched q/s per core", round(len(queries) / dt / cores, 1), "q/s")
    prune_vs_full(rep, run, queries[:256])
    one = queries[:args.single_queries]
    _, dt = common.timed(lambda: [retriever.search([q], 10) for q in one])
    rep.fig("retriever one-at-a-time q/s (Serve path)", round(len(one) / dt, 1), "q/s")
    import ray

    rep.fig("shard actor peak RSS GiB", [round(ray.get(a.peak_rss_bytes.remote()) / 2**30, 2) for a in sharded.actors])
    if n <= args.single_max and not args.queries_only:  # (--queries-only keeps the earlier exactness figures)
        from kard_ray.knowledge.bm25 import build_bm25_from_parquet

        single_dir = run.path("index", "bm25_single")
        task = ray.remote(num_cpus=1)(build_bm25_from_parquet)
        st, dt = common.timed(lambda: ray.get(task.remote(run.passages, single_dir, cfg)))
        rep.fig("single-index build s", round(dt, 1), "s")
        rep.fig("single-index build peak RSS GiB", round(st["peak_rss_bytes"] / 2**30, 2), "GiB")
        single = load_bm25(single_dir)
        check = queries[:500]
        ids_1, sc_1 = single.search(check, 10)
        ids_s, sc_s = sharded.search(check, 10)
        rep.fig("exactness: top-10 scores identical (500 queries)", bool(np.array_equal(sc_1, sc_s)))
        same = [a == b for a, b in zip(ids_1, ids_s)]
        rep.fig("exactness: identical top-10 id lists (ties may reorder)", round(float(np.mean(same)), 4))
        pair_ok = all(np.array_equal(single.score_pairs(q, i), s) for q, i, s in zip(check[:100], ids_s[:100], sc_s[:100]))
        rep.fig("exactness: shard hits score the same in the single index", pair_ok)
    for a in sharded.actors:
        ray.kill(a)


def prune_vs_full(rep, run, queries: list[str]) -> None:
    """In this process, one thread: MaxScore-pruned top-10 vs scoring every passage (bm25s's way, with a
    fancy-index add), on the same shards; both must give the same rows and scores."""
    from kard_ray.knowledge.sharded import ShardedBM25

    local = ShardedBM25(run.bm25_index)  # all shards memory-mapped here
    out = {}
    for prune in (True, False):
        for idx in local.local.shards.values():
            idx.prune = prune
        local.search_rows(queries[:8], 10)  # warm (page in, upper bounds)
        res, dt = common.timed(lambda: local.search_rows(queries, 10))
        out[prune] = res
        rep.fig(f"bm25 q/s in-process, 1 thread, {'pruned (MaxScore, then non-essential terms one by one)' if prune else 'full scoring'}",
                round(len(queries) / dt, 1), "q/s")
    same = all(np.array_equal(a, b) for a, b in zip(out[True], out[False]))
    rep.fig("pruned top-10 == full-scoring top-10 (rows and scores)", same)
    if not same:
        raise AssertionError("pruned BM25 top-10 differs from full scoring")


def bench_dense(rep, run, args) -> None:
    import pyarrow.parquet as pq

    from kard_ray import io
    from kard_ray.config import DenseConfig
    from kard_ray.knowledge.dense import build_faiss_from_parquet, embed_passages

    parts, got = [], 0
    for f in io.list_files(run.passages, suffixes=(".parquet",)):  # ingest writes many small files
        parts.append(pq.read_table(f))
        got += parts[-1].num_rows
        if got >= args.dense_sample:
            break
    import pyarrow as pa

    sample = pa.concat_tables(parts).slice(0, args.dense_sample)
    sdir = run.path("dense_sample")
    shutil.rmtree(sdir, ignore_errors=True)
    os.makedirs(sdir)
    pq.write_table(sample, os.path.join(sdir, "part-0.parquet"))
    model = common.tiny_model(args, "bert", lambda: sample.column("text").to_pylist()[:5000])
    cfg = DenseConfig(encoder=model, num_actors=1, num_cpus_per_actor=1.0, max_length=128, batch_size=64,
                      embed_block_rows=2048, index_type="ivfpq", pq_m=64, nlist=256, nprobe=32, recall_queries=200)
    emb = run.path("dense_sample_emb")
    st, dt = common.timed(lambda: embed_passages(sdir, emb, cfg))
    rep.fig("dense sample passages", sample.num_rows)
    rep.fig("dense embed passages/s (tiny encoder, 1 actor, incl. start-up)", round(sample.num_rows / dt, 1), "p/s")
    fst = build_faiss_from_parquet(emb, run.path("dense_sample_ivfpq"), cfg)
    rep.fig("ivfpq build s (sample)", fst["faiss_build_s"], "s")
    rep.fig("ivfpq bytes per passage", round(fst["index_bytes"] / sample.num_rows, 1), "B")
    rep.fig("ivfpq recall@10 vs exact (sample)", fst["recall_at_10_vs_exact"])


def run_size(rep, args, n: int) -> None:
    from kard_ray import io
    from kard_ray.config import KnowledgeConfig
    from kard_ray.knowledge import ingest_corpus

    work = common.work_dir(args, "scale", str(n))
    run = io.RunDir(os.path.join(work, "run"))
    if args.queries_only:  # the index of an earlier run of this size: re-measure its queries only
        if not (args.out and os.path.exists(args.out) and os.path.exists(run.bm25_index)):
            raise SystemExit(f"--queries-only needs {run.bm25_index} and --out of the run that built it")
        with open(args.out) as fh:
            earlier = json.load(fh)
        rep.data["figures"].update({k: v for k, v in earlier["figures"].items() if k not in rep.data["figures"]})
        rep.note(f"query figures re-measured on the index built by `{earlier['command']}` (load "
                 f"{earlier['load_start']} -> {earlier['load_end']}, {earlier['wall_s']} s); the other figures are that run's")
        n = rep.data["figures"]["passages after dedup"]
        bench_queries(rep, run, args, n, make_queries(run, args.queries))
        return
    corpus = os.path.join(work, "corpus")
    if not os.path.exists(os.path.join(corpus, "corpus-3.jsonl")):
        _, dt = common.timed(lambda: generate_corpus(corpus, n))
        rep.fig("generate s", round(dt, 1), "s")
    with RssSampler() as rss:
        counts, dt = common.timed(lambda: ingest_corpus([corpus], run, KnowledgeConfig(words_per_passage=120)))
    rep.fig("documents", counts["documents"])
    rep.fig("passages after dedup", counts["passages"])
    rep.fig("ingest s", round(dt, 1), "s")
    rep.fig("ingest passages/s", round(counts["documents"] / dt, 1), "p/s")
    rep.fig("ingest peak RSS per process (GiB)", rss.report())
    queries = make_queries(run, args.queries)
    bench_bm25(rep, run, args, counts["passages"], queries)
    if args.dense_sample:
        bench_dense(rep, run, args)


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--single-queries", type=int, default=200)
    p.add_argument("--single-max", type=int, default=1_000_000, help="also build one index (exactness) up to this size")
    p.add_argument("--dense-sample", type=int, default=20_000)
    p.add_argument("--queries-only", action="store_true",
                   help="re-measure the query figures on the index an earlier run of this size built (--out: its JSON)")
    args = p.parse_args(argv)
    if args.smoke:
        args.passages, args.queries, args.single_queries, args.dense_sample = 20_000, 256, 20, 2_000
    rep = common.Report(f"scale_{args.passages}", args)
    rep.fig("passages (generated documents)", args.passages)
    rep.fig("shards", args.shards)
    for attempt in range(4):  # under heavy machine load the raylet can miss Ray's fixed 30 s start-up wait
        try:
            common.ray_init(num_cpus=4)
            break
        except Exception as e:  # noqa: BLE001
            if attempt == 3 or "timed out during startup" not in str(e):
                raise
            import ray

            ray.shutdown()
            print(f"  note: Ray start-up timed out (load {os.getloadavg()[0]:.0f}); retrying", flush=True)
    common.quiet_ray_data()
    run_size(rep, args, args.passages)
    rss = rep.data["figures"].get("bm25 build max RSS of one process GiB", 0)
    rep.finish(rss, target=8.0, higher_is_better=False, ratio_label="max RSS of one process in the BM25 build, GiB")


if __name__ == "__main__":
    main()
