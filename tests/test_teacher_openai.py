"""The `openai` backend against a real OpenAI-compatible HTTP server (tests/teacher_server.py) that
serves the tiny T5 and injects 429, 500, slow responses and a non-retryable 400: retries, per-row
errors, key handling, and a generation job killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import wait_for_health
import yaml

from kard_ray import io
from kard_ray.config import config_from_dict
from kard_ray.data import schemas
from kard_ray.io import RunDir
from kard_ray.teacher import generate_rationales
from kard_ray.teacher.store import RationaleStore

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "TEACHER_TEST_API_KEY"
KEY = "sk-test-7f3a9c1e55d04b2f"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_t5_dir):
    """The fault-injecting chat-completions server in a subprocess; yields (base_url, log path)."""
    log = tmp_path_factory.mktemp("server") / "requests.jsonl"
    log.touch()
    port = _free_port()
    os.environ[KEY_ENV] = KEY
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "teacher_server.py"), "--model", tiny_t5_dir,
                             "--port", str(port), "--log", str(log), "--api-key-env", KEY_ENV, "--slow-s", "1.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    wait_for_health(proc, base + "/health", 120, "test server", lambda: proc.stderr.read().decode())
    yield base + "/v1", log
    proc.terminate()
    proc.wait(timeout=20)
    os.environ.pop(KEY_ENV, None)


def _log_entries(log: Path, start: int = 0) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()[start:] if line.strip()]


def _teacher_cfg(base_url: str, **openai) -> dict:
    o = {"base_url": base_url, "api_key_env": KEY_ENV, "requests_per_second": 20.0, "max_concurrency": 4,
         "max_retries": 4, "backoff_s": 0.05, "timeout_s": 1.0, "batch_size": 4}
    o.update(openai)
    return {"backend": "openai", "model": "tiny-teacher", "n_samples": 2, "max_tokens": 8, "openai": o}


def test_rate_limiter_backoff_and_secret():
    import asyncio

    from kard_ray.teacher.backends.openai_http import Secret, TokenBucket, backoff_delay

    async def acquire_all(bucket: TokenBucket, n: int) -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(bucket.acquire() for _ in range(n)))
        return time.monotonic() - t0

    # 9 requests at 20/s from a full bucket of one: at least 8 waits of 50 ms
    assert asyncio.run(acquire_all(TokenBucket(20.0), 9)) >= 0.38
    for attempt in range(6):
        d = backoff_delay(attempt, 0.5, None)
        assert 0.25 * 2 ** attempt <= d <= min(60.0, 0.5 * 2 ** attempt)
    assert backoff_delay(0, 0.1, retry_after=3.0) == 3.0  # the server's Retry-After wins
    assert backoff_delay(10, 1.0, None) == 60.0  # capped
    s = Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(s) + str(s) + repr({"api_key": s}) and s.get() == "sk-very-secret"


@pytest.mark.timeout(240)
def test_openai_retries_and_row_errors(ray_session, server, tmp_path, synthetic_task, capfd):
    base_url, log = server
    start = len(_log_entries(log))
    qs = [dict(q) for q in synthetic_task.train_questions[:10]]
    qs[3]["question"] += " POISON"  # the server answers 400: not retryable, recorded with its error
    qs[5]["question"] += " HALF"  # the server returns 1 of the 2 choices: a follow-up request gets the other
    run = RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist(qs, schema=schemas.QUESTIONS), run.questions("train"))
    cfg = config_from_dict({"run_dir": run.root, "teacher": _teacher_cfg(base_url)})
    stats = generate_rationales(cfg, run)

    table = io.read_table(run.rationales)
    rows = {(r["question_id"], r["sample"]): r for r in table.to_pylist()}
    assert table.num_rows == 20 and len(rows) == 20
    for q in qs:
        for s in range(2):
            r = rows[(q["id"], s)]
            if q is qs[3]:
                assert r["error"].startswith("HTTP 400") and r["text"] == ""
            else:
                assert r["error"] is None and isinstance(r["text"], str) and r["completion_tokens"] >= 1
    assert stats["errors"] == 2 and stats["n_rationales"] == 18
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    entries = _log_entries(log, start)
    statuses = [e["status"] for e in entries]
    # faults really happened and were retried: 429s, 500s and at least one timed-out request
    assert statuses.count(429) >= 1 and statuses.count(500) >= 2
    assert any(e.get("slow") for e in entries), "no request was slow enough to time out"
    assert statuses.count(400) == 1  # 400 is not retried
    ok = [e for e in entries if e["status"] == 200 and not e.get("slow")]
    # one successful request per question, two for the HALF one (asking n=2, then n=1)
    assert len(ok) == 10 and len({e["question"] for e in ok}) == 9
    assert sorted(e["samples"] for e in ok if e["question"] == qs[5]["question"]) == [1, 2]

    # the key is never logged or written
    out, err = capfd.readouterr()
    assert KEY not in out and KEY not in err
    files = [f for f in Path(run.root).rglob("*") if f.is_file()]
    try:  # Ray's own logs of this session (private API: skipped if it moves)
        files += [f for f in Path(ray_session._private.worker._global_node.get_session_dir_path()).rglob("*")
                  if f.is_file() and f.stat().st_size < 50_000_000]
    except AttributeError:
        pass
    for f in files:
        try:
            assert KEY.encode() not in f.read_bytes(), f
        except OSError:  # sockets, files rotated away meanwhile
            pass

    # rerun: finished rows are skipped; the error rows are retried (retry_errors) and stay errors
    before = len(_log_entries(log))
    again = generate_rationales(cfg, run)
    # (a slow answer the first run timed out on may still land in the log meanwhile: not a request)
    new = [e for e in _log_entries(log, before) if not e.get("slow")]
    assert [e["status"] for e in new] == [400]
    assert again["this_run"]["rows_written"] == 2 and again["this_run"]["rows_retried"] == 2
    assert again["this_run"]["rows_skipped"] == 18
    assert io.read_table(run.rationales).num_rows == 20  # the old error rows were replaced, not added


def test_openai_missing_key_fails_fast(tmp_path, server):
    run = RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist([{"id": "q", "dataset": "synthetic", "split": "train", "question": "Q?",
                                          "options": ["a", "b"], "answer": 0}], schema=schemas.QUESTIONS),
                   run.questions("train"))
    t = _teacher_cfg(server[0], api_key_env="TEACHER_TEST_UNSET_KEY")
    cfg = config_from_dict({"run_dir": run.root, "teacher": t})
    with pytest.raises(ValueError, match="TEACHER_TEST_UNSET_KEY.*is not set"):
        generate_rationales(cfg, run)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_job_resumes_without_duplicates(ray_session, server, tmp_path, synthetic_task):
    """SIGKILL the generation job midway, rerun it: the set completes, nothing is duplicated, and no
    row written before the kill is requested from the server again."""
    base_url, log = server
    qs = synthetic_task.train_questions[10:26]
    run = RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist(qs, schema=schemas.QUESTIONS), run.questions("train"))
    address = ray_session.get_runtime_context().gcs_address
    # The job runs the questions stage first (cli: generate-rationales = questions + teacher): it reads
    # these questions from a file (the synthetic default would write the whole synthetic task instead).
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    config = {"run_dir": run.root, "resources": {"address": address},
              "data": {"dataset": "synthetic", "train_path": str(qfile)},
              "teacher": _teacher_cfg(base_url, requests_per_second=4.0, max_concurrency=2, batch_size=2)}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, str(REPO / "jobs" / "generate_rationales.py"), "--config", str(cfg_path)]
    env = {**os.environ, KEY_ENV: KEY}
    job_log = tmp_path / "job1.log"

    start = len(_log_entries(log))
    with open(job_log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    store = RationaleStore(run.rationales)
    deadline = time.time() + 240
    while len(store.parts()) < 2:
        assert proc.poll() is None, f"the job ended before it could be killed:\n{job_log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no parts written:\n{job_log.read_text()[-3000:]}"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kill_mark = len(_log_entries(log))
    # the stage's request rate stayed within teacher.openai.requests_per_second (4/s), retries included
    first_run = _log_entries(log, start)
    span = first_run[-1]["t"] - first_run[0]["t"]
    assert len(first_run) >= 4 and (len(first_run) - 1) / span <= 4.0 * 1.5, (len(first_run), span)

    before = io.read_table(run.rationales)
    written = {(r["question_id"], r["sample"]): r["text"] for r in before.to_pylist()}
    written_q = {q for q, _ in written}
    assert 0 < len(written_q) < len(qs), "the kill should land midway"
    assert len(written) == before.num_rows == 2 * len(written_q)  # whole questions only

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout.decode()[-3000:] + rerun.stderr.decode()[-3000:]
    assert KEY not in rerun.stdout.decode() + rerun.stderr.decode()

    after = io.read_table(run.rationales)
    keys = list(zip(after["question_id"].to_pylist(), after["sample"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * len(qs)
    assert after["error"].null_count == after.num_rows
    # rows written before the kill are untouched ...
    texts = dict(zip(keys, after["text"].to_pylist()))
    assert all(texts[k] == v for k, v in written.items())
    # ... and never requested again: the server's successful answers after the kill are for the others
    text_of = {q["question"]: q["id"] for q in qs}
    served_after = {text_of[e["question"]] for e in _log_entries(log, kill_mark)
                    if e["status"] == 200 and not e.get("slow") and e["question"] in text_of}
    assert served_after and not (served_after & written_q)
    stats = json.loads(Path(run.path("rationales_stats.json")).read_text())
    assert stats["this_run"]["rows_skipped"] == len(written) and stats["n_rationales"] == 2 * len(qs)


@pytest.mark.timeout(300)
def test_budget_stops_cleanly_and_a_higher_budget_continues(ray_session, server, tmp_path, synthetic_task,
                                                            tiny_t5_dir):
    """`--estimate` before spending; `teacher.max_cost_usd` stops the stage with whole questions written
    and the rest never requested; a rerun with a higher budget asks only for what is missing."""
    from kard_ray.teacher.estimate import estimate_rationales, format_estimate

    base_url, log = server
    qs = synthetic_task.train_questions[26:38]
    run = RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist(qs, schema=schemas.QUESTIONS), run.questions("train"))
    teacher = {**_teacher_cfg(base_url), "tokenizer": tiny_t5_dir, "estimate_completion_tokens": 8,
               "prices": {"tiny-teacher": {"input": 1000.0, "output": 2000.0}}}
    cfg = config_from_dict({"run_dir": run.root, "teacher": teacher})
    est = estimate_rationales(cfg, run)
    print("\n" + format_estimate(est))
    assert est["requests"] == 12 and est["rows_to_do"] == 24 and est["prompt_tokens"] > 12 * 20
    assert est["completion_tokens"] == 24 * 8 and est["cost_usd"] > 0
    limit = round(est["cost_usd"] * 0.5, 4)

    start = len(_log_entries(log))
    cfg = config_from_dict({"run_dir": run.root, "teacher": {**teacher, "max_cost_usd": limit}})
    stats = generate_rationales(cfg, run)
    b, c = stats["budget"], stats["cost"]
    print(f"budget ${limit}: spent ${b['spent_usd']}, {stats['n_rationales']} rows, {b['rows_not_requested']} not "
          f"requested; measured {stats['prompt_tokens'] / max(1, stats['n_rationales'] // 2):.0f} prompt tokens per "
          f"request vs {est['prompt_tokens_per_request']} estimated; {stats['this_run']['waves']} waves")
    assert b["stopped"] and b["rows_not_requested"] > 0
    table = io.read_table(run.rationales)
    written_q = set(table["question_id"].to_pylist())
    assert 0 < len(written_q) < len(qs) and table.num_rows == 2 * len(written_q)  # whole questions only
    assert b["spent_usd"] == c["total_usd"] and b["spent_usd"] <= limit * 1.25
    assert c["per_row_usd"] > 0 and c["per_question_usd"] > 0 and c["priced_rows"] == table.num_rows
    text_of = {q["question"]: q["id"] for q in qs}
    mine = lambda entries: [e for e in entries if e.get("question") in text_of]  # noqa: E731  (this test's)
    served = {e["question"] for e in mine(_log_entries(log, start)) if e["status"] == 200 and not e.get("slow")}
    asked = {e["question"] for e in mine(_log_entries(log, start))}
    assert {text_of[x] for x in served} == written_q and {text_of[x] for x in asked} == written_q

    # the same budget again: nothing left to afford, nothing requested
    mark = len(_log_entries(log))
    again = generate_rationales(cfg, run)
    assert again["this_run"]["rows_written"] == 0 and again["budget"]["stopped"]
    assert [e for e in mine(_log_entries(log, mark)) if not e.get("slow")] == []

    # a higher budget continues with the missing questions only
    cfg = config_from_dict({"run_dir": run.root, "teacher": {**teacher, "max_cost_usd": limit * 10}})
    done = generate_rationales(cfg, run)
    assert done["n_rationales"] == 24 and not done["budget"]["stopped"]
    assert done["this_run"]["rows_skipped"] == table.num_rows
    served_now = {text_of[e["question"]] for e in mine(_log_entries(log, mark)) if e["status"] == 200 and not e.get("slow")}
    assert served_now == {q["id"] for q in qs} - written_q
    assert done["cost"]["total_usd"] > b["spent_usd"]


# ----------------------------------------------------------------------------------------------
# the OpenAI Batch API (files + batches endpoints of the same server)


def _batch_cfg(base_url: str, **batch) -> dict:
    b = {"max_requests_per_batch": 6, "poll_interval_s": 0.3, "max_followups": 2, "timeout_s": 30.0}
    b.update(batch)
    return {**_teacher_cfg(base_url), "backend": "openai_batch", "openai_batch": b}


def _batch_events(log: Path, start: int, event: str) -> list[dict]:
    return [e for e in _log_entries(log, start) if e.get("event") == event]


@pytest.mark.timeout(240)
def test_openai_batch_backend_followups_and_mapping(server, tmp_path, synthetic_task, tiny_t5_dir):
    """Chunks of whole questions, one batch each; a failed line, an expired batch and a failed batch
    go into follow-up batches; results are mapped back by custom_id (the server returns them reversed)."""
    from transformers import AutoTokenizer

    from kard_ray.teacher.backends.openai_batch import custom_id
    from kard_ray.teacher.prompts import build_messages

    base_url, log = server
    qs = [dict(q) for q in synthetic_task.train_questions[38:46]]
    qs[1]["question"] += " BATCHFAIL"  # its lines fail in the first batch (HTTP 500 lines in the error file)
    qs[4]["question"] += " EXPIRE"  # its batch ends `expired` with these lines unfinished
    qs[7]["question"] += " BADBATCH"  # its batch ends `failed`
    run = RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist(qs, schema=schemas.QUESTIONS), run.questions("train"))
    cfg = config_from_dict({"run_dir": run.root, "teacher": _batch_cfg(base_url)})
    start = len(_log_entries(log))
    stats = generate_rationales(cfg, run)

    table = io.read_table(run.rationales)
    rows = {(r["question_id"], r["sample"]): r for r in table.to_pylist()}
    assert table.num_rows == 16 and len(rows) == 16 and table["error"].null_count == 16
    created = _batch_events(log, start, "batch_created")
    ids = lambda *k: {custom_id(qs[i]["id"], s) for i in k for s in (0, 1)}  # noqa: E731
    assert [set(e["custom_ids"]) for e in created[:3]] == [ids(0, 1, 2), ids(3, 4, 5), ids(6, 7)]
    assert sorted(map(sorted, (e["custom_ids"] for e in created[3:]))) == sorted(
        map(sorted, (ids(1), ids(4), ids(6, 7))))
    assert {e["status"] for e in _batch_events(log, start, "batch_done")} == {"completed", "expired", "failed"}
    assert stats["batches"]["batches_created"] == 6 and stats["batches"]["followups"] == 3
    assert stats["cost"]["price_factor"] == 0.5

    # mapped by custom_id: every row carries the prompt tokens of its own question's prompt
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    expected = {}
    for q in qs:
        prompt = "\n\n".join(m["content"] for m in build_messages(q, q["dataset"]))
        expected[q["id"]] = len(tok(prompt, truncation=True, max_length=256)["input_ids"])
    assert len(set(expected.values())) > 3
    assert all(r["prompt_tokens"] == expected[q] for (q, _), r in rows.items())

    # a rerun finds everything written: no batch is created
    mark = len(_log_entries(log))
    again = generate_rationales(cfg, run)
    assert again["this_run"]["rows_written"] == 0 and _batch_events(log, mark, "batch_created") == []


@pytest.mark.timeout(300)
def test_openai_batch_killed_driver_resumes_polling(server, tmp_path, synthetic_task):
    """SIGKILL the driver once its batches exist; the rerun polls the same batch ids (the server's log
    shows one batch per chunk, never a second) and writes every row."""
    base_url, log = server
    qs = synthetic_task.train_questions[46:52]
    run = RunDir(str(tmp_path / "run"))
    io.write_table(pa.Table.from_pylist(qs, schema=schemas.QUESTIONS), run.questions("train"))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"run_dir": run.root, "teacher": _batch_cfg(base_url, poll_interval_s=2.0)}))
    drive = tmp_path / "drive.py"
    drive.write_text("import sys\nfrom kard_ray.config import load_config\nfrom kard_ray.io import RunDir\n"
                     "from kard_ray.teacher import generate_rationales\n"
                     "cfg = load_config(sys.argv[1])\ngenerate_rationales(cfg, RunDir(cfg.run_dir))\n")
    env = {**os.environ, KEY_ENV: KEY}
    state = Path(run.path("teacher_batches.json"))
    start = len(_log_entries(log))
    proc = subprocess.Popen([sys.executable, str(drive), str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while True:
        chunks = json.loads(state.read_text())["chunks"] if state.exists() else []
        if len(chunks) == 2 and all(c.get("batch_id") for c in chunks):
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the driver created no batches"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    batch_ids = [c["batch_id"] for c in chunks]
    assert not any(c.get("done") for c in json.loads(state.read_text())["chunks"])

    rerun = subprocess.run([sys.executable, str(drive), str(cfg_path)], cwd=REPO, env=env, capture_output=True,
                           timeout=180)
    assert rerun.returncode == 0, rerun.stdout.decode()[-3000:] + rerun.stderr.decode()[-3000:]
    created = _batch_events(log, start, "batch_created")
    assert [e["batch_id"] for e in created] == batch_ids  # one batch per chunk, none created twice
    final = json.loads(state.read_text())["chunks"]
    assert [c["batch_id"] for c in final] == batch_ids and all(c["done"] for c in final)
    table = io.read_table(run.rationales)
    assert table.num_rows == 12 and table["error"].null_count == 12
    assert len(set(zip(table["question_id"].to_pylist(), table["sample"].to_pylist()))) == 12
