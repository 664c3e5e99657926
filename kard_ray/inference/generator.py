"""The student at inference: one object shared by batch evaluation (Ray Data actors) and Serve.

Sharing it is what makes "same answer as offline" true by construction: the Serve `Generator`
deployment and the evaluation actors format the source, decode and read the answer with the same code.
"""

from __future__ import annotations

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

    def generate(self, sources: list[str]) -> list[list[str]]:
        """`n_votes` generations per source (one when greedy)."""
        torch = self.torch
        # Truncate exactly as training did (the middle goes, the "Explanation:" cue stays).
        ids = encode_sources(self.tokenizer, sources, self.max_source_length)
        enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        kw = dict(max_new_tokens=self.max_new_tokens)
        if self.decoding == "sample":
            torch.manual_seed(self.seed)
            kw.update(do_sample=True, temperature=self.temperature, num_return_sequences=self.n_votes)
        else:
            kw.update(do_sample=False, num_beams=1)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        n = self.n_votes
        return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(sources))]

    def predict(self, questions: list[str], options: list[list[str]], passages: list[list[str] | None]) -> list[Prediction]:
        from kard_ray.teacher import parse_prediction

        sources = [self.source(q, o, p) for q, o, p in zip(questions, options, passages)]
        preds = []
        for opts, gens in zip(options, self.generate(sources)):
            parsed = [parse_prediction(g, list(opts)) for g in gens]
            votes = [choose(p, self.score_by) for p in parsed]
            first = parsed[0]
            preds.append(Prediction(
                generation=gens[0], pred_index=majority(votes),
                pred_letter_index=-1 if first.get("letter") is None else int(first["letter"]),
                pred_text_index=-1 if first.get("text") is None else int(first["text"]), votes=votes))
        return preds
