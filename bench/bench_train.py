"""Training: the trainer core (`kard_ray.training.core.train`, Ray Train TorchTrainer, one worker) vs
a bare PyTorch loop, same model, same data, same batch size.

    python bench/bench_train.py [--steps 30] [--batch-size 8] [--data DIR] [--smoke]

Data: KARD student examples from real StrategyQA — each training question's first teacher rationale
as the target, the question + options + the passage BM25 retrieves for that rationale as the source
(`format_source`/`format_target`, tokenised with `encode_sources`, at most `--max-source` tokens).
Model: a tiny T5 built offline (the same initial weights on both sides). Both sides see the rows in
the same order (shuffled once, then no shuffling), AdamW at the same lr, gradient clipping at 1.0.

Thread budget: the Ray Train worker reserves one CPU and runs torch with one thread; the in-process
core (num_workers=0) and the baseline run with `torch.set_num_threads(1)`.

Timing: each step's forward start is stamped (a thin wrapper around the task's loss_fn, the same
stamp in the baseline loop); samples/s and tokens/s are taken over the steps after `--warmup`, so
worker start-up, model build and the first steps are excluded on both sides (the one-off `fit()`
start-up is reported separately). On a GPU (`--device cuda`) MFU is reported from
`seq2seq_flops_per_token` and the card's peak bf16 FLOP/s.
Last line: `RATIO train <core at 1 worker samples/s / bare loop samples/s>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import common

CLOCK_FILE = "bench_step_clock.json"


class StepClock:
    """Wraps a TrainTask: stamps each loss_fn call (a step's start at grad_accum 1), keeps its token
    count, and writes both beside the exported model (the worker's stamps reach the driver that way)."""

    def __init__(self, inner):
        self.inner = inner
        self.marks: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list = []

    def loss_fn(self, model, batch, step):
        self.marks.append(time.perf_counter())
        self.cpu.append(time.process_time())
        loss, n = self.inner.loss_fn(model, batch, step)
        self.tokens.append(n.detach() if hasattr(n, "detach") else n)  # no host sync here
        return loss, n

    def export_fn(self, model, directory: str) -> None:
        self.inner.export_fn(model, directory)
        with open(os.path.join(directory, CLOCK_FILE), "w") as fh:
            json.dump({"marks": self.marks, "cpu": self.cpu, "tokens": [float(t) for t in self.tokens]}, fh)

    def task(self):
        return dataclasses.replace(self.inner, loss_fn=self.loss_fn, export_fn=self.export_fn)


def steady(marks: list[float], cpu: list[float], tokens: list[float], warmup: int, batch_size: int) -> dict:
    """Throughput from the stamp of step `warmup` to the last stamp (whole steps between):
    samples/s and tokens/s by wall clock; also by the median step (robust to load bursts on a shared
    machine) and per CPU-second of the training process (what the work costs, whatever the load)."""
    import statistics

    if len(marks) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} steps to time, got {len(marks)}")
    steps = len(marks) - 1 - warmup
    dt = marks[-1] - marks[warmup]
    step_times = [b - a for a, b in zip(marks[warmup:-1], marks[warmup + 1:])]
    return {"steps": steps, "seconds": dt, "samples_per_s": steps * batch_size / dt,
            "tokens_per_s": sum(tokens[warmup:-1]) / dt, "s_per_step": dt / steps,
            "samples_per_s_median_step": batch_size / statistics.median(step_times),
            "samples_per_cpu_s": steps * batch_size / max(cpu[-1] - cpu[warmup], 1e-9)}


def build_examples(args, data, n_rows: int):
    """Tokenised KARD examples (input_ids, labels) for the first `n_rows` training questions, in a
    fixed shuffled order, as an Arrow table."""
    import random

    import pyarrow as pa

    from kard_ray.io import RunDir
    from kard_ray.knowledge import BM25Index
    from kard_ray.models import load_tokenizer
    from kard_ray.teacher import load_teacher_rationales
    from kard_ray.inference.formats import answer_letter, encode_sources, format_source, format_target
    from kard_ray.training.student import encode_targets

    run = RunDir(common.bench_run(args, data))
    questions = common.load_questions(data, "train").to_pylist()
    by_q = load_teacher_rationales(str(data / common.RATIONALES_FILE))
    rows = [(q, by_q[q["id"]][0]) for q in questions if by_q.get(q["id"])][:n_rows]
    if len(rows) < n_rows:
        raise common.BenchError(f"only {len(rows)} training questions with rationales, {n_rows} needed")
    index = BM25Index.load(run.bm25_index)
    hits = index.search([r for _, r in rows], 1)[0]
    passages = {p["id"]: f"{p['title']} . {p['text']}" for p in index.get(sorted({h[0] for h in hits}))}
    sources = [format_source(q["question"], q["options"], [passages[h[0]]], "strategyqa") for (q, _), h in zip(rows, hits)]
    targets = [format_target(r, answer_letter(q["answer"], len(q["options"]))) for q, r in rows]
    tok = load_tokenizer(run.model("student_kard"))
    src = encode_sources(tok, sources, args.max_source)
    tgt = encode_targets(tok, targets, args.max_target)
    order = list(range(len(src)))
    random.Random(0).shuffle(order)
    ids = pa.list_(pa.int32())
    return pa.table({"question_id": [rows[i][0]["id"] for i in order], "sample": pa.array([0] * len(order), pa.int64()),
                     "input_ids": pa.array([src[i] for i in order], ids),
                     "labels": pa.array([tgt[i] for i in order], ids)}), run.model("student_kard")


def bare_loop(table, init: str, args, device: str) -> dict:
    """What a user writes without kard-ray: DataLoader + model + AdamW + clipping."""
    import contextlib

    import torch

    from kard_ray.training.student import Seq2SeqBuild, Seq2SeqCollate, seq2seq_flops_per_token

    torch.manual_seed(0)
    model = Seq2SeqBuild()({"init_model": init}).to(device).train()
    pad = model.config.pad_token_id
    collate = Seq2SeqCollate(pad)
    rows = [{"input_ids": a, "labels": b} for a, b in zip(table.column("input_ids").to_pylist(),
                                                          table.column("labels").to_pylist())]
    loader = torch.utils.data.DataLoader(
        rows, batch_size=args.batch_size, shuffle=False, drop_last=True,
        collate_fn=lambda b: collate({"input_ids": [r["input_ids"] for r in b], "labels": [r["labels"] for r in b]}))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device == "cuda" or None)
    marks, cpu, tokens = [], [], []
    total = args.warmup + args.steps + 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    for step, batch in enumerate(loader):
        if step >= total:
            break
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens.append(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    if device == "cuda":
        torch.cuda.synchronize()
    out = steady(marks, cpu, [float(t) for t in tokens], args.warmup, args.batch_size)
    out["flops_per_token"] = seq2seq_flops_per_token(model)
    return out


def core_run(table, init: str, args, workers: int, device: str) -> dict:
    import ray

    from kard_ray.config import StudentConfig
    from kard_ray.training.core import train
    from kard_ray.training.student import seq2seq_task

    work = common.work_dir(args, "train")
    out = os.path.join(work, f"out_w{workers}")
    cfg = StudentConfig(num_workers=workers, cpus_per_worker=1.0, use_gpu=device == "cuda", batch_size=args.batch_size,
                        lr=args.lr, max_steps=args.warmup + args.steps + 1, log_every_steps=10**6,
                        checkpoint_every_steps=0, max_failures=0, epochs=1)
    clock = StepClock(seq2seq_task(init))
    ds = ray.data.from_arrow(table)
    t0 = time.perf_counter()
    result = train(clock.task(), ds, cfg, out, os.path.join(work, "ckpt"), f"bench_w{workers}",
                   {"init_model": init}, resume=False, shuffle=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, CLOCK_FILE)) as fh:
        c = json.load(fh)
    res = steady(c["marks"], c["cpu"], c["tokens"], args.warmup, args.batch_size)
    # fit() wall minus the loop's own time: worker start-up, dataset setup, export, shutdown
    res["fit_overhead_s"] = wall - (c["marks"][-1] - c["marks"][0]) if c["marks"] else wall
    res["core_reported_samples_per_s"] = result["samples_per_s"]
    shutil.rmtree(os.path.join(work, "ckpt"), ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-source", type=int, default=256)
    p.add_argument("--max-target", type=int, default=128)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workers", default="1,0", help="core runs: 1 = one Ray Train worker, 0 = in-process")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.max_source, args.max_target = 3, 1, 4, 64, 32
        args.workers = "0"
    repeats = args.repeats or (1 if args.smoke else 3)
    workers = [int(w) for w in args.workers.split(",")]
    data = common.data_dir(args.data, (common.PASSAGES_FILE, common.RATIONALES_FILE, "train.jsonl", "test.jsonl"))
    rep = common.Report("train", args)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # StepClock reaches the worker by value
    common.set_threads(1)
    need = (args.warmup + args.steps + 1) * args.batch_size
    table, init = build_examples(args, data, need)
    n_src = sum(len(x) for x in table.column("input_ids").to_pylist())
    n_tgt = sum(len(x) for x in table.column("labels").to_pylist())
    rep.fig("examples (rows)", table.num_rows)
    rep.fig("mean source / target tokens", f"{n_src / table.num_rows:.0f} / {n_tgt / table.num_rows:.0f}")
    rep.fig("model", "tiny T5 " + ("d64 L1 (smoke)" if args.smoke else "d128 L2 d_ff 512 (built offline)"))
    rep.fig("batch size / timed steps / warm-up steps", f"{args.batch_size} / {args.steps} / {args.warmup}")
    started = common.ray_init()
    try:
        sides = {"bare": lambda: bare_loop(table, init, args, args.device)}
        for w in workers:
            sides[f"core_w{w}"] = (lambda w=w: core_run(table, init, args, w, args.device))
        runs: dict[str, list[dict]] = {k: [] for k in sides}
        for _ in range(repeats):  # interleaved: a load change hits every side alike
            for k, fn in sides.items():
                runs[k].append(fn())
    finally:
        if started:
            ray.shutdown()
    rep.data["runs"] = runs
    metrics = ("samples_per_s", "tokens_per_s", "s_per_step", "samples_per_s_median_step", "samples_per_cpu_s")
    med = {k: {m: common.median([r[m] for r in v]) for m in metrics} for k, v in runs.items()}
    label = {"bare": "bare PyTorch loop", "core_w1": "core, 1 Ray Train worker", "core_w0": "core, in-process"}
    for k, m in med.items():
        rep.fig(f"{label.get(k, k)}: samples/s", m["samples_per_s"], "samples/s")
        rep.fig(f"{label.get(k, k)}: tokens/s", m["tokens_per_s"], "tok/s")
        rep.fig(f"{label.get(k, k)}: samples/s by median step", m["samples_per_s_median_step"], "samples/s")
        rep.fig(f"{label.get(k, k)}: samples per CPU-second", m["samples_per_cpu_s"], "samples/cpu-s")
    for k, v in runs.items():
        if "fit_overhead_s" in v[0]:
            rep.fig(f"{label.get(k, k)}: fit() start-up + teardown (median)",
                    common.median([r["fit_overhead_s"] for r in v]), "s")
    if args.device == "cuda":
        from kard_ray.training.progress import peak_flops

        import torch

        peak = peak_flops(torch.device("cuda"))
        fpt = runs["bare"][0]["flops_per_token"]
        for k, m in med.items():
            rep.fig(f"{label.get(k, k)}: MFU", fpt * m["tokens_per_s"] / peak if peak else float("nan"))
    else:
        rep.fig("MFU", "n/a on CPU (reported with --device cuda)")
    main_side = "core_w1" if "core_w1" in med else f"core_w{workers[0]}"
    # median over rounds of each round's own ratio (the sides of a round ran back to back)
    ratio = common.median([c["samples_per_s"] / b["samples_per_s"] for c, b in zip(runs[main_side], runs["bare"])])
    rep.fig(f"{label.get(main_side, main_side)} / bare: samples/s ratio (median of paired rounds)", ratio)
    extra = {f"{label.get(k, k)} / bare": round(med[k]["samples_per_s"] / med["bare"]["samples_per_s"], 3)
             for k in med if k != "bare"}
    for m, name in (("samples_per_s_median_step", "by median step"), ("samples_per_cpu_s", "per CPU-second")):
        extra[f"{label.get(main_side, main_side)} / bare, {name}"] = round(med[main_side][m] / med["bare"][m], 3)
    if main_side != "core_w1":
        rep.note(f"smoke/partial run: the ratio is the {label.get(main_side, main_side)} one")
    rep.finish(ratio, target=0.85, ratio_label=f"{label.get(main_side, main_side)} / bare PyTorch loop, samples/s",
               extra_ratios=extra)
    return rep.data


if __name__ == "__main__":
    main()
