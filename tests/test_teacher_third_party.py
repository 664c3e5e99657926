"""The `openai` backend against a server no one here wrote: `transformers serve` (Hugging Face
transformers' OpenAI-compatible server, installed from the package registry) over a tiny Llama chat
model built offline. Rationales come back, tokens are counted from the server's `usage`, and a stopped
server is retried, then reported per row."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import pyarrow as pa
import pytest
from conftest import wait_for_health

from kard_ray import io
from kard_ray.config import config_from_dict
from kard_ray.data import schemas
from kard_ray.io import RunDir
from kard_ray.teacher import generate_rationales


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_available() -> str | None:
    """Why `transformers serve` cannot run here, or None."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "this transformers has no `serve` command"
    if not is_serve_available():
        return "transformers serve needs its serving extras: pip install 'transformers[serving]'"
    if shutil.which("transformers") is None:
        return "the `transformers` console script is not on PATH"
    return None


@pytest.fixture(scope="module")
def tiny_llama_chat(tmp_path_factory, synthetic_task) -> str:
    """A tiny Llama (one layer, 32 wide) with a byte-level BPE fitted on the synthetic task and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kard_ray.data.synthetic import task_texts

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(task_texts(synthetic_task), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    out = str(tmp_path_factory.mktemp("tiny_llama_chat"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_server(tiny_llama_chat, tmp_path_factory):
    """`transformers serve <model dir>` in a subprocess; yields (base_url, process)."""
    reason = _serve_available()
    if reason:
        pytest.skip(reason)
    port = _free_port()
    log = tmp_path_factory.mktemp("hf_serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["transformers", "serve", tiny_llama_chat, "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_for_health(proc, base + "/health", 240, "transformers serve", log.read_text)
    yield base + "/v1", proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.timeout(420)
def test_openai_backend_against_transformers_serve(ray_session, hf_server, tiny_llama_chat, tmp_path, synthetic_task):
    base_url, proc = hf_server
    teacher = {"backend": "openai", "model": tiny_llama_chat, "n_samples": 2, "max_tokens": 8,
               "openai": {"base_url": base_url, "api_key_env": None, "max_concurrency": 2, "requests_per_second": 20.0,
                          "max_retries": 2, "backoff_s": 0.05, "timeout_s": 120.0, "batch_size": 2}}

    def run_for(qs, name):
        run = RunDir(str(tmp_path / name))
        io.write_table(pa.Table.from_pylist(qs, schema=schemas.QUESTIONS), run.questions("train"))
        cfg = config_from_dict({"run_dir": run.root, "teacher": teacher})
        return generate_rationales(cfg, run), io.read_table(run.rationales)

    # the server answers one choice per request (it ignores n): the backend asks again for the rest
    stats, table = run_for(synthetic_task.train_questions[:3], "up")
    assert table.num_rows == 6 and table["error"].null_count == 6
    assert all(isinstance(t, str) for t in table["text"].to_pylist())
    assert all(c is not None and 1 <= c <= 8 for c in table["completion_tokens"].to_pylist())
    assert stats["prompt_tokens"] > 3 * 20 and stats["completion_tokens"] >= 6
    assert set(stats["teachers"]) == {tiny_llama_chat}  # the model id the server reports

    # a stopped server: each request retried (max_retries), then every row recorded with its error
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    stats, table = run_for(synthetic_task.train_questions[3:5], "down")
    assert table.num_rows == 4 and stats["errors"] == 4
    errors = table["error"].to_pylist()
    assert all("ConnectError" in e and "gave up after 3 attempts" in e for e in errors), errors
