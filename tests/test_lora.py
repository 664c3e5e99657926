"""LoRA (peft) students on the trainer core: only the adapters train, the export merges them into plain
weights, and the merged model computes what the adapted one did. Two Ray Train workers under DDP here;
the DeepSpeed path is the MiniLM reranker's test (test_reranker.py)."""

from __future__ import annotations

import os

import pytest
import torch

from kard_ray.config import LoraConfig, StudentConfig
from kard_ray.inference.generator import StudentGenerator
from kard_ray.models import load_seq2seq, load_tokenizer
from kard_ray.training.core import train
from kard_ray.training.lora import lora_settings
from kard_ray.training.student import Seq2SeqBuild, seq2seq_task, tokenize_examples
from oracle_examples import oracle_examples

STEPS = 12


@pytest.mark.timeout(400)
def test_lora_student_on_two_ddp_workers_trains_adapters_and_exports_them_merged(
        ray_session, synthetic_task, tiny_t5_dir, tmp_path):
    import ray

    rows = oracle_examples(synthetic_task, "kard")
    ds = tokenize_examples(ray.data.from_items(rows), tiny_t5_dir, 128, None).materialize()
    lora = LoraConfig(r=8, alpha=16.0)
    cfg = StudentConfig(num_workers=2, batch_size=8, lr=5e-3, max_steps=STEPS, checkpoint_every_steps=STEPS,
                        log_every_steps=4, max_failures=0, lora=lora)
    model_config = {"init_model": tiny_t5_dir, "lora": lora_settings(lora)}
    out, storage = str(tmp_path / "model"), str(tmp_path / "ckpt")
    result = train(seq2seq_task(tiny_t5_dir), ds, cfg, out, storage, "lora_student", model_config, resume=False)
    curve = result["loss_curve"]
    assert result["steps"] == STEPS and result["world"] == 2
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve

    # the export is a plain HF directory (adapters merged, no adapter files)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    init, merged = load_seq2seq(tiny_t5_dir).state_dict(), load_seq2seq(out).state_dict()
    assert init.keys() == merged.keys()
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    # T5's default LoRA targets are the attention's q and v projections: they moved, nothing else did
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed), sorted(changed)[:5]
    assert any(".q.weight" in k for k in changed) and any(".v.weight" in k for k in changed)

    # merging is exact: the adapted model of the final checkpoint and the merged export give the same logits
    adapted = Seq2SeqBuild()(model_config)
    ckpt = os.path.join(storage, "lora_student", f"checkpoint_step{STEPS:08d}", "state.pt")
    adapted.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    tok = load_tokenizer(out)
    enc = tok([r["source"] for r in rows[:4]], return_tensors="pt", padding=True)
    labels = tok([r["target"] for r in rows[:4]], return_tensors="pt", padding=True)["input_ids"]
    exported = load_seq2seq(out).eval()
    with torch.no_grad():
        a = adapted.eval()(**enc, decoder_input_ids=labels).logits
        b = exported(**enc, decoder_input_ids=labels).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

    # and it loads where evaluation and Serve load students, reading the same answers as the adapted model
    qs = synthetic_task.test_questions[:6]
    args = ([q["question"] for q in qs], [q["options"] for q in qs], [None] * len(qs))
    loaded = StudentGenerator(out, "synthetic", max_new_tokens=16).predict(*args)
    wrapped = StudentGenerator.wrap(adapted, tok, "synthetic", 16).predict(*args)
    assert [p.generation for p in loaded] == [p.generation for p in wrapped]
