"""A rerun retrains exactly what changed, through the real CLI on real Ray Train workers (checkpoints on
disk, one worker each): a reranker ablation, a new learning rate and a new `n_knowledge` give new weights whose
train summary names the config that produced them; nothing changed skips; a changed tiny-model setting
rebuilds the init model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kard_ray import io

REPO = Path(__file__).resolve().parents[1]
TINY = ["methods=[kard_bm25,kard_reranker]", "data.synthetic.n_train_entities=12", "data.synthetic.n_test_entities=3",
        "student.max_steps=4", "student.batch_size=8", "student.checkpoint_every_steps=2", "student.num_workers=1",
        "student.cpus_per_worker=1", "student.tiny.d_model=32", "student.tiny.n_heads=2", "student.tiny.d_ff=64",
        "student.tiny.vocab_size=600", "reranker.max_steps=4", "reranker.num_workers=1", "reranker.cpus_per_worker=1",
        "reranker.checkpoint_every_steps=2", "reranker.tiny.d_model=32", "reranker.tiny.vocab_size=600",
        "reranker.tiny.d_ff=64", "eval.max_new_tokens=8", "eval.oracle=false"]


def weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def differ(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)


def distill(run_dir: str, *argv: str) -> None:
    from kard_ray import cli

    assert cli.main(["distill", "--config", str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", *TINY, *argv]) == 0


@pytest.mark.timeout(1800)
def test_a_rerun_retrains_what_changed_and_only_that(ray_session, tmp_path, capsys, monkeypatch):
    # A *relative* run_dir, as the demo's default `runs/demo` is: the retrained models' Ray Train workers
    # run in other directories and must still find the run's files.
    monkeypatch.chdir(tmp_path)
    run = io.RunDir("run")
    distill(run.root)
    reranker0, student0 = weights(run.model("reranker")), weights(run.model("student_kard"))
    capsys.readouterr()

    # nothing changed: every stage skipped, the models untouched
    distill(run.root)
    out = capsys.readouterr().out
    assert out.count(" skipped (finished") == 8, out
    assert not differ(weights(run.model("reranker")), reranker0)

    # a student setting changed, no --only: the student and evaluation run again, nothing before them
    distill(run.root, "student.lr=2e-3")
    out = capsys.readouterr().out
    for stage in ("questions", "knowledge", "teacher", "examples", "mine", "reranker"):
        assert f"{stage:10s} skipped" in out, out
    for stage in ("student", "evaluate"):
        assert f"{stage:10s} done" in out, out
    assert "[student_kard] config changed (" in out and "train.lr 0.0015 -> 0.002" in out, out
    assert differ(weights(run.model("student_kard")), student0)

    # an ablation of the reranker's loss retrains it (the old final checkpoint is not exported again)
    distill(run.root, "--only", "reranker", "reranker.loss=ce")
    out = capsys.readouterr().out
    assert '[reranker] config changed (train.loss kl -> ce)' in out, out
    assert differ(weights(run.model("reranker")), reranker0)
    assert io.read_json(io.join(run.model("reranker"), "kard_reranker.json"))["loss"] == "ce"
    summary = io.read_json(io.join(run.model("reranker"), "train_summary.json"))
    assert summary["config"]["train.loss"] == "ce" and summary["steps"] == 4
    assert any(p.name.startswith("reranker.stale-") for p in Path(run.checkpoints).iterdir())

    # more knowledge per example: new examples (content digest), a new student
    distill(run.root, "--only", "examples", "student", "student.n_knowledge=2")
    out = capsys.readouterr().out
    assert "[student_kard] config changed (" in out and "train.n_knowledge 1 -> 2" in out, out
    summary = io.read_json(io.join(run.model("student_kard"), "train_summary.json"))
    assert summary["config"]["train.n_knowledge"] == 2 and summary["config"]["seed"] == 0
    assert differ(weights(run.model("student_kard")), student0)
    examples = io.read_table(run.examples("student_kard")).to_pylist()
    assert all(e["source"].count("\t") >= 1 for e in examples[:20])  # two passages joined by a tab


def test_changed_tiny_settings_rebuild_the_init_model(ray_session, tmp_path):
    from kard_ray.config import TinyModelConfig
    from kard_ray.data import schemas
    from kard_ray.models import load_tokenizer
    from kard_ray.pipeline import resolve_model

    import pyarrow as pa

    run = io.RunDir(str(tmp_path / "run"))
    words = [f"town{i} exports salt{i} and tin{i} to port{i}" for i in range(300)]
    io.write_table(pa.Table.from_pylist([{"id": str(i), "title": f"T{i}", "text": w} for i, w in enumerate(words)],
                                        schema=schemas.PASSAGES), io.join(run.passages, "part-0.parquet"))
    small = TinyModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=300)
    path = resolve_model("tiny", small, run, "t5", 0)
    assert len(load_tokenizer(path)) <= 300
    first = json.loads((Path(path) / "config.json").read_text())
    assert resolve_model("tiny", small, run, "t5", 0) == path  # unchanged: reused
    assert json.loads((Path(path) / "config.json").read_text()) == first
    bigger = TinyModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=500)
    resolve_model("tiny", bigger, run, "t5", 0)
    assert 300 < len(load_tokenizer(path)) <= 500
    assert json.loads((Path(path) / "config.json").read_text())["vocab_size"] != first["vocab_size"]


def test_changed_prompt_template_rebuilds_the_student_init_model(ray_session, tmp_path):
    """The student's tiny tokenizer is fitted on the prompt template: another template (here MedQA's, whose
    instruction names its domain) is another tokenizer, never the old one reused."""
    from kard_ray.config import TinyModelConfig
    from kard_ray.data import schemas
    from kard_ray.models import load_tokenizer
    from kard_ray.pipeline import resolve_model

    import pyarrow as pa

    run = io.RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist([{"id": str(i), "title": f"T{i}", "text": f"town{i} exports salt{i}"}
                                         for i in range(200)], schema=schemas.PASSAGES),
                   io.join(run.passages, "part-0.parquet"))
    io.write_table(pa.Table.from_pylist([{"id": f"q{i}", "dataset": "x", "split": "train", "answer": 0,
                                          "question": f"What does town{i} export?", "options": [f"salt{i}", "tin"]}
                                         for i in range(200)], schema=schemas.QUESTIONS), run.questions("train"))
    small = TinyModelConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=600)
    path = resolve_model("tiny", small, run, "t5", 0, prompt_dataset="synthetic")
    assert load_tokenizer(path).tokenize(" medical") != ["Ġmedical"]  # the demo's template lacks the word
    assert resolve_model("tiny", small, run, "t5", 0, prompt_dataset="synthetic") == path  # unchanged: reused
    resolve_model("tiny", small, run, "t5", 0, prompt_dataset="medqa")
    assert load_tokenizer(path).tokenize(" medical") == ["Ġmedical"]  # rebuilt on MedQA's instruction
