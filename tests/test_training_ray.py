"""The trainer core under Ray Train with two workers: DDP (gloo) and DeepSpeed ZeRO-2 on CPU.

Each run is one `TorchTrainer.fit` (~25 s start-up here) in which the last worker raises once
mid-training: Ray Train restarts the group, the loop resumes from the last checkpoint at its exact
step (optimizer and scheduler included), finishes at the configured step count and exports.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kard_ray.config import StudentConfig
from kard_ray.training.core import train
from kard_ray.training.student import Seq2SeqValidate, seq2seq_task, tokenize_examples
from oracle_examples import oracle_examples, oracle_validation_rows

STEPS, CKPT_EVERY, FAIL_AT, KEEP = 30, 10, 15, 2
VALIDATE_EVERY = 5  # the DDP runs validate (and export their best step): across the resume at step 10 too


def _fit(ray, synthetic_task, tiny_t5_dir, tmp, name, fail_at=FAIL_AT, validate=False, **cfg_kw):
    rows = oracle_examples(synthetic_task, "kard")
    ds = tokenize_examples(ray.data.from_items(rows), tiny_t5_dir, 128, None).materialize()
    cfg = StudentConfig(num_workers=2, batch_size=8, lr=3e-3, max_steps=STEPS, checkpoint_every_steps=CKPT_EVERY,
                        keep_checkpoints=KEEP, max_failures=1, log_every_steps=10, **cfg_kw)
    out, storage = str(tmp / "model"), str(tmp / "ckpt")
    task, held = seq2seq_task(tiny_t5_dir), None
    if validate:  # the real validator (greedy decoding, answer reading) on each rank's share of the rows
        task = seq2seq_task(tiny_t5_dir, Seq2SeqValidate(tiny_t5_dir, "synthetic", "kard", 24, 128, "letter_or_text"))
        held = oracle_validation_rows(synthetic_task)
    result = train(task, ds, cfg, out, storage, name, {"init_model": tiny_t5_dir}, resume=False,
                   fail_at_step=fail_at, validation=held, validate_every=VALIDATE_EVERY if validate else 0)
    return result, out, os.path.join(storage, name)


def assert_same_weights(dir_a: str, dir_b: str) -> None:
    from kard_ray.models import load_seq2seq

    a, b = load_seq2seq(dir_a).state_dict(), load_seq2seq(dir_b).state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


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
    return _fit(ray_session, synthetic_task, tiny_t5_dir, tmp_path_factory.mktemp("ddp"), "ddp_test", validate=True)


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


@pytest.mark.timeout(900)
def test_ddp_interrupted_and_resumed_equals_uninterrupted(ddp_run, ray_session, synthetic_task, tiny_t5_dir,
                                                          tmp_path):
    """Exact resume on 2 workers: the run killed at step 15 and resumed from its step-10 checkpoint logs the
    same loss at every step, the same validation accuracies, and exports the same (best-validating) weights
    (torch.equal) as the same run never interrupted."""
    result, out, _ = ddp_run
    clean, clean_out, clean_path = _fit(ray_session, synthetic_task, tiny_t5_dir, tmp_path, "ddp_clean", fail_at=None,
                                        validate=True)
    assert not any(f.endswith(".marker") for f in os.listdir(clean_path))
    assert result["loss_curve"] == clean["loss_curve"]
    assert_same_weights(out, clean_out)
    # validation (each rank decodes its share, summed) saw the same accuracies, and both exported the same
    # best step: the best weights so far travel with the step-10 checkpoint the interrupted run resumed from
    summaries = [json.load(open(os.path.join(d, "train_summary.json"))) for d in (out, clean_out)]
    assert summaries[0]["val_accuracy"] == summaries[1]["val_accuracy"]
    assert set(summaries[0]["val_accuracy"]) == {str(s) for s in range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY)}
    assert summaries[0]["exported_step"] == summaries[1]["exported_step"]


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


@pytest.mark.timeout(900)
def test_one_worker_same_seed_same_loss_curve_and_exact_resume(ray_session, synthetic_task, tiny_t5_dir, tmp_path):
    """A seeded run reproduces: blocks reach the worker in a fixed order (DataConfig preserve_order), so
    the global shuffle and the batches are the same. The same run killed two steps after its checkpoint,
    in the second epoch (whose order is its own), and resumed from that checkpoint logs the same loss at
    every step and ends with identical weights. (That another seed gives another order is
    test_training_core's, and a new seed retraining through the CLI is test_retrain's.)"""
    rows = oracle_examples(synthetic_task, "kard")[:96]  # 12 steps an epoch: three short runs, not three long ones
    # many blocks, tokenised by parallel tasks that finish in any order
    ds = tokenize_examples(ray_session.data.from_items(rows, override_num_blocks=16), tiny_t5_dir, 128, None)
    n = ds.count()
    spe = n // 8
    steps = spe + 6  # into the second epoch
    cfg = StudentConfig(num_workers=1, cpus_per_worker=1, batch_size=8, lr=3e-3, max_steps=steps,
                        checkpoint_every_steps=spe + 2, log_every_steps=1, max_failures=1)

    def run(name: str, seed: int, fail_at=None) -> dict:
        return train(seq2seq_task(tiny_t5_dir), ds, cfg, str(tmp_path / name), str(tmp_path / "ckpt"), name,
                     {"init_model": tiny_t5_dir}, seed=seed, resume=False, fail_at_step=fail_at)

    a, b = run("a", 0), run("b", 0, fail_at=spe + 4)
    assert os.path.exists(tmp_path / "ckpt" / "b" / f"fail_once_at_step_{spe + 4}.marker")
    assert len(a["loss_curve"]) == steps and a["loss_curve"] == b["loss_curve"], (a["loss_curve"], b["loss_curve"])
    assert_same_weights(str(tmp_path / "a"), str(tmp_path / "b"))


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_deepspeed_zero0_bf16_exports_fp32_master_weights(ray_session, synthetic_task, tiny_t5_dir, tmp_path):
    """bf16 + ZeRO-0: the module trains in bf16 while BF16_Optimizer keeps fp32 masters; the export must be
    the masters. After real updates they are not all representable in bf16 (bf16-rounded ones would be)."""
    import torch

    from kard_ray.models import load_seq2seq

    rows = oracle_examples(synthetic_task, "kard")
    ds = tokenize_examples(ray_session.data.from_items(rows), tiny_t5_dir, 128, None).materialize()
    cfg = StudentConfig(num_workers=1, use_gpu=True, strategy="deepspeed", zero_stage=0, bf16=True, batch_size=8,
                        lr=3e-3, max_steps=6, log_every_steps=6)
    out = str(tmp_path / "model")
    train(seq2seq_task(tiny_t5_dir), ds, cfg, out, str(tmp_path / "ckpt"), "bf16_z0", {"init_model": tiny_t5_dir},
          resume=False)
    weights = [p.detach() for p in load_seq2seq(out).parameters()]
    assert all(w.dtype == torch.float32 for w in weights)
    assert any(bool((w != w.bfloat16().float()).any()) for w in weights), "exported weights are bf16-rounded"
