"""The student at inference: one object shared by batch evaluation (Ray Data actors) and Serve.

Sharing it is what makes "same answer as offline" true by construction: the Serve `Generator`
deployment and the evaluation actors format the source, decode and read the answer with the same code.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from kard_ray.inference.formats import (answer_letter, encode_completions, encode_prompts, encode_sources, format_source,
                                        format_target, generation_rationale)

LETTERS = "ABCDEFGHIJ"


@dataclass
class Prediction:
    generation: str  # the first (greedy: only) generation
    pred_index: int  # under score_by; -1 when no answer could be read
    pred_letter_index: int
    pred_text_index: int
    votes: list[int]
    truncated: bool = False  # the first generation hit max_new_tokens before its end-of-sequence token
    parsed_index: int = -1  # the answer the first generation states, read as score_by reads (likelihood: letter, else text)


# Written beside a trained student (`write_generation_defaults`): how long its training targets are, so
# inference generates enough tokens for a whole target (eval.max_new_tokens: null reads it).
GENERATION_DEFAULTS = "kard_generation.json"
TARGET_MARGIN_TOKENS = 8


def generation_defaults(target_lengths: list[int]) -> dict:
    """The training targets' token lengths and the max_new_tokens they call for: their 99th percentile
    plus a margin (a whole target, answer line included, for nearly every question)."""
    import numpy as np

    lengths = np.asarray(target_lengths or [0])
    p99 = int(np.ceil(np.percentile(lengths, 99)))
    return {"target_tokens_p50": int(np.median(lengths)), "target_tokens_p99": p99,
            "target_tokens_max": int(lengths.max()), "max_new_tokens": p99 + TARGET_MARGIN_TOKENS}


def write_generation_defaults(model_dir: str, target_lengths: list[int]) -> dict:
    """`generation_defaults`, written beside a trained student (what `eval.max_new_tokens: null` reads)."""
    from kard_ray import io

    info = generation_defaults(target_lengths)
    io.write_json(io.join(model_dir, GENERATION_DEFAULTS), info)
    return info


def resolve_max_new_tokens(model_dir: str, configured: Optional[int]) -> int:
    """eval.max_new_tokens, or (null) what the student's training targets call for."""
    if configured is not None:
        return int(configured)
    from kard_ray import io

    path = io.join(model_dir, GENERATION_DEFAULTS)
    if not io.exists(path):
        raise FileNotFoundError(f"eval.max_new_tokens is null (from the training targets) but {model_dir} has no "
                                f"{GENERATION_DEFAULTS}; set eval.max_new_tokens or retrain the student")
    return int(io.read_json(path)["max_new_tokens"])


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


def eos_ids(generation_config) -> set[int]:
    """The token ids that end a generation (a model's generation_config may name several)."""
    eos = generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def decode_generations(tokenizer, rows: list[list[int]], eos: set[int], max_new_tokens: int) -> list[tuple[str, bool]]:
    """(text, truncated) of each row of generated token ids, whichever engine generated them. A row ended
    when it holds an end-of-sequence token, or stopped short of max_new_tokens (an engine that leaves the
    EOS out of its output); otherwise it hit the limit mid-rationale."""
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [(t.strip(), not (any(int(x) in eos for x in row) or len(row) < max_new_tokens))
            for t, row in zip(texts, rows)]


class StudentGenerator:
    """Loads a `save_pretrained` student once; turns (question, options, passages) into predictions."""

    def __init__(self, model_dir: str, dataset: str, max_new_tokens: Optional[int] = 128, device: str | None = None,
                 **reading):
        """`reading`: how it decodes and reads answers (the keywords of `_configure`, with their defaults)."""
        import torch

        from kard_ray.models import load_student, load_tokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_student(model_dir).to(self.device).eval()
        self._configure(dataset, resolve_max_new_tokens(model_dir, max_new_tokens), **reading)

    @classmethod
    def wrap(cls, model, tokenizer, dataset: str, max_new_tokens: int, **reading) -> "StudentGenerator":
        """The same reading around a model in memory (validation during training: the trainer's model,
        in eval mode, on its own device)."""
        import torch

        self = cls.__new__(cls)
        self.torch, self.model, self.tokenizer = torch, model, tokenizer
        self.device = next(model.parameters()).device
        self._configure(dataset, int(max_new_tokens), **reading)
        return self

    def _configure(self, dataset: str, max_new_tokens: int, decoding: str = "greedy", n_votes: int = 1,
                   temperature: float = 0.7, max_source_length: int = 512, score_by: str = "letter_or_text",
                   seed: int = 0, variant: str = "kard") -> None:
        self.dataset = dataset
        self.causal = not getattr(self.model.config, "is_encoder_decoder", False)  # a decoder-only student
        self.eos = eos_ids(self.model.generation_config)
        self.max_new_tokens = max_new_tokens
        self.variant = variant  # what its targets look like: "ft" answers alone, "kard"/"rd" rationale first
        self.decoding = decoding
        self.n_votes = n_votes if decoding == "sample" else 1
        self.temperature = temperature
        self.max_source_length = max_source_length
        self.score_by = score_by
        self.seed = seed

    def source(self, question: str, options: list[str], passages: list[str] | None) -> str:
        return format_source(question, list(options), passages, self.dataset)

    def encode(self, sources: list[str]) -> list[list[int]]:
        """Token ids of each source, truncated exactly as training truncated it (a causal student's
        prompt: the source in its chat template)."""
        if self.causal:
            return encode_prompts(self.tokenizer, sources, self.max_source_length)
        return encode_sources(self.tokenizer, sources, self.max_source_length)

    def generate(self, sources: list[str], keys: list[str] | None = None) -> list[list[tuple[str, bool]]]:
        """`n_votes` (generation, truncated) pairs per source (one when greedy); truncated: it hit
        max_new_tokens before the end-of-sequence token."""
        return [decode_generations(self.tokenizer, rows, self.eos, self.max_new_tokens)
                for rows in self.generate_ids(sources, keys)]

    def generate_ids(self, sources: list[str], keys: list[str] | None = None) -> list[list[list[int]]]:
        """`n_votes` rows of generated token ids per source (what `generate` decodes).

        Sampling is seeded per question — by (seed, key, sample index), key defaulting to the source
        text — and each question is decoded on its own, so its votes never depend on which other
        questions share the batch: offline evaluation and Serve draw the same samples."""
        # Truncate exactly as training did (the middle goes, the "Explanation:" cue stays).
        ids = self.encode(sources)
        if self.decoding != "sample":
            return [[row] for row in self._generate(ids, dict(do_sample=False, num_beams=1))]
        out = []
        for i, row in enumerate(ids):
            key = (keys[i] if keys is not None else sources[i])
            samples = []
            for j in range(self.n_votes):
                self.torch.manual_seed(sample_seed(self.seed, key, j))
                samples += self._generate([row], dict(do_sample=True, temperature=self.temperature))
            out.append(samples)
        return out

    def _generate(self, ids: list[list[int]], kw: dict) -> list[list[int]]:
        """One row of generated token ids per row of prompt ids (padding after an early EOS included)."""
        if self.causal:
            enc = self._left_padded(ids)
        else:
            enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, **kw)
        # a seq2seq output starts with the decoder start token; a causal one with its prompt
        return (out[:, enc["input_ids"].shape[1]:] if self.causal else out[:, 1:]).tolist()

    def _left_padded(self, ids: list[list[int]]) -> dict:
        """A causal batch padded on the left, so every row's next token follows its own prompt."""
        torch = self.torch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _causal_loglikelihoods(self, source_ids: list[int], targets: list[str]) -> list[float]:
        torch = self.torch
        completions = encode_completions(self.tokenizer, targets)
        rows = [list(source_ids) + c for c in completions]
        width = max(len(r) for r in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for i, c in enumerate(completions):  # token t is predicted at position t - 1
            pos = torch.arange(len(source_ids) - 1, len(source_ids) - 1 + len(c))
            out.append(float(logp[i, pos, torch.tensor(c)].sum()))
        return out

    def option_loglikelihoods(self, source_ids: list[int], targets: list[str]) -> list[float]:
        """The student's summed log-likelihood of each target given one source (teacher forcing; the
        encoder runs once, the decoder once per target; a causal student reads prompt + completion)."""
        if self.causal:
            return self._causal_loglikelihoods(source_ids, targets)
        torch = self.torch
        labels = [self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in targets]
        width = max(len(x) for x in labels)
        lab = torch.full((len(labels), width), -100, dtype=torch.long)
        for i, x in enumerate(labels):
            lab[i, : len(x)] = torch.tensor(x)
        src = torch.tensor([source_ids], device=self.device)
        with torch.inference_mode():
            hidden = self.model.get_encoder()(input_ids=src).last_hidden_state
            hidden = hidden.expand(len(targets), -1, -1)
            lab = lab.to(self.device)
            logits = self.model(encoder_outputs=(hidden,), labels=lab).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            mask = lab != -100
            picked = logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return (picked * mask).sum(-1).tolist()

    def likelihood_choice(self, source_ids: list[int], options: list[str], generation: str) -> int:
        """Rank classification (eval.score_by: likelihood): the option whose whole target — the
        generation's rationale (none for FT) then that option's answer — the student finds likeliest.
        The rationale is shared, so the ranking is that of the answer continuations; every question
        gets an answer."""
        n = len(options)
        if self.variant == "ft":
            targets = [format_target(None, answer_letter(i, n), options[i]) for i in range(n)]
        else:
            rationale = generation_rationale(generation)
            targets = [format_target(rationale, answer_letter(i, n)) for i in range(n)]
        scores = self.option_loglikelihoods(source_ids, targets)
        return max(range(n), key=lambda i: scores[i])

    def predict(self, questions: list[str], options: list[list[str]], passages: list[list[str] | None]) -> list[Prediction]:
        sources = [self.source(q, o, p) for q, o, p in zip(questions, options, passages)]
        keys = [question_key(q, o) for q, o in zip(questions, options)]
        ids = self.encode(sources) if self.score_by == "likelihood" else None
        preds = []
        for i, (opts, gens) in enumerate(zip(options, self.generate(sources, keys))):
            votes = ([self.likelihood_choice(ids[i], list(opts), g) for g, _ in gens]
                     if self.score_by == "likelihood" else None)
            preds.append(read_prediction(list(opts), gens, self.score_by, votes))
        return preds


def read_prediction(options: list[str], gens: list[tuple[str, bool]], score_by: str,
                    votes: list[int] | None = None) -> Prediction:
    """A question's `Prediction` from its (generation, truncated) samples: each sample's answer read
    under `score_by` (or the given `votes`: likelihood choices), the majority, and what the first
    sample states. Both engines (HF `generate`, vLLM) read their generations with this."""
    from kard_ray.teacher import parse_prediction

    parsed = [parse_prediction(g, list(options)) for g, _ in gens]
    if votes is None:
        votes = [choose(p, score_by) for p in parsed]
    first = parsed[0]
    reading = "letter_or_text" if score_by == "likelihood" else score_by  # how a stated answer is read
    return Prediction(
        generation=gens[0][0], pred_index=majority(votes),
        pred_letter_index=-1 if first.get("letter") is None else int(first["letter"]),
        pred_text_index=-1 if first.get("text") is None else int(first["text"]), votes=votes,
        truncated=gens[0][1], parsed_index=choose(first, reading))


PREDICTION_COLUMNS = ("generation", "pred_index", "pred_letter_index", "pred_text_index", "parsed_index", "truncated")


def prediction_columns(preds: list[Prediction]) -> dict[str, list]:
    """The prediction table's per-question columns (both engines write these)."""
    return {c: [getattr(p, c) for p in preds] for c in PREDICTION_COLUMNS}

