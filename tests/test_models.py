"""Tiny offline models load through from_pretrained and run."""

import torch

from kard_ray.models import load_encoder, load_seq2seq, load_tokenizer


def test_tiny_t5_roundtrip_generates(tiny_t5_dir, synthetic_task):
    tok, model = load_tokenizer(tiny_t5_dir), load_seq2seq(tiny_t5_dir).eval()
    q = synthetic_task.test_questions[0]["question"]
    ids = tok(q).input_ids
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True).strip() == q
    entity = q.split()[-1].rstrip("?")
    assert len(tok.tokenize(" " + entity)) <= 3, "the task's tokenizer keeps entity names short (KARD.md §5)"
    out = model.generate(**tok([q], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] >= 2


def test_tiny_bert_pairs_have_token_types(tiny_bert_dir):
    tok, model = load_tokenizer(tiny_bert_dir), load_encoder(tiny_bert_dir).eval()
    batch = tok(["a question"], ["a passage text"], return_tensors="pt")
    assert "token_type_ids" in batch and batch["token_type_ids"].sum() > 0
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    assert h.shape == (1, batch["input_ids"].shape[1], model.config.hidden_size)
