"""The verifier filter: a language model reads question + rationale + "So, the answer is" and the
logits of the option letters decide which answer the rationale leads to (KARD.md §1: the authors
used Flan-T5-large). Any HF model by name or path: a seq2seq model is scored on its first decoder
step, a causal LM on the next token after the prompt.

With `teacher.filter=verifier` every rationale is scored; with `filter=parse` and a
`verifier_model`, only rationales the parser could not read are.
"""

from __future__ import annotations

import pyarrow as pa

from kard_ray.teacher.prompts import LETTERS, format_options

VERIFIER_SUFFIX = "So, the answer is"


def verifier_input(question: str, options: list[str], rationale: str) -> str:
    return (f"{question}\n{format_options(list(options))}\nAnswer: Let's think step by step. "
            f"{rationale.strip()}\n{VERIFIER_SUFFIX}")


class Verifier:
    """Scores option letters after "So, the answer is"; `predict` returns option indices."""

    def __init__(self, name_or_path: str, max_length: int = 512, device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.seq2seq = bool(getattr(AutoConfig.from_pretrained(name_or_path), "is_encoder_decoder", False))
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        # Long rationales lose their beginning, never the "So, the answer is" the letters follow.
        self.tok.truncation_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if not self.seq2seq:
            self.tok.padding_side = "left"
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = cls.from_pretrained(name_or_path).to(self.device).eval()
        self.max_length = max_length
        self.letter_ids = self._letter_ids(name_or_path)

    def _letter_ids(self, name: str) -> list[int]:
        """One vocabulary id per letter: the first piece of "A" (e.g. "▁A"), else its last piece."""
        pieces = [self.tok.encode(letter, add_special_tokens=False) for letter in LETTERS]
        for pick in (0, -1):
            ids = [p[pick] for p in pieces if p]
            if len(ids) == len(LETTERS) and len(set(ids)) == len(ids):
                return ids
        raise ValueError(f"verifier {name!r}: its tokenizer does not give the option letters A-J distinct tokens")

    def predict(self, questions: list[str], options: list[list[str]], rationales: list[str]) -> list[int]:
        import torch

        texts = [verifier_input(q, o, r) for q, o, r in zip(questions, options, rationales)]
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_length).to(self.device)
        with torch.no_grad():
            if self.seq2seq:
                start = self.model.config.decoder_start_token_id
                dec = torch.full((len(texts), 1), start, dtype=torch.long, device=self.device)
                logits = self.model(**enc, decoder_input_ids=dec).logits[:, 0, :]
            else:
                logits = self.model(**enc).logits[:, -1, :]
        scores = logits[:, self.letter_ids].float().cpu()
        out = []
        for i, o in enumerate(options):
            out.append(int(scores[i, : len(o)].argmax()))
        return out


class VerifierUDF:
    """Ray Data actor: fills `consistent` for the rows flagged `needs_verifier`."""

    def __init__(self, model: str, batch_size: int = 16):
        self.verifier = Verifier(model)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["needs_verifier"]]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            preds = self.verifier.predict([rows[i]["question"] for i in idx], [rows[i]["options"] for i in idx],
                                          [rows[i]["text"] for i in idx])
            for i, p in zip(idx, preds):
                rows[i]["consistent"] = p == rows[i]["answer"]
                rows[i]["verifier_answer"] = p
        return pa.Table.from_pylist(rows, schema=batch.schema)


def verifier_stage_kwargs(cfg) -> dict:
    """Actor pool settings: the verifier shares the `teacher.hf` local-model actor settings."""
    import ray

    h = cfg.teacher.hf
    kw = dict(fn_constructor_kwargs=dict(model=cfg.teacher.verifier_model, batch_size=h.batch_size),
              compute=ray.data.ActorPoolStrategy(size=h.num_actors), batch_format="pyarrow",
              num_cpus=min(h.num_cpus_per_actor, 1.0))
    if h.num_gpus_per_actor > 0:
        kw["num_gpus"] = h.num_gpus_per_actor
    return kw
