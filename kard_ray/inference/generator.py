"""The student at inference: one object shared by batch evaluation (Ray Data actors) and Serve.

Sharing it is what makes "same answer as offline" true by construction: the Serve `Generator`
deployment and the evaluation actors format the source, decode and read the answer with the same code.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from kard_ray.inference.formats import encode_sources, format_source

LETTERS = "ABCDEFGHIJ"


@dataclass
class Prediction:
    generation: str  # the first (greedy: only) generation
    pred_index: int  # -1 when no answer could be read
    pred_letter_index: int
    pred_text_index: int
    votes: list[int]


def choose(parsed: dict, score_by: str) -> int:
    """The option index a parsed generation stands for under `eval.score_by` (-1: none)."""
    letter, text = parsed.get("letter"), parsed.get("text")
    if score_by == "letter":
        idx = letter
    elif score_by == "text":
        idx = text
    else:
        idx = letter if letter is not None else text
    return -1 if idx is None else int(idx)


def question_key(question: str, options) -> str:
    """What identifies a question to the sampler: its text and options (Serve has no question id)."""
    return "\x1f".join([question, *options])


def sample_seed(seed: int, key: str, sample: int) -> int:
    """The RNG seed of one self-consistency sample: a hash of (seed, question, sample index)."""
    digest = hashlib.blake2b(f"{seed}\x1f{sample}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def majority(votes: list[int]) -> int:
    """Self-consistency vote over readable answers; ties go to the earliest sample's answer."""
    readable = [v for v in votes if v >= 0]
    if not readable:
        return -1
    counts = Counter(readable)
    best = max(counts.values())
    return next(v for v in readable if counts[v] == best)


class StudentGenerator:
    """Loads a `save_pretrained` student once; turns (question, options, passages) into predictions."""

    def __init__(self, model_dir: str, dataset: str, max_new_tokens: int = 128, decoding: str = "greedy",
                 n_votes: int = 1, temperature: float = 0.7, max_source_length: int = 512,
                 score_by: str = "letter_or_text", seed: int = 0, device: str | None = None):
        import torch

        from kard_ray.models import load_seq2seq, load_tokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_seq2seq(model_dir).to(self.device).eval()
        self.dataset = dataset
        self.max_new_tokens = max_new_tokens
        self.decoding = decoding
        self.n_votes = n_votes if decoding == "sample" else 1
        self.temperature = temperature
        self.max_source_length = max_source_length
        self.score_by = score_by
        self.seed = seed

    def source(self, question: str, options: list[str], passages: list[str] | None) -> str:
        return format_source(question, list(options), passages, self.dataset)

    def generate(self, sources: list[str], keys: list[str] | None = None) -> list[list[str]]:
        """`n_votes` generations per source (one when greedy).

        Sampling is seeded per question — by (seed, key, sample index), key defaulting to the source
        text — and each question is decoded on its own, so its votes never depend on which other
        questions share the batch: offline evaluation and Serve draw the same samples."""
        # Truncate exactly as training did (the middle goes, the "Explanation:" cue stays).
        ids = encode_sources(self.tokenizer, sources, self.max_source_length)
        if self.decoding != "sample":
            return self._decode(ids, dict(do_sample=False, num_beams=1))
        out = []
        for i, row in enumerate(ids):
            key = (keys[i] if keys is not None else sources[i])
            samples = []
            for j in range(self.n_votes):
                self.torch.manual_seed(sample_seed(self.seed, key, j))
                samples += self._decode([row], dict(do_sample=True, temperature=self.temperature))[0]
            out.append(samples)
        return out

    def _decode(self, ids: list[list[int]], kw: dict) -> list[list[str]]:
        """One generation per row of token ids, as [[text], ...]."""
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, **kw)
        return [[t.strip()] for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def predict(self, questions: list[str], options: list[list[str]], passages: list[list[str] | None]) -> list[Prediction]:
        from kard_ray.teacher import parse_prediction

        sources = [self.source(q, o, p) for q, o, p in zip(questions, options, passages)]
        keys = [question_key(q, o) for q, o in zip(questions, options)]
        preds = []
        for opts, gens in zip(options, self.generate(sources, keys)):
            parsed = [parse_prediction(g, list(opts)) for g in gens]
            votes = [choose(p, self.score_by) for p in parsed]
            first = parsed[0]
            preds.append(Prediction(
                generation=gens[0], pred_index=majority(votes),
                pred_letter_index=-1 if first.get("letter") is None else int(first["letter"]),
                pred_text_index=-1 if first.get("text") is None else int(first["text"]), votes=votes))
        return preds
