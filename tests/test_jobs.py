"""Every `jobs/*.py` runs as `python jobs/<job>.py ...` does (runpy, `__main__`, the real argv), on one
tiny run directory, in pipeline order; each stage lands in the manifest, so `distill` afterwards skips
everything the per-stage jobs finished. Overrides stand before and after the flags (CLI ergonomics)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from kard_ray import io

REPO = Path(__file__).resolve().parents[1]

TINY = ["methods=[rd,kard_bm25,kard_reranker]", "data.synthetic.n_train_entities=12", "data.synthetic.n_test_entities=3",
        "student.max_steps=4", "student.batch_size=8", "student.checkpoint_every_steps=0", "student.num_workers=0",
        "student.tiny.d_model=32", "student.tiny.n_heads=2", "student.tiny.d_ff=64", "student.tiny.vocab_size=600",
        "reranker.max_steps=3", "reranker.num_workers=0", "reranker.tiny.d_model=32", "reranker.tiny.vocab_size=600",
        "reranker.tiny.d_ff=64", "eval.max_new_tokens=8", "eval.oracle=false"]


def run_job(job: str, argv: list[str]) -> int:
    """`python jobs/<job>.py *argv` in this process (the session's Ray is joined, not restarted)."""
    old = sys.argv
    sys.argv = [str(REPO / "jobs" / f"{job}.py"), *argv]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(sys.argv[0], run_name="__main__")
        return exit_.value.code
    finally:
        sys.argv = old


@pytest.mark.timeout(600)
def test_each_job_runs_its_stages_through_the_manifest(ray_session, tmp_path, capsys):
    run = io.RunDir(str(tmp_path / "run"))
    args = [f"run_dir={run.root}", "--config", str(REPO / "configs" / "demo.yaml"), *TINY]
    done = []
    for job, stages in [("build_index", ["questions", "knowledge"]), ("generate_rationales", ["teacher"]),
                        ("train_student", ["examples", "student"]), ("train_reranker", ["mine", "reranker"]),
                        ("evaluate", ["evaluate"])]:
        assert run_job(job, args) == 0, job
        manifest = io.read_json(run.manifest)["stages"]
        done += stages
        assert sorted(s for s, e in manifest.items() if e["status"] == "done") == sorted(done), job
    assert io.read_json(run.path("eval", "metrics.json"))["methods"].keys() == {"rd", "kard_bm25", "kard_reranker"}
    capsys.readouterr()
    assert run_job("distill", args) == 0
    out = capsys.readouterr().out
    for stage in done:
        assert f"{stage:10s} skipped" in out, out
    check_status(run)


def check_status(run: io.RunDir) -> None:
    """`kard-ray status` on the finished run, as a path and as a file:// URI, and under a changed config."""
    from contextlib import redirect_stdout
    from io import StringIO

    from kard_ray import cli

    def status(*argv: str) -> dict[str, list[str]]:
        buf = StringIO()
        with redirect_stdout(buf):
            assert cli.main(["status", *argv]) == 0
        text = buf.getvalue()
        assert "| kard_reranker |" in text  # the results table follows
        return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in STAGES}

    for where in (run.root, f"file://{run.root}"):
        rows = status(where)
        assert list(rows) == STAGES and all(r[0] == "done" and r[3] == "current" and r[4] == "" for r in rows.values())
    rows = status(run.root, "student.lr=0.5")
    assert rows["student"][3] == "changed" and rows["student"][4] == "config (student, seed) changed"
    assert rows["evaluate"][4] == "student changed" and rows["reranker"][3] == "current"


STAGES = ["questions", "knowledge", "teacher", "examples", "mine", "reranker", "student", "evaluate"]


def test_cli_overrides_anywhere_and_stage_names_checked(capsys):
    from kard_ray import cli
    from kard_ray.config import ConfigError
    from kard_ray.pipeline import check_stage_names

    args, overrides = cli.split_overrides(["--only", "reranker", "reranker.loss=ce", "student", "seed=3",
                                           "--config", "configs/a=b.yaml"])
    assert args == ["--only", "reranker", "student", "--config", "configs/a=b.yaml"]
    assert overrides == ["reranker.loss=ce", "seed=3"]
    assert cli.main(["config", "seed=5", "--config", str(REPO / "configs" / "demo.yaml"), "student.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "lr: 0.01" in out
    with pytest.raises(ConfigError, match=r"unknown stage 'rerankr'; did you mean 'reranker'\?"):
        check_stage_names(["rerankr"], "--only")
    assert cli.main(["distill", "--only", "rerankr", "reranker.loss=ce"]) == 2
    assert "did you mean 'reranker'" in capsys.readouterr().err
