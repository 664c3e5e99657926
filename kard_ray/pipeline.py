"""The stage graph: questions → knowledge → teacher → examples → reranker → student → evaluate.

Each stage is a function of (config, run directory) that reads earlier stages' artifacts and writes
its own. `<run>/manifest.json` records, per stage, its status, a fingerprint (a hash of the config
sections and input files it depends on, chained through the stages it reads), row counts and timings.
On rerun a stage whose fingerprint is unchanged and whose status is `done` is skipped, so changing
`student.lr` reruns the student and evaluation and nothing before them. A failing stage is marked
`failed` and leaves every earlier artifact intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from typing import Callable

from kard_ray import io
from kard_ray.config import KardConfig

STAGES = ["questions", "knowledge", "teacher", "examples", "reranker", "student", "evaluate"]

# Config sections each stage reads (beyond what it inherits from the stages it depends on).
DEPENDS_ON: dict[str, tuple[list[str], list[str]]] = {
    #  stage        upstream stages                          config sections
    "questions": ([], ["data"]),
    "knowledge": (["questions"], ["knowledge"]),
    "teacher": (["questions"], ["teacher"]),
    "examples": (["knowledge", "teacher"], ["student.n_knowledge", "student.max_rationales_per_question",
                                            "student.max_source_length", "student.max_target_length", "methods"]),
    "reranker": (["knowledge", "teacher"], ["reranker", "seed"]),
    "student": (["examples"], ["student", "seed"]),
    "evaluate": (["student", "reranker", "knowledge"], ["eval", "methods", "seed"]),
}


def variants(cfg: KardConfig) -> list[str]:
    """Student variants the configured methods need (both KARD methods share one student)."""
    out = []
    for m in cfg.methods:
        v = "kard" if m.startswith("kard") else m
        if v not in out:
            out.append(v)
    return out


def _file_stamp(path: str | None) -> list:
    """Size and mtime of input files, so a changed input file invalidates the stage that read it."""
    if not path:
        return []
    try:
        files = io.list_files(path)
    except FileNotFoundError:
        return [path, "missing"]
    stamps = []
    for f in files[:1000]:
        fs, p = io.resolve(f)
        info = fs.get_file_info(p)
        stamps.append([f, info.size, info.mtime_ns])
    return stamps


def _inputs(cfg: KardConfig, stage: str) -> list:
    if stage == "questions":
        return [_file_stamp(cfg.data.train_path), _file_stamp(cfg.data.test_path)]
    if stage == "knowledge":
        return [_file_stamp(p) for p in cfg.knowledge.corpus_paths]
    if stage == "teacher":
        return [_file_stamp(cfg.teacher.import_path), _file_stamp(cfg.teacher.few_shot_path)]
    return []


def fingerprints(cfg: KardConfig) -> dict[str, str]:
    fps: dict[str, str] = {}
    for stage in STAGES:
        upstream, sections = DEPENDS_ON[stage]
        blob = json.dumps({"up": [fps[u] for u in upstream], "cfg": cfg.section_hash(*sections),
                           "inputs": _inputs(cfg, stage)}, sort_keys=True, default=str)
        fps[stage] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return fps


def stage_needed(cfg: KardConfig, stage: str) -> bool:
    if stage == "reranker":
        return "kard_reranker" in cfg.methods
    return True


# ----------------------------------------------------------------------------------------------
# stage bodies: thin calls into the library


def _stage_questions(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.data.stage import prepare_questions

    return prepare_questions(cfg, run)


def _corpus_paths(cfg: KardConfig, run: io.RunDir) -> list[str]:
    if cfg.knowledge.corpus_paths:
        return list(cfg.knowledge.corpus_paths)
    if cfg.data.dataset == "synthetic":
        from kard_ray.data.stage import synthetic_inputs

        return [synthetic_inputs(run)["corpus"]]
    raise ValueError("knowledge.corpus_paths is empty: name the corpus files (JSONL/parquet) to index")


def _stage_knowledge(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.knowledge import build_indexes, ingest_corpus

    counts = ingest_corpus(_corpus_paths(cfg, run), run, cfg.knowledge, cfg.data.max_rejected_fraction)
    counts.update(build_indexes(run, cfg.knowledge))
    return counts


def _stage_teacher(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.teacher import generate_rationales

    return generate_rationales(cfg, run)


def _stage_examples(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.training.student import build_student_examples

    counts = {}
    for v in variants(cfg):
        path = build_student_examples(cfg, run, v)
        counts[f"examples_{v}"] = io.read_table(path, columns=["question_id"]).num_rows
    return counts


def tiny_model_texts(run: io.RunDir, limit: int = 200_000) -> list[str]:
    """The run's own text (passages, questions, rationales) for a tiny model's tokenizer."""
    from kard_ray.knowledge import format_passage

    texts: list[str] = []
    p = io.read_table(run.passages, columns=["title", "text"])
    texts += [format_passage(t, x) for t, x in zip(p.column("title").to_pylist()[:limit], p.column("text").to_pylist()[:limit])]
    for split in ("train", "test"):
        if io.exists(run.questions(split)):
            q = io.read_table(run.questions(split))
            texts += [f"{a} {' '.join(o)}" for a, o in zip(q.column("question").to_pylist(), q.column("options").to_pylist())]
    if io.exists(run.rationales):
        texts += io.read_table(run.rationales, columns=["text"]).column("text").to_pylist()[:limit]
    return texts


def resolve_model(name: str, tiny_cfg, run: io.RunDir, kind: str, seed: int) -> str:
    """A HF name/path as given, or for `tiny` a model built from scratch into the run directory."""
    if name != "tiny":
        return name
    from kard_ray.models import save_tiny_model

    out = run.model(f"init_{kind}")
    if not io.exists(io.join(out, "config.json")):
        if io.is_uri(out):
            raise ValueError("model=tiny needs a local run_dir (tiny models are a demo feature)")
        save_tiny_model(kind, tiny_model_texts(run), tiny_cfg, out, seed=seed)
    return out


def _stage_reranker(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.training.reranker import train_reranker

    init = resolve_model(cfg.reranker.model, cfg.reranker.tiny, run, "bert", cfg.seed)
    return train_reranker(cfg, run, init)


def _stage_student(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.training.student import train_student

    init = resolve_model(cfg.student.model, cfg.student.tiny, run, "t5", cfg.seed)
    out = {}
    for v in variants(cfg):
        print(f"[student] training variant {v}", flush=True)
        r = train_student(cfg, run, v, init)
        out[v] = {k: r[k] for k in ("steps", "final_loss", "samples_per_s", "train_time_s") if k in r}
    return out


def _stage_evaluate(cfg: KardConfig, run: io.RunDir) -> dict:
    from kard_ray.evaluation import evaluate

    metrics = evaluate(cfg, run)
    return {m: round(v["accuracy"], 4) for m, v in metrics["methods"].items()}


STAGE_FNS: dict[str, Callable[[KardConfig, io.RunDir], dict]] = {
    "questions": _stage_questions, "knowledge": _stage_knowledge, "teacher": _stage_teacher,
    "examples": _stage_examples, "reranker": _stage_reranker, "student": _stage_student, "evaluate": _stage_evaluate,
}


# ----------------------------------------------------------------------------------------------
# the runner


def load_manifest(run: io.RunDir) -> dict:
    if io.exists(run.manifest):
        return io.read_json(run.manifest)
    return {"stages": {}}


def run(cfg: KardConfig, from_stage: str | None = None, only: list[str] | None = None) -> dict:
    """Run the pipeline; returns the manifest. Finished, unchanged stages are skipped."""
    for s in [from_stage, *(only or [])]:
        if s is not None and s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; stages are {STAGES}")
    from kard_ray.config import resolve_local_paths
    from kard_ray.runtime import init_ray

    cfg = resolve_local_paths(cfg)  # Ray Train workers run in another directory
    init_ray(cfg)
    run_dir = io.RunDir(cfg.run_dir)
    io.makedirs(run_dir.root)
    io.write_bytes(run_dir.config, cfg.to_yaml().encode())
    manifest = load_manifest(run_dir)
    manifest["config_hash"] = cfg.section_hash(*[f.name for f in cfg.__dataclass_fields__.values()])
    fps = fingerprints(cfg)
    forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    t_start = time.time()
    print(f"[pipeline] run directory {run_dir.root}", flush=True)
    for stage in STAGES:
        entry = manifest["stages"].get(stage, {})
        if only is not None and stage not in only:
            continue
        if not stage_needed(cfg, stage):
            print(f"[pipeline] {stage:10s} not needed by methods {cfg.methods}", flush=True)
            continue
        explicit = stage in forced or (only is not None and stage in only)
        if not explicit and entry.get("status") == "done" and entry.get("fingerprint") == fps[stage]:
            print(f"[pipeline] {stage:10s} skipped (finished, inputs and config unchanged)", flush=True)
            continue
        print(f"[pipeline] {stage:10s} running ...", flush=True)
        t0 = time.time()
        manifest["stages"][stage] = {"status": "running", "fingerprint": fps[stage], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        io.write_json(run_dir.manifest, manifest)
        try:
            counts = STAGE_FNS[stage](cfg, run_dir)
        except BaseException as e:
            manifest["stages"][stage].update(status="failed", seconds=round(time.time() - t0, 1),
                                             error=f"{type(e).__name__}: {e}",
                                             traceback=traceback.format_exc(limit=20)[-4000:])
            io.write_json(run_dir.manifest, manifest)
            print(f"[pipeline] {stage:10s} FAILED after {time.time() - t0:.1f}s: {type(e).__name__}: {e}", flush=True)
            raise
        manifest["stages"][stage].update(status="done", seconds=round(time.time() - t0, 1), counts=counts,
                                         finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        io.write_json(run_dir.manifest, manifest)
        print(f"[pipeline] {stage:10s} done in {time.time() - t0:.1f}s {json.dumps(counts, default=str)[:300]}", flush=True)
    print(f"[pipeline] finished in {time.time() - t_start:.1f}s", flush=True)
    if os.environ.get("KARD_PRINT_RESULTS", "1") == "1" and io.exists(run_dir.path("eval", "results.md")):
        print(io.read_bytes(run_dir.path("eval", "results.md")).decode(), flush=True)
    return manifest
