"""Smoke tests of the benchmarks (bench/): every script starts, runs its tiny `--smoke` version and ends
with a well-formed `RATIO <name> <value>` line; its JSON feeds bench/report.py.

These are not timed tests: nothing here checks a ratio's value (CI machines are shared and loaded).
The scripts run in this process, one after another, on the session's Ray instance and one shared
work directory (inputs are built once), so the whole file costs one Ray start-up, not five.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RATIO_LINE = re.compile(r"^RATIO (bm25|embed|train|generate|serve) (-?\d+(\.\d+)?|nan|inf)$")


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_bm25
        import bench_embed
        import bench_generate
        import bench_serve
        import bench_train
        import report

        yield {"bm25": bench_bm25, "embed": bench_embed, "train": bench_train, "generate": bench_generate,
               "serve": bench_serve, "report": report}
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_work"), tmp_path_factory.mktemp("bench_results")


def _run_smoke(mod, name: str, shared_data: Path, bench_dirs, capsys) -> dict:
    work, results = bench_dirs
    out = results / f"{name}.json"
    data = mod.main(["--smoke", "--data", str(shared_data), "--work", str(work), "--out", str(out)])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    assert lines, f"bench_{name}.py printed nothing"
    m = RATIO_LINE.match(lines[-1])
    assert m, f"bench_{name}.py: last line is not 'RATIO {name} <value>': {lines[-1]!r}"
    assert m.group(1) == name
    saved = json.loads(out.read_text())
    assert saved["name"] == name and saved["smoke"] is True
    assert math.isclose(float(m.group(2)), saved["ratio"], rel_tol=1e-3, abs_tol=1e-4)
    assert saved["figures"], "no figures recorded"
    return data


@pytest.mark.timeout(300)
def test_bm25_smoke(bench_modules, shared_data, bench_dirs, capsys):
    data = _run_smoke(bench_modules["bm25"], "bm25", shared_data, bench_dirs, capsys)
    # both sides ranked the same passages for the same queries (same tokens, BM25 both ways)
    assert data["figures"]["top-1 agreement"] >= 0.6


@pytest.mark.timeout(600)
def test_embed_smoke(bench_modules, ray_session, shared_data, bench_dirs, capsys):
    data = _run_smoke(bench_modules["embed"], "embed", shared_data, bench_dirs, capsys)
    assert data["figures"]["tiny: max |ray - baseline| over vectors"] <= 1e-4


@pytest.mark.timeout(600)
def test_train_smoke(bench_modules, ray_session, shared_data, bench_dirs, capsys):
    data = _run_smoke(bench_modules["train"], "train", shared_data, bench_dirs, capsys)
    for side in data["runs"].values():
        assert side[0]["steps"] >= 1 and side[0]["samples_per_s"] > 0


@pytest.mark.timeout(600)
def test_generate_smoke(bench_modules, ray_session, shared_data, bench_dirs, capsys):
    data = _run_smoke(bench_modules["generate"], "generate", shared_data, bench_dirs, capsys)
    same, total = data["figures"]["identical generations (Ray stage vs baseline)"].split("/")
    assert same == total  # greedy, same model, same passage: the stage and the loop agree


@pytest.mark.timeout(600)
def test_serve_smoke(bench_modules, ray_session, shared_data, bench_dirs, capsys):
    data = _run_smoke(bench_modules["serve"], "serve", shared_data, bench_dirs, capsys)
    same, total = data["figures"]["identical answers Serve vs in-process (first run)"].split("/")
    assert same == total
    assert set(data["series"]) == {1, 4}


@pytest.mark.timeout(120)
def test_report_renders_results(bench_modules, bench_dirs, tmp_path):
    """RESULTS.md from whatever smoke results this module produced (run after the scripts)."""
    _, results = bench_dirs
    if not list(results.glob("*.json")):
        pytest.skip("no smoke results (the smoke tests were deselected)")
    out = tmp_path / "RESULTS.md"
    bench_modules["report"].main(["--results", str(results), "--out", str(out), "--command", "pytest"])
    text = out.read_text()
    assert "Smoke run" in text and "## Machine" in text and "## Summary" in text
    assert "not run: no GPU lent to this task" in text
    for f in results.glob("*.json"):
        assert f"RATIO {f.stem}" in text


@pytest.mark.timeout(120)
def test_script_entry_points(shared_data, tmp_path):
    """The files run as scripts: `--help` everywhere; a missing data directory is a one-line error."""
    for script in sorted(BENCH.glob("bench_*.py")):
        r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "--smoke" in r.stdout, f"{script.name} --help: {r.stderr[-500:]}"
    missing = tmp_path / "nowhere"
    r = subprocess.run([sys.executable, str(BENCH / "bench_bm25.py"), "--smoke", "--data", str(missing)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "benchmark data not found" in r.stderr and str(missing) in r.stderr and "Traceback" not in r.stderr
