"""An OpenAI-compatible chat-completions server for the teacher tests: a real HTTP server (FastAPI +
uvicorn, run as a subprocess) serving a real tiny transformers model, with injected faults.

    python tests/teacher_server.py --model DIR --port 8123 --log requests.jsonl [--api-key-env VAR]

Faults are deterministic per prompt (the last user message), so every prompt succeeds after a known
number of retries however requests interleave:
  * prompts whose hash % 3 == 0: first attempt 429 (Retry-After: 0), second attempt 500, then 200;
  * prompts whose hash % 3 == 1: first attempt 500, then 200;
  * the 1st, (K+1)th, (2K+1)th ... prompt to reach its would-be successful attempt (K = --slow-every)
    is delayed by --slow-s seconds instead (longer than the client's timeout: it times out and
    retries, and the retry succeeds);
  * prompts containing POISON: always 400 (not retryable: the row must be recorded with its error);
  * prompts containing HALF: only half the `n` choices asked for (the client must ask for the rest).
Every request is appended to --log as one JSON line {n, t (arrival), status, question, samples,
attempt}: the tests count
the server's work from it (retries, regenerated rows).

The OpenAI Batch API (documented shapes: POST /v1/files purpose=batch, GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches): a batch stays `validating` for
--batch-delay-s, then `in_progress` while its lines are generated one by one, then `completed` with an
output file (and an error file for failed lines). Faults, each on the first batch that holds such a
request (by the prompt's text):
  * BATCHFAIL: those lines fail (status_code 500 in the error file); the rest of the batch completes;
  * EXPIRE: the batch ends `expired`: finished lines in the output file, the EXPIRE lines in the error
    file with code batch_expired;
  * BADBATCH: the batch ends `failed` (errors.data, no output file).
(Faults fire once per question: its lines in a later batch succeed.)
Batch events are logged as {"event": "batch_created" | "batch_done", "batch_id", "custom_ids", ...}.
"""

import argparse
import asyncio
import hashlib
import json
import os
import threading
import time
from collections import defaultdict

# Imported at module level: FastAPI resolves the `Request` annotation from the module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


def _question_of(prompt: str) -> str:
    for line in prompt.splitlines():
        if line.startswith("Question: "):
            return line[len("Question: "):]
    return prompt[:200]


def build_app(model_dir: str, log_path: str, api_key: str | None, slow_s: float, slow_every: int,
              batch_delay_s: float = 0.5):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(1)
    seq2seq = bool(getattr(AutoConfig.from_pretrained(model_dir), "is_encoder_decoder", False))
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(model_dir).eval()
    lock = threading.Lock()
    attempts: dict[str, int] = defaultdict(int)
    counter = {"n": 0, "first_ok": 0}
    app = FastAPI()

    def log(entry: dict) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    @app.get("/health")
    def health():
        return {"ok": True}

    def authorized(request: Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    def generate(prompt: str, n_choices: int, max_tokens: int):
        with lock, torch.no_grad():
            enc = tok(prompt, return_tensors="pt", truncation=True, max_length=256)
            out = model.generate(**enc, do_sample=True, top_k=0, num_return_sequences=n_choices,
                                 max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
            new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
            return tok.batch_decode(new, skip_special_tokens=True), int(enc["input_ids"].shape[1]), int(new.numel())

    def completion(texts, prompt_tokens, completion_tokens, req_id):
        return {
            "id": f"chatcmpl-test-{req_id}", "object": "chat.completion", "created": int(time.time()),
            "model": os.path.basename(model_dir.rstrip("/")) or "tiny",
            "choices": [{"index": i, "message": {"role": "assistant", "content": t.strip()}, "finish_reason": "stop"}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    add_batch_api(app, authorized, generate, completion, log, batch_delay_s)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.time()
        body = await request.json()
        messages = body.get("messages") or []
        prompt = "\n\n".join(m.get("content", "") for m in messages)
        last_user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        question = _question_of(last_user)
        n = int(body.get("n") or 1)
        with lock:
            counter["n"] += 1
            req_no = counter["n"]
            attempt = attempts[last_user]
            attempts[last_user] += 1
        h = int(hashlib.sha1(last_user.encode()).hexdigest(), 16)

        def reply(status: int, payload: dict, headers: dict | None = None, **extra):
            log({"n": req_no, "t": arrived, "status": status, "question": question, "samples": n, "attempt": attempt,
                 **extra})
            return JSONResponse(payload, status_code=status, headers=headers)

        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return reply(401, {"error": {"message": "invalid api key"}})
        if "POISON" in last_user:
            return reply(400, {"error": {"message": "this prompt is rejected"}})
        if "HALF" in last_user:  # a server that returns fewer choices than asked for
            n_choices = (n + 1) // 2
        else:
            n_choices = n
        if h % 3 == 0 and attempt == 0:
            return reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        if (h % 3 == 0 and attempt == 1) or (h % 3 == 1 and attempt == 0):
            return reply(500, {"error": {"message": "internal error"}})
        first_ok = {0: 2, 1: 1, 2: 0}[h % 3]
        if attempt == first_ok:
            with lock:
                slow = counter["first_ok"] % slow_every == 0
                counter["first_ok"] += 1
        else:
            slow = False
        if slow:
            await asyncio.sleep(slow_s)  # the client times out before this answer
            return reply(200, {"error": "too late"}, slow=True)

        # in a thread: the event loop keeps answering (and timing out) others
        texts, prompt_tokens, completion_tokens = await asyncio.get_running_loop().run_in_executor(
            None, generate, prompt, n_choices, int(body.get("max_tokens") or 16))
        return reply(200, completion(texts, prompt_tokens, completion_tokens, req_no))

    return app


def _multipart(content_type: str, body: bytes) -> dict:
    """{field name: bytes} of a multipart/form-data body (stdlib email parser)."""
    from email.parser import BytesParser
    from email.policy import default

    msg = BytesParser(policy=default).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in msg.iter_parts()}


def add_batch_api(app, authorized, generate, completion, log, batch_delay_s: float) -> None:
    """/v1/files and /v1/batches, processed in the background with the same tiny model."""
    files: dict[str, dict] = {}
    batches: dict[str, dict] = {}
    seen_faults: set[str] = set()
    ids = {"file": 0, "batch": 0}

    def new_id(kind: str) -> str:
        ids[kind] += 1
        return f"{kind}-test-{ids[kind]:04d}"

    def put_file(data: bytes, purpose: str, filename: str) -> dict:
        fid = new_id("file")
        files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                      "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        return {k: v for k, v in files[fid].items() if k != "data"}

    def unauthorized():
        return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)

    @app.post("/v1/files")
    async def upload(request: Request):
        if not authorized(request):
            return unauthorized()
        form = _multipart(request.headers.get("content-type", ""), await request.body())
        if form.get("purpose") != b"batch" or "file" not in form:
            return JSONResponse({"error": {"message": "expected purpose=batch and a file"}}, status_code=400)
        return put_file(form["file"], "batch", "batch_input.jsonl")

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, request: Request):
        if not authorized(request):
            return unauthorized()
        if file_id not in files:
            return JSONResponse({"error": {"message": f"no file {file_id}"}}, status_code=404)
        return Response(files[file_id]["data"], media_type="application/octet-stream")

    def public(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        if not authorized(request):
            return unauthorized()
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in files or body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return JSONResponse({"error": {"message": "bad batch request"}}, status_code=400)
        lines = [json.loads(x) for x in files[fid]["data"].decode().splitlines() if x.strip()]
        bid = new_id("batch")
        now = int(time.time())
        batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": fid,
                        "completion_window": "24h", "status": "validating", "created_at": now,
                        "expires_at": now + 86400, "output_file_id": None, "error_file_id": None, "errors": None,
                        "metadata": body.get("metadata"),
                        "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        log({"event": "batch_created", "batch_id": bid, "t": time.time(), "n": len(lines),
             "custom_ids": [x["custom_id"] for x in lines]})
        asyncio.get_running_loop().create_task(process(bid, lines))
        return public(batches[bid])

    def first_fault(lines: list[dict], word: str) -> set[str]:
        """custom_ids of the lines whose question holds `word` and was never in a batch faulted so before."""
        hit = {}
        for x in lines:
            q = _question_of(next((m.get("content", "") for m in reversed(x["body"]["messages"])
                                   if m.get("role") == "user"), ""))
            if word in q and (word, q) not in seen_faults:
                hit.setdefault(q, []).append(x["custom_id"])
        seen_faults.update((word, q) for q in hit)
        return {c for ids in hit.values() for c in ids}

    async def process(bid: str, lines: list[dict]) -> None:
        b = batches[bid]
        await asyncio.sleep(batch_delay_s)
        if first_fault(lines, "BADBATCH"):  # the whole batch fails
            b.update(status="failed", failed_at=int(time.time()),
                     errors={"object": "list", "data": [{"code": "invalid_request", "message": "injected failure",
                                                          "line": 1}]})
            log({"event": "batch_done", "batch_id": bid, "status": "failed", "t": time.time()})
            return
        b.update(status="in_progress", in_progress_at=int(time.time()))
        expire = first_fault(lines, "EXPIRE")
        fail_line = first_fault(lines, "BATCHFAIL")
        out, err = [], []
        for k, x in enumerate(lines):
            rid = f"batch_req_{bid}_{k}"
            if x["custom_id"] in expire:
                err.append({"id": rid, "custom_id": x["custom_id"], "response": None,
                            "error": {"code": "batch_expired", "message": "This request could not be executed before "
                                                                          "the completion window expired."}})
                continue
            if x["custom_id"] in fail_line:
                err.append({"id": rid, "custom_id": x["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": rid,
                                         "body": {"error": {"message": "injected server error"}}}})
                continue
            prompt = "\n\n".join(m.get("content", "") for m in x["body"]["messages"])
            texts, pt, ct = await asyncio.get_running_loop().run_in_executor(
                None, generate, prompt, int(x["body"].get("n") or 1), int(x["body"].get("max_tokens") or 16))
            out.append({"id": rid, "custom_id": x["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": rid, "body": completion(texts, pt, ct, rid)}})
        out.reverse()  # results come back in any order: clients must map them by custom_id
        as_bytes = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
        if out:
            b["output_file_id"] = put_file(as_bytes(out), "batch_output", "output.jsonl")["id"]
        if err:
            b["error_file_id"] = put_file(as_bytes(err), "batch_output", "errors.jsonl")["id"]
        b["request_counts"].update(completed=len(out), failed=len(err))
        status = "expired" if expire else "completed"
        b.update(status=status, **{f"{status}_at": int(time.time())})
        log({"event": "batch_done", "batch_id": bid, "status": status, "t": time.time(),
             "completed": len(out), "failed": len(err)})

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str, request: Request):
        if not authorized(request):
            return unauthorized()
        if batch_id not in batches:
            return JSONResponse({"error": {"message": f"no batch {batch_id}"}}, status_code=404)
        return public(batches[batch_id])

    @app.get("/v1/batches")
    def list_batches(request: Request, limit: int = 20, after: str | None = None):
        if not authorized(request):
            return unauthorized()
        items = sorted(batches.values(), key=lambda b: b["id"], reverse=True)
        if after:
            items = [b for b in items if b["id"] < after]
        page = items[:limit]
        return {"object": "list", "data": [public(b) for b in page], "has_more": len(items) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--api-key-env", default=None, help="Environment variable holding the key clients must send.")
    p.add_argument("--slow-s", type=float, default=2.0)
    p.add_argument("--slow-every", type=int, default=8)
    p.add_argument("--batch-delay-s", type=float, default=0.5, help="Seconds a batch stays `validating`.")
    a = p.parse_args()
    import uvicorn

    key = os.environ[a.api_key_env] if a.api_key_env else None
    uvicorn.run(build_app(a.model, a.log, key, a.slow_s, a.slow_every, a.batch_delay_s), host="127.0.0.1", port=a.port,
                log_level="warning")


if __name__ == "__main__":
    main()
