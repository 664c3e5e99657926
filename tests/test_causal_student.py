"""Decoder-only (causal) students: prompt + completion with the prompt masked out of the loss, trained by
the same core (in-process, LoRA, DDP with an exact resume) and read by the same `StudentGenerator` that
evaluation and Serve use."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kard_ray.config import LoraConfig, StudentConfig
from kard_ray.inference.formats import SOURCE_SUFFIX, encode_completions, encode_prompts
from kard_ray.inference.generator import StudentGenerator
from kard_ray.models import load_causal_lm, load_tokenizer
from kard_ray.training.core import train
from kard_ray.training.lora import lora_settings
from kard_ray.training.student import (CausalBuild, Seq2SeqCollate, causal_loss, count_completion_tokens,
                                       encode_causal_examples, student_task, tokenize_examples)
from oracle_examples import oracle_examples

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_prompt_tokens_are_masked_and_the_loss_reads_only_the_completion(synthetic_task, tiny_causal_dir):
    tok = load_tokenizer(tiny_causal_dir)
    rows = oracle_examples(synthetic_task, "kard")[:4]
    sources, targets = [r["source"] for r in rows], [r["target"] for r in rows]
    input_ids, labels = encode_causal_examples(tok, sources, targets, 128, None)
    prompts, completions = encode_prompts(tok, sources, 128), encode_completions(tok, targets)
    for x, y, p, c in zip(input_ids, labels, prompts, completions):
        assert x == p + c and len(y) == len(x)
        assert y[: len(p)] == [-100] * len(p) and y[len(p):] == c and c[-1] == tok.eos_token_id
        assert tok.decode(c, skip_special_tokens=True).strip() == targets[input_ids.index(x)].strip()
    batch = Seq2SeqCollate(tok.pad_token_id)({"input_ids": np.array(input_ids, dtype=object),
                                             "labels": np.array(labels, dtype=object)})
    assert count_completion_tokens(batch) == sum(len(c) for c in completions)
    model = load_causal_lm(tiny_causal_dir).eval()
    loss, n_tokens = causal_loss(model, batch, 0)
    assert int(n_tokens) == sum(len(x) for x in input_ids)
    # by hand: cross-entropy of every completion token given everything before it, and nothing else
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    terms = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        for t in range(len(p), len(p) + len(c)):
            terms.append(-torch.log_softmax(logits[i, t - 1], -1)[batch["input_ids"][i, t]])
    assert torch.allclose(loss.detach(), torch.stack(terms).mean(), atol=1e-5)
    # the prompt can say anything: only the completion's tokens are scored
    other = batch["labels"].clone()
    other[other == -100] = 5
    with torch.no_grad():
        unmasked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=other).loss
    assert not torch.allclose(unmasked, loss.detach())


def _squeeze(text: str) -> str:
    return "".join(text.split())


def test_a_chat_template_wraps_the_source_and_truncation_keeps_the_question_and_the_cue(tiny_causal_dir):
    tok = load_tokenizer(tiny_causal_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})  # as a chat model has
    tok.chat_template = CHATML
    head = "The following are multiple-choice questions.\nQuestion: What is the capital of Zorva? A. Pell B. Qua"
    source = head + "\nKnowledge: " + " ".join(["Zorva is a town by the sea."] * 60) + SOURCE_SUFFIX
    (full,) = encode_prompts(tok, [source], 4096)
    text = _squeeze(tok.decode(full))  # (the tiny byte-level BPE adds a space before each word)
    assert text.startswith("<|im_start|>user") and text.endswith("Explanation:<|im_end|><|im_start|>assistant")
    budget = len(encode_prompts(tok, [head + SOURCE_SUFFIX], 4096)[0]) + 20  # the question, the cue, 20 to spare
    (cut,) = encode_prompts(tok, [source], budget)
    assert len(cut) == budget < len(full)
    short = _squeeze(tok.decode(cut))
    assert _squeeze("Question: What is the capital of Zorva? A. Pell B. Qua") in short  # question, options intact
    assert short.endswith("Explanation:<|im_end|><|im_start|>assistant")  # the cue and the turn survive
    assert "Knowledge:Zorvaisatown" in short and short.count("Zorvaisatown") < 60  # the knowledge's end went
    target = "Zorva's capital is Pell.\nAnswer: A"
    (comp,) = encode_completions(tok, [target])  # after a template's turn: the target as it is, then EOS
    assert comp == tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _fit(ray, rows, init, tmp, name, fail_at=None, **cfg_kw):
    ds = tokenize_examples(ray.data.from_items(rows), init, 128, None).materialize()
    cfg = StudentConfig(batch_size=8, log_every_steps=5, **cfg_kw)
    model_config = {"init_model": init}
    if cfg.lora.r:
        model_config["lora"] = lora_settings(cfg.lora)
    out, storage = str(tmp / name), str(tmp / "ckpt")
    result = train(student_task(init), ds, cfg, out, storage, name, model_config, resume=False, fail_at_step=fail_at)
    return result, out


@pytest.mark.timeout(400)
def test_causal_student_learns_in_process_and_generates_as_evaluation_reads(ray_session, synthetic_task,
                                                                           tiny_causal_dir, tmp_path):
    rows = oracle_examples(synthetic_task, "kard")
    result, out = _fit(ray_session, rows, tiny_causal_dir, tmp_path, "causal", num_workers=0, lr=3e-3, max_steps=40)
    curve = result["loss_curve"]
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5, curve
    init, trained = load_causal_lm(tiny_causal_dir).state_dict(), load_causal_lm(out).state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    # StudentGenerator (evaluation's and Serve's reader) generates exactly what HF generate gives after the prompt
    qs = synthetic_task.test_questions[:6]
    gen = StudentGenerator(out, "synthetic", max_new_tokens=24, max_source_length=128)
    preds = gen.predict([q["question"] for q in qs], [q["options"] for q in qs], [None] * len(qs))
    model, tok = load_causal_lm(out).eval(), load_tokenizer(out)
    for q, p in zip(qs, preds):
        (ids,) = encode_prompts(tok, [gen.source(q["question"], q["options"], None)], 128)
        with torch.no_grad():
            o = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=24, do_sample=False)
        assert p.generation == tok.decode(o[0, len(ids):], skip_special_tokens=True).strip()
    assert any(p.generation for p in preds)
    # rank classification reads the causal student's own likelihoods: every question gets an option
    lik = StudentGenerator(out, "synthetic", max_new_tokens=24, max_source_length=128, score_by="likelihood")
    got = lik.predict([q["question"] for q in qs], [q["options"] for q in qs], [None] * len(qs))
    assert all(0 <= p.pred_index < len(q["options"]) for p, q in zip(got, qs))


@pytest.mark.timeout(400)
def test_lora_on_a_causal_student_moves_only_the_adapted_projections(ray_session, synthetic_task, tiny_causal_dir,
                                                                    tmp_path):
    rows = oracle_examples(synthetic_task, "kard")
    lora = LoraConfig(r=8, alpha=16.0)
    result, out = _fit(ray_session, rows, tiny_causal_dir, tmp_path, "lora", num_workers=0, lr=5e-3, max_steps=10,
                       lora=lora)
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))  # merged into a plain HF directory
    init, merged = load_causal_lm(tiny_causal_dir).state_dict(), load_causal_lm(out).state_dict()
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)
    assert isinstance(CausalBuild()({"init_model": tiny_causal_dir, "lora": lora_settings(lora)}).base_model,
                      torch.nn.Module)


@pytest.mark.timeout(600)
def test_causal_ddp_two_workers_resume_exactly(ray_session, synthetic_task, tiny_causal_dir, tmp_path):
    """2 DDP workers; the last worker fails at step 8, Ray Train restarts the group from the step-5
    checkpoint, and the run logs the same loss at every step and exports the same weights as a run never
    interrupted."""
    rows = oracle_examples(synthetic_task, "kard")
    kw = dict(num_workers=2, lr=3e-3, max_steps=12, checkpoint_every_steps=5, max_failures=1)
    failed, out_f = _fit(ray_session, rows, tiny_causal_dir, tmp_path, "failed", fail_at=8, **kw)
    clean, out_c = _fit(ray_session, rows, tiny_causal_dir, tmp_path, "clean", **kw)
    assert failed["world"] == 2 and os.path.exists(tmp_path / "ckpt" / "failed" / "fail_once_at_step_8.marker")
    log = [json.loads(x) for x in open(os.path.join(out_f, "train_log.jsonl"))]
    assert [e["step"] for e in log] == list(range(1, 13))
    assert failed["loss_curve"] == clean["loss_curve"]
    a, b = load_causal_lm(out_f).state_dict(), load_causal_lm(out_c).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pack_tokens", [100_000, 400])
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(synthetic_task, tiny_causal_dir, pack_tokens):
    """Packing (one row, or rows of up to 400 tokens) computes what the padded batch computes: the same
    loss, the same items counted, the same gradients -- no example attends across a boundary."""
    from kard_ray.training.student import CausalPackedCollate

    tok = load_tokenizer(tiny_causal_dir)
    rows = oracle_examples(synthetic_task, "kard")[:8]
    input_ids, labels = encode_causal_examples(tok, [r["source"] for r in rows], [r["target"] for r in rows], 128, None)
    raw = {"input_ids": np.array(input_ids, dtype=object), "labels": np.array(labels, dtype=object)}
    padded, packed = Seq2SeqCollate(tok.pad_token_id)(raw), CausalPackedCollate(tok.pad_token_id, pack_tokens)(raw)
    assert packed["input_ids"].shape[0] < 8 and packed["input_ids"].numel() < padded["input_ids"].numel()
    assert count_completion_tokens(packed) == count_completion_tokens(padded)
    model = load_causal_lm(tiny_causal_dir)
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, n_tokens = causal_loss(model, batch, 0)
        loss.backward()
        grads.append((loss.detach(), int(n_tokens), [p.grad.clone() for p in model.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = grads
    assert n1 == n2 == sum(len(x) for x in input_ids)
    assert torch.allclose(l1, l2, atol=1e-5), (l1, l2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))  # (with a KV cache on, transformers
    # would not read the packing and every example would attend to the ones before it: 10% off here)


@pytest.mark.timeout(300)
def test_token_exact_accumulation_and_packing_in_the_trainer(ray_session, synthetic_task, tiny_causal_dir, tmp_path):
    """One optimizer step of the core on 8 examples whose completions differ in length: batch 1 x
    accumulation 8, batch 8 x 1 and batch 8 packed give the same loss and the same weights (micro-batches
    are weighted by their completion tokens)."""
    from safetensors.torch import load_file

    rows = oracle_examples(synthetic_task, "kard")[:8]
    assert len({len(r["target"]) for r in rows}) > 1
    ds = tokenize_examples(ray_session.data.from_items(rows), tiny_causal_dir, 128, None).materialize()
    runs = {}
    for name, kw, pack in [("b1x8", dict(batch_size=1, grad_accum=8), 0), ("b8x1", dict(batch_size=8), 0),
                           ("b8packed", dict(batch_size=8), 4096)]:
        cfg = StudentConfig(num_workers=0, max_steps=1, lr=1e-3, max_grad_norm=None, log_every_steps=1, **kw)
        out = str(tmp_path / name)
        res = train(student_task(tiny_causal_dir, pack_tokens=pack), ds, cfg, out, str(tmp_path / "ckpt"), name,
                    {"init_model": tiny_causal_dir}, shuffle=False)
        runs[name] = (res["loss_curve"][0], load_file(os.path.join(out, "model.safetensors")))
    init = load_file(os.path.join(tiny_causal_dir, "model.safetensors"))
    loss, weights = runs["b8x1"]
    assert any(not torch.equal(weights[k], init[k]) for k in weights)
    for name in ("b1x8", "b8packed"):
        assert runs[name][0] == pytest.approx(loss, rel=1e-5), name
        for k in weights:
            torch.testing.assert_close(runs[name][1][k], weights[k], rtol=1e-4, atol=1e-6)
