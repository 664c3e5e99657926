"""`openai_batch` backend: the OpenAI Batch API (half price, results within 24 h), driven from the driver.

    requests (one per question and sample, custom_id = ["<question id>", sample])
        ─► chunks of whole questions ─► upload (files, purpose=batch) ─► create batch ─► poll
        ─► output + error files ─► rows mapped back by custom_id (never by order) ─► written per batch
        ─► failed / expired requests ─► a follow-up batch (up to `max_followups`) ─► error rows if still failing

Nothing here needs Ray: the work happens at OpenAI; the driver only uploads, polls and downloads.

The run directory's `teacher_batches.json` records every chunk as it goes (its custom_ids, input file
id, batch id, status): a driver killed at any moment resumes polling the same batches on a rerun
instead of paying twice. A chunk whose file was uploaded but whose batch id was not yet recorded is
matched to an existing batch by its input file id before a new batch is created.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable, Optional

from kard_ray import io
from kard_ray.teacher.backends.common import gen_row, messages_of, stable_seed
from kard_ray.teacher.backends.openai_http import read_api_key
from kard_ray.console import say

STATE_FILE = "teacher_batches.json"
TERMINAL = ("completed", "expired", "failed", "cancelled")
# Line failures worth a follow-up batch: the batch ran out of time, or the server/rate limit failed.
RETRYABLE_CODES = ("batch_expired", "batch_cancelled", "batch_failed", "rate_limit_exceeded", "server_error")


def custom_id(question_id: str, sample: int) -> str:
    return json.dumps([question_id, int(sample)])


def parse_custom_id(cid: str, where: str) -> tuple[str, int]:
    try:
        qid, sample = json.loads(cid)
        return str(qid), int(sample)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: custom_id {cid!r} is not [question id, sample]") from e


def _log(msg: str) -> None:
    say(f"[teacher.batch] {msg}")


class BatchState:
    """The chunks of this run directory, persisted after every change."""

    def __init__(self, path: str):
        self.path = path
        self.chunks: list[dict] = io.read_json(path)["chunks"] if io.exists(path) else []

    def save(self) -> None:
        io.write_json(self.path, {"chunks": self.chunks})

    def open(self) -> list[dict]:
        return [c for c in self.chunks if not c.get("done")]


class OpenAIBatchRunner:
    """Runs the to-do questions through the Batch API; `write(rows)` receives GEN rows per finished batch."""

    def __init__(self, cfg, run, client=None):
        t = cfg.teacher
        self.t, self.b, self.seed = t, t.openai_batch, cfg.seed
        self.state = BatchState(run.path(STATE_FILE))
        self.client = client or self._client(cfg)
        self.counter = None
        self.summary = {"batches_created": 0, "batches_resumed": 0, "followups": 0, "pending": 0}

    @staticmethod
    def _client(cfg):
        from openai import OpenAI

        o, b = cfg.teacher.openai, cfg.teacher.openai_batch
        key = read_api_key(o.api_key_env)
        return OpenAI(base_url=o.base_url, api_key=key.get() if key else "unused", timeout=b.timeout_s,
                      max_retries=o.max_retries)

    # -- requests ----------------------------------------------------------------------------
    def _line(self, q: dict, sample: int) -> dict:
        body = {"model": self.t.model, "messages": messages_of(q), "n": 1, "temperature": self.t.temperature,
                "max_tokens": self.t.max_tokens, "seed": stable_seed(self.seed, q["question_id"], sample)}
        return {"custom_id": custom_id(q["question_id"], sample), "method": "POST", "url": "/v1/chat/completions",
                "body": body}

    def _chunks(self, todo: list[dict], skip: set[str]) -> list[list[str]]:
        """custom_ids in chunks of at most max_requests_per_batch, a question's samples kept together."""
        out, cur = [], []
        for q in todo:
            ids = [custom_id(q["question_id"], s) for s in q["samples"]]
            ids = [c for c in ids if c not in skip]
            if cur and len(cur) + len(ids) > self.b.max_requests_per_batch:
                out.append(cur)
                cur = []
            cur.extend(ids)
        return out + ([cur] if cur else [])

    # -- one chunk: upload, create (idempotent across restarts) --------------------------------
    def _submit(self, chunk: dict, by_id: dict[str, tuple[dict, int]]) -> None:
        if not chunk.get("input_file_id"):
            chunk["custom_ids"] = [c for c in chunk["custom_ids"] if c in by_id]  # (nothing paid yet)
            data = "".join(json.dumps(self._line(*by_id[c])) + "\n" for c in chunk["custom_ids"]).encode()
            f = self.client.files.create(file=(f"{chunk['key']}.jsonl", data), purpose="batch")
            chunk["input_file_id"] = f.id
            self.state.save()
        if not chunk.get("batch_id"):
            existing = self._find_batch(chunk["input_file_id"])
            if existing is None:
                batch = self.client.batches.create(input_file_id=chunk["input_file_id"], endpoint="/v1/chat/completions",
                                                   completion_window=self.b.completion_window,
                                                   metadata={"kard_ray_chunk": chunk["key"]})
                self.summary["batches_created"] += 1
            else:
                batch = existing
            chunk["batch_id"], chunk["status"] = batch.id, batch.status
            self.state.save()
            _log(f"batch {batch.id}: {len(chunk['custom_ids'])} requests (attempt {chunk['attempt']}), {batch.status}")

    def _find_batch(self, input_file_id: str):
        """A batch already created for this input file (a driver killed between create and save)."""
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == input_file_id:
                return batch
        return None

    def _new_chunk(self, ids: list[str], attempt: int) -> dict:
        key = hashlib.sha1(("\n".join(ids) + f"#{attempt}").encode()).hexdigest()[:16]
        chunk = {"key": key, "attempt": attempt, "custom_ids": ids, "input_file_id": None, "batch_id": None,
                 "status": "new", "done": False}
        self.state.chunks.append(chunk)
        self.state.save()
        return chunk

    # -- results -----------------------------------------------------------------------------
    def _file_lines(self, file_id: Optional[str], where: str) -> list[dict]:
        if not file_id:
            return []
        text = self.client.files.content(file_id).text
        out = []
        for k, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{where} file {file_id}:{k}: invalid JSON") from e
        return out

    def _usage(self, body: dict, q: dict, text: str) -> tuple[int, int]:
        usage = body.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(pt, int) or not isinstance(ct, int):
            if self.counter is None:
                from kard_ray.teacher.cost import TokenCounter

                self.counter = TokenCounter.for_config(self.t)
            pt = pt if isinstance(pt, int) else self.counter.count_messages(messages_of(q))
            ct = ct if isinstance(ct, int) else self.counter.count_text(text)
        return pt, ct

    def _collect(self, chunk: dict, batch, by_id: dict) -> tuple[list[dict], list[str]]:
        """(GEN rows of the chunk's requests, custom_ids to retry). Every request gets a row."""
        where = f"batch {batch.id}"
        got: dict[str, dict] = {}
        for line in self._file_lines(batch.output_file_id, where) + self._file_lines(batch.error_file_id, where):
            cid = line.get("custom_id")
            if cid in by_id and cid in chunk["custom_ids"]:
                got[cid] = line  # mapped by custom_id: the files come back in any order
        rows, retry = [], []
        for cid in chunk["custom_ids"]:
            if cid not in by_id:  # already written by other means since the batch was created
                continue
            q, sample = by_id[cid]
            line = got.get(cid)
            resp = (line or {}).get("response") or {}
            if resp.get("status_code") == 200:
                body = resp.get("body") or {}
                choices = body.get("choices") or []
                text = ((choices[0].get("message") or {}).get("content") or "") if choices else ""
                pt, ct = self._usage(body, q, text)
                rows.append(gen_row(q, sample, text, body.get("model") or self.t.model, pt, ct))
                continue
            error, retryable = self._line_error(line, resp, batch)
            if retryable and chunk["attempt"] < self.b.max_followups:
                retry.append(cid)
            rows.append(gen_row(q, sample, "", self.t.model, error=error))
        return rows, retry

    @staticmethod
    def _line_error(line: Optional[dict], resp: dict, batch) -> tuple[str, bool]:
        if line is None:  # no line at all: the batch failed or was cancelled before running it
            detail = ""
            errs = getattr(batch, "errors", None)
            if errs is not None and getattr(errs, "data", None):
                detail = ": " + "; ".join(f"{e.code}: {e.message}" for e in errs.data[:3])
            return f"batch {batch.id} {batch.status}{detail}", True
        err = line.get("error") or {}
        if err:
            code = err.get("code") or "error"
            return f"batch: {code}: {err.get('message') or ''}"[:500], code in RETRYABLE_CODES
        code = resp.get("status_code")
        msg = ((resp.get("body") or {}).get("error") or {}).get("message") or ""
        return f"batch: HTTP {code}: {msg}"[:500], code is None or code in (408, 409, 429) or code >= 500

    # -- the loop ----------------------------------------------------------------------------
    def run(self, todo: list[dict], write: Callable[[list[dict]], None]) -> dict:
        """Submit what no open chunk covers, poll every open chunk to the end, write rows per batch."""
        by_id = {custom_id(q["question_id"], s): (q, s) for q in todo for s in q["samples"]}
        pending = self.state.open()
        self.summary["batches_resumed"] = sum(1 for c in pending if c.get("batch_id"))
        covered = {cid for c in pending for cid in c["custom_ids"]}
        for ids in self._chunks(todo, covered):
            pending.append(self._new_chunk(ids, attempt=0))
        for c in pending:
            if any(cid in by_id for cid in c["custom_ids"]):
                self._submit(c, by_id)
            else:  # nothing of it is still to do (written meanwhile): close it
                c["done"] = True
                self.state.save()
        self._poll([c for c in pending if not c.get("done")], by_id, write)
        return self.summary

    def _poll(self, pending: list[dict], by_id: dict, write) -> None:
        deadline = time.monotonic() + self.b.max_wait_s if self.b.max_wait_s else None
        while pending:
            still = []
            for c in pending:
                batch = self.client.batches.retrieve(c["batch_id"])
                if batch.status != c.get("status"):
                    c["status"] = batch.status
                    self.state.save()
                if batch.status not in TERMINAL:
                    still.append(c)
                    continue
                rows, retry = self._collect(c, batch, by_id)
                write(rows)
                c["done"] = True
                self.state.save()
                ok = sum(1 for r in rows if r["error"] is None)
                _log(f"batch {batch.id} {batch.status}: {ok} of {len(rows)} requests succeeded"
                     + (f"; {len(retry)} go into a follow-up batch" if retry else ""))
                if retry:
                    follow = self._new_chunk(retry, attempt=c["attempt"] + 1)
                    self._submit(follow, by_id)
                    self.summary["followups"] += 1
                    still.append(follow)
            pending = still
            if pending and deadline is not None and time.monotonic() > deadline:
                self.summary["pending"] = len(pending)
                _log(f"teacher.openai_batch.max_wait_s passed with {len(pending)} batches open; their ids are in "
                     f"{self.state.path}: rerun to resume polling them")
                return
            if pending:
                time.sleep(self.b.poll_interval_s)
