"""The trainer core under Ray Train with two workers: DDP (gloo) and DeepSpeed ZeRO-2 on CPU.

Each run is one `TorchTrainer.fit` (~25 s start-up here) in which the last worker raises once
mid-training: Ray Train restarts the group, the loop resumes from the last checkpoint at its exact
step (optimizer and scheduler included), finishes at the configured step count and exports.
"""

from __future__ import annotations

import json
import os

import pytest

from kard_ray.config import StudentConfig
from kard_ray.training.core import train
from kard_ray.training.student import seq2seq_task, tokenize_examples
from oracle_examples import oracle_examples

STEPS, CKPT_EVERY, FAIL_AT, KEEP = 30, 10, 15, 2


def _fit(ray, synthetic_task, tiny_t5_dir, tmp, name, **cfg_kw):
    rows = oracle_examples(synthetic_task, "kard")
    ds = tokenize_examples(ray.data.from_items(rows), tiny_t5_dir, 128, None).materialize()
    cfg = StudentConfig(num_workers=2, batch_size=8, lr=3e-3, max_steps=STEPS, checkpoint_every_steps=CKPT_EVERY,
                        keep_checkpoints=KEEP, max_failures=1, log_every_steps=10, **cfg_kw)
    out, storage = str(tmp / "model"), str(tmp / "ckpt")
    result = train(seq2seq_task(tiny_t5_dir), ds, cfg, out, storage, name, {"init_model": tiny_t5_dir},
                   resume=False, fail_at_step=FAIL_AT)
    return result, out, os.path.join(storage, name)


def _check_resumed_run(result: dict, out: str, run_path: str) -> list[dict]:
    # the failure really happened (the marker is written just before the raise) ...
    assert os.path.exists(os.path.join(run_path, f"fail_once_at_step_{FAIL_AT}.marker"))
    # ... and the step log has every step exactly once: resumed at step 10, not at 0 or 15
    log = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    assert result["steps"] == STEPS and len(result["loss_curve"]) == STEPS
    # last K checkpoints kept: steps 20 and 30
    ckpts = sorted(d for d in os.listdir(run_path) if d.startswith("checkpoint_step"))
    assert ckpts == ["checkpoint_step00000020", "checkpoint_step00000030"]
    curve = result["loss_curve"]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    return log


def _check_export_generates(out: str):
    import torch

    from kard_ray.models import load_seq2seq, load_tokenizer

    model, tok = load_seq2seq(out), load_tokenizer(out)
    model.eval()
    enc = tok(["The following are multiple-choice questions.\nQuestion: What is the main export of X?"
               " A. salt B. tin\nExplanation:"], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert gen.shape[1] > 1
    assert tok.decode(gen[0], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def ddp_run(ray_session, synthetic_task, tiny_t5_dir, tmp_path_factory):
    return _fit(ray_session, synthetic_task, tiny_t5_dir, tmp_path_factory.mktemp("ddp"), "ddp_test")


@pytest.mark.timeout(420)
def test_ddp_two_workers_learn(ddp_run):
    result, out, run_path = ddp_run
    assert result["world"] == 2 and result["strategy"] == "ddp"
    assert result["samples_per_s"] > 0 and result["tokens_per_s"] > 0 and result["train_time_s"] > 0


@pytest.mark.timeout(420)
def test_ddp_worker_failure_resumes_at_exact_step(ddp_run):
    result, out, run_path = ddp_run
    log = _check_resumed_run(result, out, run_path)
    # steps after the resume keep the plan's epoch arithmetic (the data position is restored too)
    spe = result["steps_per_epoch"]
    assert spe < STEPS and [e["epoch"] for e in log] == [(e["step"] - 1) // spe for e in log]


@pytest.mark.timeout(420)
def test_ddp_export_loads_and_generates(ddp_run):
    _check_export_generates(ddp_run[1])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_zero2_trains_checkpoints_resumes_exports(ray_session, synthetic_task, tiny_t5_dir, tmp_path):
    """ZeRO-2 on the CPU accelerator over gloo with a torch AdamW. The first initialize JIT-builds
    DeepSpeed's shm comm op (~40 s, cached under TORCH_EXTENSIONS_DIR afterwards)."""
    result, out, run_path = _fit(ray_session, synthetic_task, tiny_t5_dir, tmp_path, "ds_test",
                                 strategy="deepspeed", zero_stage=2)
    assert result["strategy"] == "deepspeed" and result["world"] == 2
    _check_resumed_run(result, out, run_path)
    # every rank saved its own optimizer shard into the one checkpoint directory
    shards = os.listdir(os.path.join(run_path, "checkpoint_step00000030", "ds", "ckpt"))
    assert sum("optim_states" in f for f in shards) == 2, shards
    _check_export_generates(out)


@pytest.mark.timeout(420)
def test_one_worker_same_seed_same_loss_curve(ray_session, synthetic_task, tiny_t5_dir, tmp_path):
    """A seeded run reproduces: blocks reach the worker in a fixed order (DataConfig preserve_order), so
    the global shuffle and the batches are the same; another seed gives another order."""
    rows = oracle_examples(synthetic_task, "kard")
    # many blocks, tokenised by parallel tasks that finish in any order
    ds = tokenize_examples(ray_session.data.from_items(rows, override_num_blocks=16), tiny_t5_dir, 128, None)
    cfg = StudentConfig(num_workers=1, cpus_per_worker=1, batch_size=8, lr=3e-3, max_steps=12,
                        checkpoint_every_steps=0, log_every_steps=12)

    def curve(name: str, seed: int) -> list[float]:
        res = train(seq2seq_task(tiny_t5_dir), ds, cfg, str(tmp_path / name), str(tmp_path / "ckpt"), name,
                    {"init_model": tiny_t5_dir}, seed=seed, resume=False)
        return res["loss_curve"]

    a, b, c = curve("a", 0), curve("b", 0), curve("c", 1)
    assert len(a) == 12 and a == b, (a, b)
    assert a != c
