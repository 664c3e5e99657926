"""The inference-side rows of `bench/gpu_check.sh`: faiss-gpu search, embedding throughput, a student
generation batch, and eval.engine vllm against hf on a decoder-only student (answers and questions/s). Each check returns one table row (check, result, detail, throughput, MFU, wall) and
never raises: an error becomes an ERROR row, so the table always has every line.

    rows += extra_checks(tmp, student_dir=os.path.join(tmp, "ddp"), task=task)   (inside gpu_check.sh)

Also runnable on its own on a GPU machine: `python bench/gpu_extra.py`.
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np

Row = tuple[str, str, str, str, str, str]


def _row(label: str, t0: float, fn) -> Row:
    try:
        result, detail, throughput = fn()
    except Exception as e:  # keep going: one table with every check
        traceback.print_exc()
        result, detail, throughput = "ERROR", repr(e)[:60], ""
    return (label, result, detail, throughput, "", f"{time.time() - t0:.0f}s")


def faiss_gpu(tmp: str, n: int = 200_000, dim: int = 384, n_queries: int = 2000) -> Row:
    """The project's DenseIndex saved on CPU and loaded with use_gpu_index: it must land on the GPU and
    return the CPU index's neighbours. Throughput: GPU queries/s (k=10) and the CPU figure beside it."""
    t0 = time.time()

    def run():
        from kard_ray.config import DenseConfig
        from kard_ray.knowledge.dense import DenseIndex, _gpu_available

        if not _gpu_available():
            return "SKIP", "faiss-gpu not installed (faiss-cpu)", ""
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[:n_queries] + 0.02 * rng.standard_normal((n_queries, dim), dtype=np.float32)
        cpu = DenseIndex.build([str(i) for i in range(n)], x, DenseConfig(index_type="flat"))
        path = os.path.join(tmp, "faiss_flat")
        cpu.save(path)
        gpu = DenseIndex.load(path, DenseConfig(index_type="flat", use_gpu_index=True))
        on_gpu = type(gpu.index).__name__ != type(cpu.index).__name__  # GpuIndexFlatIP, or replicas over GPUs
        gpu.search(q[:10], 10)  # warm-up
        t = time.perf_counter()
        g_rows, _ = gpu.search(q, 10)
        g_qps = n_queries / (time.perf_counter() - t)
        sub = n_queries // 10
        t = time.perf_counter()
        c_rows, _ = cpu.search(q[:sub], 10)
        c_qps = sub / (time.perf_counter() - t)
        agree = float(np.mean(g_rows[:sub, 0] == c_rows[:, 0]))
        ok = on_gpu and agree >= 0.99 and bool((g_rows[:, 0] == np.arange(n_queries)).mean() > 0.99)
        return ("PASS" if ok else "FAIL", f"{n // 1000}k x {dim}, top-1 = CPU {100 * agree:.0f}%",
                f"{g_qps:.0f} q/s (CPU {c_qps:.0f})")

    return _row("faiss-gpu flat search", t0, run)


def embedding(tmp: str, texts: list[str], batch_size: int = 256, device: str = "cuda", d_model: int = 384,
              n_layers: int = 6) -> Row:
    """A tiny BERT (built offline) on the GPU: in-process passages/s, and the Ray Data stage
    (`embed_passages`, one GPU actor) over the same passages with the same vectors."""
    t0 = time.time()

    def run():
        import pyarrow as pa
        import pyarrow.parquet as pq

        from kard_ray.config import DenseConfig, TinyModelConfig
        from kard_ray.knowledge.dense import Encoder, embed_passages
        from kard_ray.models import save_tiny_model

        import torch

        enc_dir = save_tiny_model("bert", texts, TinyModelConfig(d_model=d_model, n_layers=n_layers, n_heads=6,
                                                                 d_ff=4 * d_model, vocab_size=4000), os.path.join(tmp, "bert"))
        enc = Encoder(enc_dir, "mean", 256, device=device)
        enc.encode(texts[:batch_size], batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        vecs = enc.encode(texts, batch_size)
        local_pps = len(texts) / (time.perf_counter() - t)
        inp = os.path.join(tmp, "embed_in")
        os.makedirs(inp, exist_ok=True)
        ids = [f"p{i}" for i in range(len(texts))]
        pq.write_table(pa.table({"id": ids, "title": [""] * len(texts), "text": texts}), os.path.join(inp, "part-0.parquet"))
        out = os.path.join(tmp, "embed_out")
        cfg = DenseConfig(encoder=enc_dir, batch_size=batch_size, num_actors=1, num_cpus_per_actor=1.0,
                          num_gpus_per_actor=1.0 if device == "cuda" else 0.0)
        embed_passages(inp, out, cfg)  # warm-up (actor start, CUDA context)
        t = time.perf_counter()
        embed_passages(inp, out, cfg)
        ray_pps = len(texts) / (time.perf_counter() - t)
        got = pq.read_table(out)
        ray_vecs = dict(zip(got.column("id").to_pylist(),
                            got.column("embedding").combine_chunks().flatten().to_numpy().reshape(got.num_rows, -1)))
        diff = max(float(np.abs(ray_vecs[i] - v).max()) for i, v in zip(ids, vecs))
        ok = got.num_rows == len(texts) and diff < 1e-3
        return ("PASS" if ok else "FAIL", f"{len(texts)} passages, max diff {diff:.1e}",
                f"{local_pps:.0f} p/s (Ray Data {ray_pps:.0f})")

    return _row(f"embedding (BERT d{d_model} L{n_layers})", t0, run)


def generation(student_dir: str, questions: list[dict], batch_size: int = 64, max_new_tokens: int = 64,
               device: str = "cuda") -> Row:
    """One StudentGenerator batch loop on the GPU (greedy): questions/s; every question gets a generation."""
    t0 = time.time()

    def run():
        import torch

        from kard_ray.inference.generator import StudentGenerator

        gen = StudentGenerator(student_dir, questions[0].get("dataset", "synthetic"), max_new_tokens=max_new_tokens,
                               decoding="greedy", device=device)
        qs = [q["question"] for q in questions]
        opts = [list(q["options"]) for q in questions]
        gen.predict(qs[:batch_size], opts[:batch_size], [None] * batch_size)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        preds = []
        for s in range(0, len(qs), batch_size):
            preds += gen.predict(qs[s:s + batch_size], opts[s:s + batch_size], [None] * len(qs[s:s + batch_size]))
        qps = len(qs) / (time.perf_counter() - t)
        answered = sum(p.pred_index >= 0 for p in preds)
        ok = len(preds) == len(qs) and any(p.generation for p in preds)
        return ("PASS" if ok else "FAIL", f"{len(qs)} q, batch {batch_size}, {answered} answered", f"{qps:.0f} q/s")

    return _row("student generation batch", t0, run)


def vllm_vs_hf(tmp: str, task, n_questions: int = 1024, steps: int = 200) -> Row:
    """eval.engine vllm against hf on a decoder-only student (tiny Llama d512 L4, trained `steps` on the
    GPU): both engines through `student_predictions`, the evaluation stage's code, on the same questions
    (greedy, fp32). Throughput: questions/s end to end (engine start included) for each."""
    t0 = time.time()

    def run():
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return "SKIP", "vllm not installed (pip install -e '.[gpu]')", ""
        import ray

        from kard_ray.config import StudentConfig, TinyModelConfig, load_config
        from kard_ray.data.synthetic import task_texts
        from kard_ray.evaluation.evaluate import student_predictions
        from kard_ray.models import save_tiny_model
        from kard_ray.training.core import train
        from kard_ray.training.student import student_task, tokenize_examples
        from oracle_examples import oracle_examples

        init = save_tiny_model("causal", task_texts(task), TinyModelConfig(d_model=512, n_layers=4, n_heads=8, d_ff=2048,
                               vocab_size=2000), os.path.join(tmp, "causal_init"))
        out = os.path.join(tmp, "causal")
        ds = tokenize_examples(ray.data.from_items(oracle_examples(task, "rd")), init, 192, None).materialize()
        train(student_task(init), ds, StudentConfig(batch_size=32, lr=1e-3, max_steps=steps, num_workers=0, use_gpu=True),
              out, os.path.join(tmp, "causal_ckpt"), "causal", {"init_model": init}, resume=False)
        qs = (task.test_questions * (n_questions // len(task.test_questions) + 1))[:n_questions]
        items = [{"id": f"{q['id']}#{i}", "question": q["question"], "options": q["options"], "answer": q["answer"]}
                 for i, q in enumerate(qs)]
        got, qps = {}, {}
        for engine in ("hf", "vllm"):
            cfg = load_config("configs/demo_causal.yaml", [
                f"eval.engine={engine}", "eval.num_gpus_per_actor=1", "eval.max_new_tokens=64", "eval.batch_size=64",
                "student.max_source_length=192", "eval.vllm_engine_kwargs={dtype: float32, gpu_memory_utilization: 0.4}"])
            t = time.perf_counter()
            rows = student_predictions(ray.data.from_items(items), out, "rd", cfg, len(items)).take_all()
            qps[engine] = len(rows) / (time.perf_counter() - t)
            got[engine] = {r["question_id"]: r for r in rows}
        same = np.mean([got["hf"][i]["pred_index"] == got["vllm"][i]["pred_index"] for i in got["hf"]])
        text = np.mean([got["hf"][i]["generation"] == got["vllm"][i]["generation"] for i in got["hf"]])
        ok = set(got["hf"]) == set(got["vllm"]) and same >= 0.95
        return ("PASS" if ok else "FAIL", f"{len(items)} q: answers {100 * same:.1f}% equal, text {100 * text:.0f}%",
                f"vLLM {qps['vllm']:.0f} q/s, HF {qps['hf']:.0f} q/s")

    return _row("vLLM vs HF (causal)", t0, run)


def extra_checks(tmp: str, student_dir: str, task) -> list[Row]:
    texts = [f"{p['title']} . {p['text']}" for p in task.passages]
    texts = (texts * (8192 // max(len(texts), 1) + 1))[:8192]
    questions = (task.test_questions * (512 // max(len(task.test_questions), 1) + 1))[:512]
    return [faiss_gpu(tmp), embedding(tmp, texts), generation(student_dir, questions), vllm_vs_hf(tmp, task)]


if __name__ == "__main__":
    import sys
    import tempfile

    sys.path.insert(0, "tests")  # the oracle-knowledge examples are a test helper

    import ray
    import torch

    from kard_ray.config import SyntheticConfig, TinyModelConfig
    from kard_ray.data.synthetic import make_task, task_texts
    from kard_ray.models import save_tiny_model

    assert torch.cuda.is_available(), "no CUDA device: this script is for GPU machines"
    ray.init(include_dashboard=False, logging_level="WARNING")
    tmp = tempfile.mkdtemp(prefix="kard_gpu_extra_")
    task = make_task(SyntheticConfig(n_train_entities=240, n_test_entities=10, rationales_per_question=3, seed=1))
    student = save_tiny_model("t5", task_texts(task), TinyModelConfig(d_model=512, n_layers=4, n_heads=8, d_ff=2048,
                              vocab_size=2000), os.path.join(tmp, "init"))
    for row in extra_checks(tmp, student, task):
        print(" | ".join(f"{v:<22}" if i == 0 else f"{v:<10}" for i, v in enumerate(row)))
    ray.shutdown()
