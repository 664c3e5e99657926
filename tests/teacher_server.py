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
from fastapi.responses import JSONResponse


def _question_of(prompt: str) -> str:
    for line in prompt.splitlines():
        if line.startswith("Question: "):
            return line[len("Question: "):]
    return prompt[:200]


def build_app(model_dir: str, log_path: str, api_key: str | None, slow_s: float, slow_every: int):
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

        def generate():  # in a thread: the event loop keeps answering (and timing out) others
            with lock, torch.no_grad():
                enc = tok(prompt, return_tensors="pt", truncation=True, max_length=256)
                out = model.generate(**enc, do_sample=True, top_k=0, num_return_sequences=n_choices,
                                     max_new_tokens=int(body.get("max_tokens") or 16), pad_token_id=tok.pad_token_id)
                new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
                return tok.batch_decode(new, skip_special_tokens=True), int(enc["input_ids"].shape[1]), int(new.numel())

        texts, prompt_tokens, completion_tokens = await asyncio.get_running_loop().run_in_executor(None, generate)
        return reply(200, {
            "id": f"chatcmpl-test-{req_no}", "object": "chat.completion", "created": int(time.time()),
            "model": os.path.basename(model_dir.rstrip("/")) or "tiny",
            "choices": [{"index": i, "message": {"role": "assistant", "content": t.strip()}, "finish_reason": "stop"}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--api-key-env", default=None, help="Environment variable holding the key clients must send.")
    p.add_argument("--slow-s", type=float, default=2.0)
    p.add_argument("--slow-every", type=int, default=8)
    a = p.parse_args()
    import uvicorn

    key = os.environ[a.api_key_env] if a.api_key_env else None
    uvicorn.run(build_app(a.model, a.log, key, a.slow_s, a.slow_every), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
