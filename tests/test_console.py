"""The console of a run (kard_ray.console): progress lines, the stderr filter, the workers' relay."""

from __future__ import annotations

import io as _io
import os
import subprocess
import sys
import time
from pathlib import Path

from kard_ray import console

REPO = Path(__file__).resolve().parents[1]


class _Clock:
    def __init__(self, monkeypatch):
        self.t = 1000.0
        monkeypatch.setattr(console.time, "monotonic", lambda: self.t)


def test_progress_lines_are_periodic_off_a_tty_and_the_last_one_always_shows(monkeypatch):
    clock, out = _Clock(monkeypatch), _io.StringIO()
    con = console.Console(stream=out, every_s=60, tty=False)
    for step in range(1, 11):  # a step every 25 s: a line once 60 s and 20% more have passed, and the last
        con.progress("student_kard", f"[student_kard] step {step}/10", final=step == 10, fraction=step / 10)
        clock.t += 25
    assert out.getvalue().splitlines() == [f"[student_kard] step {s}/10" for s in (4, 7, 10)]

    out.truncate(0), out.seek(0)  # a slow stage: a step every 10 minutes still prints at most every 20%
    for step in range(1, 21):
        con.progress("student_rd", f"[student_rd] step {step}/20", final=step == 20, fraction=step / 20)
        clock.t += 600
    assert out.getvalue().splitlines() == [f"[student_rd] step {s}/20" for s in (4, 8, 12, 16, 20)]


def test_progress_updates_one_line_on_a_tty_and_a_message_starts_a_new_one():
    out = _io.StringIO()
    con = console.Console(stream=out, every_s=60, tty=True)
    con.progress("reranker", "[reranker] step 1/3")
    con.progress("reranker", "[reranker] step 2/3")
    con.say("[pipeline] WARNING something")
    con.progress("reranker", "[reranker] step 3/3", final=True)
    assert out.getvalue() == ("\r[reranker] step 1/3\x1b[K\r[reranker] step 2/3\x1b[K\n[pipeline] WARNING something\n"
                              "\r[reranker] step 3/3\x1b[K\n")


def test_count_rate_and_eta_come_from_the_batches_own_times():
    out = _io.StringIO()
    con = console.Console(stream=out, every_s=0, tty=False)
    con.count("evaluate rd", 32, 96, "questions", started=100.0, finished=108.0)   # 4 q/s
    con.count("evaluate rd", 32, 96, "questions", started=108.0, finished=116.0)   # 64 in 16 s
    con.count("evaluate rd", 32, 96, "questions", started=116.0, finished=124.0)
    lines = out.getvalue().splitlines()
    assert lines == ["[evaluate rd] 32/96 questions (33%) | 4.0 questions/s | eta 16s",
                     "[evaluate rd] 64/96 questions (67%) | 4.0 questions/s | eta 8s",
                     "[evaluate rd] 96/96 questions (100%) | 4.0 questions/s | eta 0s"]


_STDERR_SCRIPT = r"""
import logging, os, sys
import ray.data  # its loggers as a run has them
from kard_ray import console
with console.session(sys.argv[1]):
    os.write(2, b"2026-12-02 06:16:14,246\tINFO streaming_executor.py:215 -- Starting execution of Dataset x\n")
    os.write(2, b"[2026-12-02 06:17:01,878 E 11217 11217] core_worker.cc:2465: Actor with class name ...\n")
    os.write(2, b"\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started\n")
    os.write(2, b"(MapWorker(MapBatches(PredictBatch)) pid=123) some worker output\n")
    logging.getLogger("ray.data").warning("Progress bars disabled")
    import warnings; warnings.warn("a library's FutureWarning", FutureWarning)
    sys.stderr.write("a line for the user\n")
    console.say("[pipeline] a line of ours")
    import ray._private.worker as w  # what the cluster pushes to a driver, printed by Ray on stdout
    w.print_to_stdstream({"lines": ["WARNING: 10 PYTHON worker processes"], "pid": "raylet", "is_err": False}, False)
    import deepspeed  # its logger has a stdout handler of its own: "Setting accelerator to CPU" (no GPU here)
    deepspeed.utils.logger.warning("a DeepSpeed warning")
sys.stderr.write("after the session\n")
"""


def test_quiet_console_files_rays_internal_lines_and_keeps_the_rest(tmp_path):
    """A real process: its file descriptor 2 goes through the filter (Ray's C++ core writes there directly)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(console.VERBOSE_ENV, None)
    logs = tmp_path / "logs"
    p = subprocess.run([sys.executable, "-c", _STDERR_SCRIPT, str(logs)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "[pipeline] a line of ours\n"
    assert p.stderr.splitlines() == ["a line for the user", "after the session"], p.stderr
    log = (logs / "driver.log").read_text()
    for kept in ("Starting execution of Dataset x", "core_worker.cc:2465", "8 PYTHON worker processes",
                 "pid=123) some worker output", "Progress bars disabled", "a library's FutureWarning",
                 "(raylet) WARNING: 10 PYTHON worker processes", "a DeepSpeed warning",
                 "a line for the user"):
        assert kept in log, kept

    env[console.VERBOSE_ENV] = "1"  # --verbose: everything on the console too
    p = subprocess.run([sys.executable, "-c", _STDERR_SCRIPT, str(tmp_path / "logs2")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "core_worker.cc:2465" in p.stderr and "(raylet)" in p.stderr and "a line for the user" in p.stderr


def test_workers_lines_reach_the_driver_console_in_order(ray_session, tmp_path, capsys):
    """A Ray task's `say` and `count` travel through the run's relay to the driver's console, before the
    driver's next line; without a session the worker falls back to its stdout (Ray forwards it)."""

    @ray_session.remote(num_cpus=0)
    def work(i):
        t = time.time()
        console.say(f"[worker] line {i}")
        console.count("evaluate x", 2, 4, "questions", t)
        return os.getpid()

    for run in range(2):  # a second run: workers that cached the first run's relay find the new one
        with console.session(str(tmp_path / f"logs{run}")) as sess:
            sess.start_relay()
            pids = ray_session.get([work.remote(0), work.remote(1)])
            console.say("[driver] after the workers")
        out = capsys.readouterr().out.splitlines()
        assert os.getpid() not in pids
        assert [l for l in out if l.startswith("[worker]")] in (["[worker] line 0", "[worker] line 1"],
                                                                 ["[worker] line 1", "[worker] line 0"]), out
        counts = [l for l in out if l.startswith("[evaluate x]")]  # a fast stage shows its last line only
        assert len(counts) == 1 and counts[0].startswith("[evaluate x] 4/4 questions (100%) | "), out
        assert len(out) == 4 and out[-1] == "[driver] after the workers", out


def test_a_new_run_counts_from_zero():
    """Two runs in one process (a notebook, the rerun tests): the second run's progress is its own."""
    out = _io.StringIO()
    con = console.Console(stream=out, every_s=0, tty=False)
    con.count("evaluate rd", 40, 40, "questions", started=0.0, finished=4.0)
    con.reset()
    con.count("evaluate rd", 40, 40, "questions", started=10.0, finished=12.0)
    assert out.getvalue().splitlines()[-1] == "[evaluate rd] 40/40 questions (100%) | 20.0 questions/s | eta 0s"
