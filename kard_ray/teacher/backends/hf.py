"""`hf` backend: a local transformers model generating in a Ray Data actor pool (CPU or GPU).

Seq2seq (T5) and causal LMs both work: the architecture is read from the model's config. A model
with a chat template gets the messages through it; one without gets them flattened
(`prompts.render_plain`). Every question of a batch asks for as many samples as the neediest one
(num_return_sequences), the extra ones being dropped: questions of one run normally need the same
number of samples.
"""

from __future__ import annotations

import pyarrow as pa

from kard_ray.teacher.backends.common import gen_row, messages_of, stable_seed, to_table
from kard_ray.teacher.prompts import render_plain


class HFGenerateUDF:
    """Ray Data actor: question rows -> one row per requested sample."""

    def __init__(self, model: str, max_new_tokens: int, temperature: float, seed: int = 0,
                 max_input_tokens: int = 1024):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.name = model
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.seq2seq = bool(getattr(AutoConfig.from_pretrained(model), "is_encoder_decoder", False))
        self.tok = AutoTokenizer.from_pretrained(model)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if not self.seq2seq:
            self.tok.padding_side = "left"  # generation continues from the right end
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = cls.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.max_input_tokens = max_input_tokens

    def _prompt(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def _count_new_tokens(self, ids) -> int:
        n = 0
        for t in ids.tolist():
            if t == self.tok.eos_token_id:
                return n + 1
            if t == self.tok.pad_token_id and not (self.tok.pad_token_id == self.tok.eos_token_id):
                continue
            n += 1
        return n

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch
        from transformers import set_seed

        rows = batch.to_pylist()
        k = max(len(r["samples"]) for r in rows)
        prompts = [self._prompt(messages_of(r)) for r in rows]
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_input_tokens).to(self.device)
        # Seeded by the batch's first question: a rerun of the same batch samples the same texts.
        set_seed(stable_seed(self.seed, rows[0]["question_id"], int(rows[0]["samples"][0])))
        sample = self.temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, num_return_sequences=k, do_sample=sample,
                temperature=self.temperature if sample else None, top_k=0 if sample else None,
                pad_token_id=self.tok.pad_token_id)
        new = out if self.seq2seq else out[:, enc["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        result = []
        for i, r in enumerate(rows):
            for j, s in enumerate(r["samples"]):
                idx = i * k + j
                result.append(gen_row(r, s, texts[idx].strip(), self.name,
                                      prompt_tokens=int(prompt_lens[i]) if j == 0 else 0,
                                      completion_tokens=self._count_new_tokens(new[idx])))
        return to_table(result)


def hf_stage_kwargs(cfg) -> dict:
    import ray

    h = cfg.teacher.hf
    kw = dict(
        fn_constructor_kwargs=dict(model=cfg.teacher.model, max_new_tokens=cfg.teacher.max_tokens,
                                   temperature=cfg.teacher.temperature, seed=cfg.seed),
        compute=ray.data.ActorPoolStrategy(size=h.num_actors),
        batch_size=h.batch_size, batch_format="pyarrow", num_cpus=h.num_cpus_per_actor,
    )
    if h.num_gpus_per_actor > 0:
        kw["num_gpus"] = h.num_gpus_per_actor
    return kw
