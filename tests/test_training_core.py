"""The trainer core in-process (num_workers=0: Ray Train's local mode, no worker start-up).

The multi-worker runs (DDP, DeepSpeed, restarts) are in test_training_ray.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kard_ray.config import LoraConfig, StudentConfig
from kard_ray.training.core import make_plan, train
from kard_ray.training.optim import lr_lambda
from kard_ray.training.student import seq2seq_task, tokenize_examples
from oracle_examples import oracle_examples


def test_lr_schedules():
    const = lr_lambda("constant", 0, 100)
    assert [const(s) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    warm = lr_lambda("constant", 4, 100)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = lr_lambda("linear", 10, 110)
    assert lin(0) == pytest.approx(0.1) and lin(9) == pytest.approx(1.0)
    assert lin(10) == pytest.approx(1.0) and lin(60) == pytest.approx(0.5) and lin(110) == 0.0
    cos = lr_lambda("cosine", 10, 110)
    assert cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(35) == pytest.approx(0.5 * (1 + 2 ** -0.5)) and cos(110) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda("step", 0, 10)(0)


def test_the_default_schedule_warms_up_on_a_share_of_the_steps_then_decays():
    from kard_ray.training.optim import build_scheduler, warmup_steps

    cfg = StudentConfig(lr=1e-3)  # defaults: cosine, warmup_ratio 0.05
    assert (cfg.schedule, warmup_steps(cfg, 1000), warmup_steps(cfg, 10)) == ("cosine", 50, 1)
    assert warmup_steps(StudentConfig(warmup_steps=7), 1000) == 7
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched, lrs = build_scheduler(opt, cfg, 1000), []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 50) and max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 49
    assert lrs[-1] < 1e-6 and all(a >= b for a, b in zip(lrs[49:], lrs[50:]))


def test_plan_counts_full_micro_batches_per_rank():
    cfg = StudentConfig(num_workers=2, batch_size=4, grad_accum=2, epochs=3)
    plan = make_plan(cfg, 100, {"m": 1})
    # 50 rows per rank -> 12 full micro-batches -> 6 steps per epoch
    assert (plan.rows_per_rank, plan.micro_per_epoch, plan.steps_per_epoch, plan.total_steps) == (50, 12, 6, 18)
    assert plan.samples_per_step == 16 and plan.epoch_checkpoints
    assert make_plan(StudentConfig(num_workers=2, batch_size=4, max_steps=7), 100, {}).total_steps == 7
    with pytest.raises(ValueError, match="too small"):
        make_plan(cfg, 15, {})


def test_weight_fingerprint_changes_with_every_weight_input_and_only_those(tmp_path):
    import dataclasses

    from kard_ray.training.core import describe_change, fingerprint_of, tree_digest, weight_inputs

    cfg = StudentConfig(num_workers=2, batch_size=4)
    base = weight_inputs(cfg, {"init_model": "m"}, 0, 100, "d1")
    fp = fingerprint_of(base)
    changed = [weight_inputs(dataclasses.replace(cfg, lr=cfg.lr * 2), {"init_model": "m"}, 0, 100, "d1"),
               weight_inputs(dataclasses.replace(cfg, n_knowledge=2), {"init_model": "m"}, 0, 100, "d1"),
               weight_inputs(cfg, {"init_model": "m2"}, 0, 100, "d1"), weight_inputs(cfg, {"init_model": "m"}, 1, 100, "d1"),
               weight_inputs(cfg, {"init_model": "m"}, 0, 101, "d1"), weight_inputs(cfg, {"init_model": "m"}, 0, 100, "d2"),
               weight_inputs(dataclasses.replace(cfg, cpu_bf16=True), {"init_model": "m"}, 0, 100, "d1"),
               weight_inputs(dataclasses.replace(cfg, lora=LoraConfig(r=8)), {"init_model": "m"}, 0, 100, "d1"),
               weight_inputs(dataclasses.replace(cfg, lora=LoraConfig(r=8, alpha=32)), {"init_model": "m"}, 0, 100, "d1")]
    assert len({fingerprint_of(c) for c in changed} | {fp}) == len(changed) + 1
    same = weight_inputs(dataclasses.replace(cfg, log_every_steps=3, keep_checkpoints=5), {"init_model": "m"}, 0, 100, "d1")
    assert fingerprint_of(same) == fp  # logging and retention do not change the weights
    assert describe_change(base, changed[3]) == "config changed (seed 0 -> 1)"
    # init model digest: the files' content, whatever their names' order; a changed file changes it
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(b"1")
    (d / "b.json").write_text("{}")
    first = tree_digest(str(d))
    assert weight_inputs(cfg, {"init_model": str(d)}, 0, 100, None)["init model files"] == first
    (d / "a.bin").write_bytes(b"2")
    assert tree_digest(str(d)) != first and tree_digest(str(tmp_path / "missing")) is None


def test_deepspeed_needs_ray_train_workers():
    with pytest.raises(ValueError, match="num_workers >= 1"):
        train(None, None, StudentConfig(strategy="deepspeed", num_workers=0), "/tmp/x", "/tmp/y", "n", {})


@pytest.fixture(scope="module")
def examples(synthetic_task):
    return oracle_examples(synthetic_task, "kard")


def _dataset(ray, rows, tiny_t5_dir):
    return tokenize_examples(ray.data.from_items(rows), tiny_t5_dir, 128, None).materialize()


def _run(ds, tiny_t5_dir, tmp, name, task=None, **cfg_kw):
    cfg = StudentConfig(num_workers=0, **cfg_kw)
    out = str(tmp / name)
    res = train(task or seq2seq_task(tiny_t5_dir), ds, cfg, out, str(tmp / "ckpt"), name, {"init_model": tiny_t5_dir},
                shuffle=False)
    return res, out


def _weights(out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.timeout(300)
def test_grad_accumulation_invariance(ray_session, examples, tiny_t5_dir, tmp_path):
    """trl-style: batch 1 × accumulation 8 == batch 8 × 1 (loss, grad norm and weights after a step).

    The 8 targets differ in length, so this holds only because micro-batches are weighted by their
    target tokens; the control run weights them equally (count_fn=None) and must differ.
    """
    rows = examples[:8]
    lengths = {len(r["target"]) for r in rows}
    assert len(lengths) > 1, "the check needs targets of different lengths"
    common = dict(max_steps=1, lr=1e-3, max_grad_norm=None, log_every_steps=1)
    ds = _dataset(ray_session, rows, tiny_t5_dir)
    a, out_a = _run(ds, tiny_t5_dir, tmp_path, "b1x8", batch_size=1, grad_accum=8, **common)
    b, out_b = _run(ds, tiny_t5_dir, tmp_path, "b8x1", batch_size=8, grad_accum=1, **common)
    log_a = [json.loads(x) for x in open(os.path.join(out_a, "train_log.jsonl"))]
    log_b = [json.loads(x) for x in open(os.path.join(out_b, "train_log.jsonl"))]
    assert a["loss_curve"][0] == pytest.approx(b["loss_curve"][0], rel=1e-5)
    assert log_a[0]["grad_norm"] == pytest.approx(log_b[0]["grad_norm"], rel=1e-4)
    wa, wb = _weights(out_a), _weights(out_b)
    init = _weights(tiny_t5_dir)
    moved = 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(wa[k], init[k]))
    assert moved > 0, "the step did not change the weights"

    # The same numbers computed by hand on the initial model: the step's loss is the token mean...
    losses, tokens = _per_example_losses(tiny_t5_dir, rows)
    token_mean = sum(l * n for l, n in zip(losses, tokens)) / sum(tokens)
    row_mean = sum(losses) / len(losses)
    assert b["loss_curve"][0] == pytest.approx(token_mean, rel=1e-5)
    assert abs(token_mean - row_mean) > 1e-4 * token_mean  # else the control below could not fail

    # ...and the control (micro-batches weighted equally, count_fn=None) gives the row mean instead
    task = seq2seq_task(tiny_t5_dir)
    task.count_fn = None
    c, _ = _run(ds, tiny_t5_dir, tmp_path, "b1x8_rows", task=task, batch_size=1, grad_accum=8, **common)
    assert c["loss_curve"][0] == pytest.approx(row_mean, rel=1e-5)


def _per_example_losses(model_dir: str, rows: list[dict]) -> tuple[list[float], list[int]]:
    from kard_ray.models import load_seq2seq
    from kard_ray.inference.formats import encode_sources
    from kard_ray.training.student import _tokenizer, encode_targets

    tok, model = _tokenizer(model_dir), load_seq2seq(model_dir)
    src = encode_sources(tok, [r["source"] for r in rows], 128)
    tgt = encode_targets(tok, [r["target"] for r in rows])
    losses = []
    with torch.no_grad():
        for x, y in zip(src, tgt):
            losses.append(float(model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss))
    return losses, [len(y) for y in tgt]


@pytest.mark.timeout(300)
def test_in_process_loop_logs_every_step_and_learns(ray_session, examples, tiny_t5_dir, tmp_path):
    ds = _dataset(ray_session, examples, tiny_t5_dir)
    res, out = _run(ds, tiny_t5_dir, tmp_path, "inproc", batch_size=8, grad_accum=2, max_steps=24, lr=3e-3,
                    schedule="linear", warmup_steps=4, log_every_steps=5, checkpoint_every_steps=5)
    log = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log] == list(range(1, 25))
    assert log[0]["lr"] == pytest.approx(3e-3 / 4) and log[3]["lr"] == pytest.approx(3e-3)
    assert log[-1]["lr"] == pytest.approx(3e-3 / 20)  # linear decay: (24 - 23) / (24 - 4)
    curve = res["loss_curve"]
    assert sum(curve[-4:]) / 4 < 0.75 * sum(curve[:4]) / 4, curve
    assert res["steps"] == 24 and res["samples_per_s"] > 0 and res["tokens_per_s"] > 0
    assert "mfu" not in res  # MFU only on GPU
    # in-process: no checkpoint I/O (nothing could restart from it)
    assert not (tmp_path / "ckpt" / "inproc").exists() or not list((tmp_path / "ckpt" / "inproc").glob("checkpoint_*"))
    from kard_ray.models import load_seq2seq, load_tokenizer

    assert load_seq2seq(out) is not None and load_tokenizer(out).pad_token_id == 0


@pytest.mark.timeout(300)
def test_cpu_bf16_autocast_trains_fp32_weights_in_bf16_arithmetic(ray_session, examples, tiny_t5_dir, tmp_path):
    """cpu_bf16: the forward passes run in bf16 (the loss curve moves off fp32's from the first step, by
    bf16's rounding, not more) while the exported weights stay fp32 and learn."""
    from kard_ray.training.engines import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16: cpu_bf16 falls back to fp32")
    ds = _dataset(ray_session, examples[:64], tiny_t5_dir)
    kw = dict(batch_size=8, max_steps=12, lr=3e-3, log_every_steps=1)
    fp32, fp32_out = _run(ds, tiny_t5_dir, tmp_path, "fp32", **kw)
    bf16, bf16_out = _run(ds, tiny_t5_dir, tmp_path, "bf16", cpu_bf16=True, **kw)
    a, b = fp32["loss_curve"], bf16["loss_curve"]
    assert a[0] != b[0] and abs(a[0] - b[0]) < 0.02 * a[0], (a[0], b[0])
    assert sum(b[-3:]) / 3 < 0.8 * sum(b[:3]) / 3, b
    weights = _weights(bf16_out)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, _weights(fp32_out)[k]) for k, w in weights.items())


class _RecordOrder:
    """loss_fn that appends each micro-batch's row ids to a file (the loop may run in a copy of it)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, model, batch, step):
        with open(self.path, "a") as fh:
            fh.write(" ".join(str(int(i)) for i in batch["idx"]) + "\n")
        return model(batch["x"]).pow(2).mean(), 0


class _IdxCollate:
    def __call__(self, batch):
        return {"idx": torch.as_tensor(batch["idx"]), "x": torch.as_tensor(batch["x"], dtype=torch.float32)[:, None]}


class _Linear:
    def __call__(self, model_config):
        return torch.nn.Linear(1, 1)


class _SaveState:
    def __call__(self, model, directory):
        torch.save(model.state_dict(), f"{directory}/model.pt")


@pytest.mark.timeout(300)
def test_each_epoch_sees_its_own_seeded_order(ray_session, tmp_path):
    """Every epoch is a full new permutation of the rows, seeded by (seed, epoch): reproducible, different
    between epochs and between seeds."""
    from kard_ray.training.core import TrainTask

    ds = ray_session.data.from_items([{"idx": i, "x": float(i)} for i in range(64)], override_num_blocks=4)
    cfg = StudentConfig(num_workers=0, batch_size=8, epochs=3, lr=1e-3, log_every_steps=8)

    def epochs(name: str, seed: int) -> list[list[int]]:
        log = tmp_path / f"{name}.txt"
        task = TrainTask(build_model=_Linear(), loss_fn=_RecordOrder(str(log)), collate_fn=_IdxCollate(),
                         export_fn=_SaveState())
        train(task, ds, cfg, str(tmp_path / name), str(tmp_path / "ckpt"), name, {}, seed=seed, resume=False)
        rows = [int(x) for line in log.read_text().split("\n") if line for x in line.split()]
        return [rows[i * 64:(i + 1) * 64] for i in range(3)]

    a, b, c = epochs("a", 0), epochs("b", 0), epochs("c", 1)
    assert all(sorted(e) == list(range(64)) for e in a)  # each epoch sees every row once
    assert a[0] != a[1] != a[2] and a[0] != a[2]  # a new order every epoch
    assert a == b and a != c  # seeded: reproducible, and another seed gives other orders


class _PeaksAt:
    """A validation metric that peaks at one call (the score the trainer must select by; which step
    is best is what this test decides, so the metric is given, the selection and export are real)."""

    def __init__(self, peak_call: int):
        self.peak_call, self.calls = peak_call, 0

    def __call__(self, model, rows):
        self.calls += 1
        return len(rows) - abs(self.calls - self.peak_call), len(rows)


@pytest.mark.timeout(300)
def test_validation_exports_the_best_step_not_the_last(ray_session, examples, tiny_t5_dir, tmp_path):
    """Validated every 4 steps of 16, best at step 8: the export equals the same run stopped at step 8 (and
    not its last step); the log carries val_accuracy at 4, 8, 12, 16 and the summary names step 8."""
    import dataclasses

    ds = _dataset(ray_session, examples, tiny_t5_dir)
    kw = dict(batch_size=8, max_steps=16, lr=3e-3, log_every_steps=4, schedule="constant")  # a run stopped at 8 = the first 8 steps
    rows = [{"question": f"q{i}"} for i in range(10)]
    task = dataclasses.replace(seq2seq_task(tiny_t5_dir), validate_fn=_PeaksAt(peak_call=2))
    cfg = StudentConfig(num_workers=0, **kw)
    out = str(tmp_path / "validated")
    res = train(task, ds, cfg, out, str(tmp_path / "ckpt"), "validated", {"init_model": tiny_t5_dir}, shuffle=False,
                validation=rows, validate_every=4)
    _, at8 = _run(ds, tiny_t5_dir, tmp_path, "stop8", **dict(kw, max_steps=8))
    _, at16 = _run(ds, tiny_t5_dir, tmp_path, "stop16", **kw)
    best = _weights(out)
    assert all(torch.equal(best[k], _weights(at8)[k]) for k in best)
    assert any(not torch.equal(best[k], _weights(at16)[k]) for k in best)
    log = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))]
    assert {e["step"]: e["val_accuracy"] for e in log if "val_accuracy" in e} == {4: 0.9, 8: 1.0, 12: 0.9, 16: 0.8}
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert summary["exported_step"] == 8 and summary["best_val_accuracy"] == 1.0 and res["steps"] == 16
    with pytest.raises(ValueError, match="validate_fn"):
        train(seq2seq_task(tiny_t5_dir), ds, cfg, out, str(tmp_path / "ckpt"), "x", {"init_model": tiny_t5_dir},
              validation=rows, validate_every=4)
