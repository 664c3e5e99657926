"""Batch evaluation / generation: the Ray Data evaluation stage (`predict_method(cfg, run, "kard_bm25")`:
BM25 retrieval actor -> `PredictBatch` student actor -> parquet) vs a bare `generate` loop.

    python bench/bench_generate.py [--seconds 20] [--questions N] [--data DIR] [--smoke]

Both sides answer the same StrategyQA test questions with the same student (a tiny T5 built
offline, greedy decoding, `--max-new-tokens`, batches of `--batch-size`, sources of at most
`--max-source` tokens) and the same top-1 BM25 passage (queried with the question + options), and
write parquet. The baseline is the script a user would write: load index and model, then per batch
search, format the KARD source, tokenize, `model.generate`, decode, read the answer, write parquet.

Thread budget: the student actor reserves one CPU (Ray sets one OMP/torch thread; the script checks
it inside a 1-CPU Ray worker and prints it); the baseline sets `torch.set_num_threads(1)`.

As in bench_embed.py, each side runs on N questions and on one batch per round; the one-batch run
carries the fixed costs (Ray: actor start-up, imports, model + index load; baseline: model + index
load), so `(N - batch) / (T(N) - T(one batch))` is the steady-state questions/s with warm-up
excluded (`common.steady_rates`: the ratio is the median over rounds of each round's own estimate);
N / T(N) is reported too. The two sides' generations are checked to be identical.
Last line: `RATIO generate <steady-state questions/s, Ray Data stage / bare loop>`.
"""

from __future__ import annotations

import os
import shutil

import common


def make_eval_run(base_root: str, root: str, questions) -> str:
    """A run directory holding `questions` as its test split and the base run's index and models (links)."""
    from kard_ray import io

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for d in ("index", "models"):
        os.symlink(os.path.join(base_root, d), os.path.join(root, d))
    io.write_table(questions, io.RunDir(root).questions("test"))
    return root


class Baseline:
    """The hand-written evaluation script."""

    def __init__(self, run_root: str, args):
        self.root, self.args = run_root, args

    def __call__(self, questions_path: str, out_dir: str) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from kard_ray.inference.formats import question_query
        from kard_ray.io import RunDir
        from kard_ray.knowledge import BM25Index
        from kard_ray.models import load_seq2seq, load_tokenizer
        from kard_ray.teacher import parse_prediction
        from kard_ray.inference.formats import format_source

        run = RunDir(self.root)
        rows = pq.read_table(questions_path).to_pylist()
        index = BM25Index.load(run.bm25_index)
        tok = load_tokenizer(run.model("student_kard"))
        model = load_seq2seq(run.model("student_kard")).eval()
        bs, out = self.args.batch_size, []
        for s in range(0, len(rows), bs):
            batch = rows[s:s + bs]
            hits = index.search([question_query(r["question"], r["options"]) for r in batch], 1)[0]
            docs = {p["id"]: f"{p['title']} . {p['text']}" for p in index.get(sorted({h[0] for h in hits}))}
            sources = [format_source(r["question"], r["options"], [docs[h[0]]], "strategyqa") for r, h in zip(batch, hits)]
            enc = tok(sources, return_tensors="pt", padding=True, truncation=True, max_length=self.args.max_source)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=self.args.max_new_tokens, do_sample=False, num_beams=1)
            texts = [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
            for r, t in zip(batch, texts):
                parsed = parse_prediction(t, r["options"])
                pred = parsed["letter"] if parsed["letter"] is not None else parsed["text"]
                out.append({"question_id": r["id"], "generation": t, "pred_index": -1 if pred is None else int(pred),
                            "correct": pred == r["answer"]})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        pq.write_table(pa.Table.from_pylist(out), os.path.join(out_dir, "part-0.parquet"))
        return [o["generation"] for o in out]


def threads_in_ray_worker() -> int:
    """torch's intra-op threads inside a 1-CPU Ray worker (what a 1-CPU evaluation actor gets)."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(probe.remote())


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=15.0, help="size N so the baseline takes about this long")
    p.add_argument("--questions", type=int, default=None, help="fix N instead (at most the 687 test questions)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-source", type=int, default=256)
    args = p.parse_args(argv)
    if args.smoke:
        args.questions, args.batch_size, args.max_new_tokens, args.max_source = 8, 4, 8, 64
    repeats = args.repeats or (1 if args.smoke else 3)
    data = common.data_dir(args.data, (common.PASSAGES_FILE, "train.jsonl", "test.jsonl"))
    rep = common.Report("generate", args)

    import pyarrow.parquet as pq

    from kard_ray import io
    from kard_ray.config import load_config
    from kard_ray.evaluation.evaluate import predict_method

    common.set_threads(1)
    base_root = common.bench_run(args, data)
    questions = io.read_table(io.RunDir(base_root).questions("test"))
    bs = args.batch_size
    baseline = Baseline(base_root, args)
    work = common.work_dir(args, "generate")
    # calibration: the baseline on two batches (after one warm-up batch) -> N for about --seconds
    calib = make_eval_run(base_root, os.path.join(work, "run_calib"), questions.slice(0, 3 * bs))
    qpath = io.RunDir(calib).questions("test")
    tmp_q = os.path.join(work, "calib_q.parquet")
    pq.write_table(questions.slice(0, bs), tmp_q)
    baseline(tmp_q, os.path.join(work, "out_calib"))
    _, dt = common.timed(lambda: baseline(qpath, os.path.join(work, "out_calib")))
    rate = 3 * bs / dt
    n = args.questions or int(rate * args.seconds)
    n = max(2 * bs, min(questions.num_rows, (n // bs) * bs))
    rep.fig("calibration questions/s (baseline, 1 thread)", rate, "q/s")
    rep.fig("questions per timed run (N)", n)
    rep.fig("batch / max new tokens / max source tokens", f"{bs} / {args.max_new_tokens} / {args.max_source}")
    rep.fig("student", "tiny T5 " + ("d64 L1 (smoke)" if args.smoke else "d128 L2 (built offline), greedy"))
    run_n = make_eval_run(base_root, os.path.join(work, "run_N"), questions.slice(0, n))
    run_1 = make_eval_run(base_root, os.path.join(work, "run_1"), questions.slice(0, bs))

    started = common.ray_init()
    try:
        rep.fig("torch threads in a 1-CPU Ray worker", threads_in_ray_worker())
        cfg_overrides = [
            "data.dataset=strategyqa", f"data.train_path={data / 'train.jsonl'}", f"student.max_source_length={args.max_source}",
            f"eval.batch_size={bs}", f"eval.max_new_tokens={args.max_new_tokens}", "eval.decoding=greedy", "eval.k=1",
            "eval.num_actors=1", "eval.num_cpus_per_actor=1.0", "knowledge.retrieval_actors=1",
            "knowledge.num_cpus_per_retrieval_actor=0.5"]

        def ray_side(root: str):
            cfg = load_config(None, cfg_overrides + [f"run_dir={root}"])
            return lambda: predict_method(cfg, io.RunDir(root), "kard_bm25")

        def base_side(root: str):
            return lambda: baseline(io.RunDir(root).questions("test"), os.path.join(root, "baseline_predictions"))

        sides = {"ray_N": ray_side(run_n), "base_N": base_side(run_n)}
        if not args.smoke:  # smoke: one size only, rates end to end
            sides.update(ray_1=ray_side(run_1), base_1=base_side(run_1))
        times = common.interleaved(sides, repeats=repeats, warmup=0 if args.smoke else 1,
                                   warmup_sides=["ray_1", "base_1"])
    finally:
        if started:
            import ray

            ray.shutdown()
    st = common.steady_rates(times, n, bs)
    med, steady, e2e = st["medians"], st["of_medians"], st["end_to_end"]
    rep.data["times"] = times
    rep.fig(f"T(N) Ray stage / baseline (median of {repeats})", f"{med['ray_N']:.2f} / {med['base_N']:.2f}", "s")
    rep.fig("T(one batch) Ray stage / baseline (fixed costs)", f"{med['ray_1']:.2f} / {med['base_1']:.2f}", "s")
    rep.fig("steady questions/s Ray stage", steady["ray"], "q/s")
    rep.fig("steady questions/s baseline", steady["base"], "q/s")
    rep.fig("end-to-end questions/s Ray stage", e2e["ray"], "q/s")
    rep.fig("end-to-end questions/s baseline", e2e["base"], "q/s")
    rep.fig("steady ratio (median of paired rounds)", st["paired_ratio"])
    rep.fig("steady ratio (of medians)", st["ratio_of_medians"])
    # like for like: the same generations both ways
    ray_pred = io.read_table(io.RunDir(run_n).path("eval", "predictions", "kard_bm25"))
    base_pred = pq.read_table(os.path.join(run_n, "baseline_predictions"))
    a = dict(zip(ray_pred.column("question_id").to_pylist(), ray_pred.column("generation").to_pylist()))
    b = dict(zip(base_pred.column("question_id").to_pylist(), base_pred.column("generation").to_pylist()))
    same = sum(a.get(k) == v for k, v in b.items())
    rep.fig("identical generations (Ray stage vs baseline)", f"{same}/{len(b)}")
    if len(a) != len(b):
        raise AssertionError(f"the Ray stage answered {len(a)} questions, the baseline {len(b)}")
    rep.finish(st["paired_ratio"], target=0.8, ratio_label="Ray Data evaluation stage / bare generate loop, steady questions/s",
               extra_ratios={
        "steady, of medians": round(st["ratio_of_medians"], 3),
        "end-to-end (fixed costs included)": round(st["end_to_end_ratio"], 3)})
    return rep.data


if __name__ == "__main__":
    main()
