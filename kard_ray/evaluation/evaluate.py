"""Batch evaluation on Ray Data: the method's passages → student.generate → parse → metrics.

Which student and which passages each method uses is the method table (`kard_ray.methods`); the
passages come from `kard_ray.inference.passages.passages_for` and the answers from
`kard_ray.inference.generator.StudentGenerator`, the same objects Serve runs. Each method writes `<run>/eval/predictions/<method>/` (parquet); then `metrics.json`, `results.md` and
`accuracy.png` summarise all methods side by side.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa

from kard_ray import io
from kard_ray.config import KardConfig
from kard_ray.data.stage import test_rationales_path
from kard_ray.inference.formats import question_query
from kard_ray.inference.generator import (PREDICTION_COLUMNS, StudentGenerator, prediction_columns,
                                          resolve_max_new_tokens)
from kard_ray.inference.passages import batch_passages, passages_for
from kard_ray.methods import METHODS
from kard_ray.console import count, say


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for an accuracy (better than normal at small n or near 0/1)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always holds p: at p = 1 (or 0) rounding put the bound a hair inside it (0.9999999999999999),
    # which made the chart's error bar negative and failed the evaluation stage of a run that scored 100%
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


class PredictBatch:
    """Ray Data actor: holds one student (loaded once) and predicts a batch of questions."""

    def __init__(self, model_dir: str, method: str, dataset: str, eval_cfg: dict, max_source_length: int, seed: int,
                 total: int = 0):
        self.method, self.total = method, total
        self.generator = StudentGenerator(
            model_dir, dataset, max_new_tokens=eval_cfg["max_new_tokens"], decoding=eval_cfg["decoding"],
            n_votes=eval_cfg["n_votes"], temperature=eval_cfg["temperature"], max_source_length=max_source_length,
            score_by=eval_cfg["score_by"], seed=seed, variant=METHODS[method].variant)

    def __call__(self, batch: dict) -> dict:
        n, started = len(batch["id"]), time.time()
        passages, ids = batch_passages(batch)
        options = [list(o) for o in batch["options"]]
        preds = self.generator.predict(list(batch["question"]), options, passages)
        count(f"evaluate {self.method}", n, self.total, "questions", started)
        return {"question_id": list(batch["id"]), "passage_ids": ids, "answer": [int(a) for a in batch["answer"]],
                **prediction_columns(preds)}


PREDICTION_TABLE = ("question_id", "method", "retrieval", "passage_ids", *PREDICTION_COLUMNS, "answer", "correct")


def method_columns(table: pa.Table, method: str) -> pa.Table:
    """What every engine's prediction rows get last: the method, its retrieval, and whether each is correct."""
    import pyarrow.compute as pc

    n = table.num_rows
    table = table.append_column("method", pa.array([method] * n, pa.string()))
    table = table.append_column("retrieval", pa.array([METHODS[method].retrieval] * n, pa.string()))
    table = table.append_column("correct", pc.equal(table["pred_index"], table["answer"]))
    return table.select(list(PREDICTION_TABLE))


def _test_dataset(cfg: KardConfig, run: io.RunDir, method: str):
    import ray

    table = io.read_table(run.questions("test"))
    queries = [question_query(q, o) for q, o in zip(table.column("question").to_pylist(), table.column("options").to_pylist())]
    table = table.append_column("query", pa.array(queries, pa.string()))
    if method == "kard_oracle":
        from kard_ray.teacher import load_teacher_rationales

        rationales = load_teacher_rationales(test_rationales_path(cfg, run))
        keep = [qid in rationales for qid in table.column("id").to_pylist()]
        table = table.filter(pa.array(keep))
        table = table.append_column("oracle_query", pa.array([rationales[q][0] for q in table.column("id").to_pylist()]))
    return ray.data.from_arrow(table)


def predict_method(cfg: KardConfig, run: io.RunDir, method: str) -> str:
    """Run one method's batch inference; returns its predictions directory."""
    questions = _test_dataset(cfg, run, method)
    total = questions.count()
    ds = passages_for(questions, method, cfg, run)
    out = run.path("eval", "predictions", method)
    if io.exists(out):
        io.remove(out)
    ds = student_predictions(ds, run.model(METHODS[method].student), method, cfg, total)
    ds.write_parquet(io.resolve(out)[1] if not io.is_uri(out) else out)
    return out


def student_predictions(ds, model_dir: str, method: str, cfg: KardConfig, total: int = 0):
    """Questions (with the method's passages) → prediction rows, on `eval.engine`: HF `generate` on an
    actor pool, or vLLM through Ray Data's LLM processor; both read answers with the same code."""
    import ray

    eval_cfg = cfg.to_dict()["eval"]
    if cfg.eval.engine == "vllm":
        from kard_ray.inference.vllm_engine import vllm_predictions

        ds = vllm_predictions(ds, model_dir, cfg.data.dataset, eval_cfg, cfg.student.max_source_length, cfg.seed)
    else:
        ds = ds.map_batches(
            PredictBatch,
            fn_constructor_kwargs=dict(model_dir=model_dir, method=method, dataset=cfg.data.dataset, eval_cfg=eval_cfg,
                                       max_source_length=cfg.student.max_source_length, seed=cfg.seed, total=total),
            compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),
            batch_size=cfg.eval.batch_size, num_cpus=cfg.eval.num_cpus_per_actor, num_gpus=cfg.eval.num_gpus_per_actor,
            batch_format="numpy")
    return ds.map_batches(method_columns, fn_kwargs={"method": method}, batch_format="pyarrow", num_cpus=0.25)


TRUNCATED_WARN_SHARE = 0.05


def method_metrics(predictions: pa.Table) -> dict:
    """Accuracy under eval.score_by, plus what tells a reader whether to trust it: the accuracy of the
    answer the generation states (`parsed_accuracy`), how many generations state none (`unreadable`)
    and how many hit max_new_tokens (`truncated`)."""
    n = predictions.num_rows
    col = lambda name: predictions.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    correct = int(np.sum(col("correct")))
    lo, hi = wilson_interval(correct, n)
    letter, text, parsed, answer = col("pred_letter_index"), col("pred_text_index"), col("parsed_index"), col("answer")
    both = (letter >= 0) & (text >= 0)
    return {
        "n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": [lo, hi],
        "answered": int(np.sum(col("pred_index") >= 0)),
        "parsed_accuracy": float(np.mean(parsed == answer)) if n else 0.0,
        "unreadable": int(np.sum(parsed < 0)), "truncated": int(np.sum(col("truncated"))),
        "letter_parsed": int(np.sum(letter >= 0)), "text_parsed": int(np.sum(text >= 0)),
        "letter_text_disagree": int(np.sum(both & (letter != text))),
    }


def truncation_warning(method: str, m: dict, max_new_tokens: int) -> str | None:
    """The console warning when more than 5% of a method's generations hit the token limit."""
    if not m["n"] or m["truncated"] / m["n"] <= TRUNCATED_WARN_SHARE:
        return None
    return (f"[evaluate] WARNING {method}: {m['truncated']}/{m['n']} generations hit eval.max_new_tokens="
            f"{max_new_tokens} before their end (truncated; {m['unreadable']} state no answer). Raise "
            f"eval.max_new_tokens, or set it to null to use what the training targets need.")


def methods_to_evaluate(cfg: KardConfig, run: io.RunDir) -> list[str]:
    methods = list(cfg.methods)
    if cfg.eval.oracle and any(METHODS[m].variant == "kard" for m in methods) and test_rationales_path(cfg, run):
        methods.append("kard_oracle")
    return methods


def evaluate(cfg: KardConfig, run: io.RunDir) -> dict:
    """The evaluation stage: every method's predictions, then metrics.json, results.md, accuracy.png."""
    metrics = {"score_by": cfg.eval.score_by, "decoding": cfg.eval.decoding, "methods": {}}
    for method in methods_to_evaluate(cfg, run):
        t0 = time.time()
        out = predict_method(cfg, run, method)
        m = method_metrics(io.read_table(out))
        m["retrieval"] = METHODS[method].retrieval
        m["seconds"] = round(time.time() - t0, 1)
        m["max_new_tokens"] = resolve_max_new_tokens(run.model(METHODS[method].student), cfg.eval.max_new_tokens)
        metrics["methods"][method] = m
        say(f"[evaluate] {method:14s} accuracy {m['accuracy']:.3f} "
            f"(95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}, n={m['n']}; parsed {m['parsed_accuracy']:.3f}, "
            f"unreadable {m['unreadable']}, truncated {m['truncated']}) in {m['seconds']}s")
        warning = truncation_warning(method, m, m["max_new_tokens"])
        if warning:
            say(warning)
    io.write_json(run.path("eval", "metrics.json"), metrics)
    table = results_table(metrics, cfg)
    io.write_bytes(run.path("eval", "results.md"), table.encode())
    io.write_bytes(run.path("eval", "accuracy.png"), bar_chart(metrics))
    return metrics


def results_table(metrics: dict, cfg: KardConfig) -> str:
    lines = [f"# Results ({cfg.data.dataset}, test split, scored by {metrics['score_by']}, {metrics['decoding']} decoding)", "",
             "| method | retrieval | accuracy | 95% CI | parsed answer | n | answered | unreadable | truncated | letter≠text |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in metrics["methods"].items():
        lines.append(f"| {name} | {m['retrieval']} | {100 * m['accuracy']:.1f} | {100 * m['ci95'][0]:.1f}–{100 * m['ci95'][1]:.1f}"
                     f" | {100 * m['parsed_accuracy']:.1f} | {m['n']} | {m['answered']} | {m['unreadable']}"
                     f" | {m['truncated']} (limit {m['max_new_tokens']}) | {m['letter_text_disagree']} |")
    return "\n".join(lines) + "\n"


def bar_chart(metrics: dict) -> bytes:
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["methods"])
    acc = [100 * metrics["methods"][n]["accuracy"] for n in names]
    err = [[100 * (metrics["methods"][n]["accuracy"] - metrics["methods"][n]["ci95"][0]) for n in names],
           [100 * (metrics["methods"][n]["ci95"][1] - metrics["methods"][n]["accuracy"]) for n in names]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    ax.bar(names, acc, yerr=err, capsize=4, color=["#999999" if not n.startswith("kard") else "#3572a5" for n in names])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("KARD vs baselines (95% CI)")
    for i, a in enumerate(acc):
        ax.text(i, a + 2, f"{a:.1f}", ha="center")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
