"""The contracts every stage shares, written once: the inference-time query, the student's input and
target strings, their suffix-preserving tokenisation, and the one stable top-k order.

    question_query(q, options)                       the retrieval / reranker query at test time
    top_k(scores, k)                                 best first; ties keep retrieval order
    format_source(q, options, passages, dataset)     the student's input (KARD.md §3)
    format_target(rationale, letter, answer_text)    the student's training target
    generation_rationale(generation)                 the rationale part of a generated target
    encode_sources(tokenizer, sources, max_length)   truncation shared by training and inference
    encode_prompts / encode_completions              the same for a decoder-only (causal) student

The passage string ("Title . text") is the knowledge layer's `kard_ray.knowledge.format_passage`.
Training imports these from here; nothing here imports training.
"""

from __future__ import annotations

import re
import string
from typing import Optional, Sequence

import numpy as np


def question_query(question: str, options) -> str:
    """The inference-time retrieval query: the question and its options (KARD.md §5)."""
    return f"{question} {' '.join(options)}"


def top_k(scores, k: int) -> list[int]:
    """Indices of the k highest scores, best first; ties keep retrieval order (a stable sort).
    Batch reranking (`inference.reranker.rerank_dataset`) and Serve's Reranker both cut with it."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]]


VARIANTS = ("kard", "rd", "ft")
SOURCE_SUFFIX = "\nExplanation:"
PASSAGE_SEPARATOR = "\t"  # the authors join several passages with a tab (preprocess_cot_grounded.py)

# The authors' instructions. MedQA names the domain; StrategyQA/OBQA (and our synthetic/generic
# tasks) drop the domain words. RD has no knowledge, so "with given medical knowledge" goes too.
_INSTRUCTION = {
    "medqa": ("The following are multiple-choice questions about medical knowledge. Generate a step-by-step "
              "explanations for each question with given medical knowledge."),
    "medqa_rd": ("The following are multiple-choice questions about medical knowledge. Generate a step-by-step "
                 "explanations for each question."),
    "default": "The following are multiple-choice questions. Generate a step-by-step explanations for each question.",
}


# ------------------------------------------------------------------------------------------------
# the student's input and target


def _clean(text: str) -> str:
    """One line: newlines inside a field would read as the prompt's own field separators."""
    return " ".join(str(text).split())


def answer_letter(index: int, n_options: Optional[int] = None) -> str:
    if index < 0 or index >= 26 or (n_options is not None and index >= n_options):
        raise ValueError(f"answer index {index} out of range for {n_options} options")
    return string.ascii_uppercase[index]


def format_question(question: str, options: Sequence[str]) -> str:
    """`{q} A. {o1} B. {o2} ...` (the authors' data template)."""
    if len(options) < 2 or len(options) > 26:
        raise ValueError(f"a question needs 2-26 options, got {len(options)}")
    opts = " ".join(f"{string.ascii_uppercase[i]}. {_clean(o)}" for i, o in enumerate(options))
    return f"{_clean(question)} {opts}"


def format_source(question: str, options: list[str], passages: list[str] | None, dataset: str) -> str:
    """The student's input, KARD.md §3:

    "<instruction>\\nQuestion: {q} A. {o1} B. {o2} ...\\nKnowledge: {passages}\\nExplanation:"

    passages=None gives RD's input (no Knowledge field). Several passages are joined with a tab.
    """
    if passages is None:
        instruction = _INSTRUCTION["medqa_rd" if dataset == "medqa" else "default"]
        return f"{instruction}\nQuestion: {format_question(question, options)}{SOURCE_SUFFIX}"
    instruction = _INSTRUCTION["medqa" if dataset == "medqa" else "default"]
    knowledge = PASSAGE_SEPARATOR.join(_clean(p) for p in passages)
    return f"{instruction}\nQuestion: {format_question(question, options)}\nKnowledge: {knowledge}{SOURCE_SUFFIX}"


def format_target(rationale: str | None, answer_letter: str, answer_text: str | None = None) -> str:
    """"{rationale}\\nAnswer: {letter}" (KARD, RD); rationale=None gives FT's answer-only target.

    FT's target is the answer alone — the option's text, then "Answer: {letter}" — so one parser reads
    every method's output and FT can be scored by text as well as by letter (tiny from-scratch students
    are scored by text, KARD.md §5). Without `answer_text` it is just "Answer: {letter}".
    """
    if rationale is None:
        return f"{answer_text.strip()}{ANSWER_LINE}{answer_letter}" if answer_text else f"Answer: {answer_letter}"
    return f"{rationale.strip()}{ANSWER_LINE}{answer_letter}"


ANSWER_LINE = "\nAnswer: "


def generation_rationale(generation: str) -> str:
    """The rationale of a generated target: everything before its first "Answer:" line (all of it when
    the generation stopped before one). Likelihood scoring appends each option's answer line to it."""
    m = _RE_FIRST_ANSWER.search(generation)
    return (generation[: m.start()] if m else generation).strip()


_RE_FIRST_ANSWER = re.compile(r"(?im)(?:^|(?<=[.!?])[ \t]+)[ \t]*answer\s*:")


# ------------------------------------------------------------------------------------------------
# tokenisation


def encode_sources(tokenizer, sources: Sequence[str], max_length: int,
                   add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each source, at most `max_length`, truncating the *middle*.

    A source that fits is tokenised exactly as `tokenizer(source)` would. A longer one loses the end
    of its question/knowledge text while the "\\nExplanation:" suffix and the end-of-sequence token
    survive — truncating the tail instead would delete the cue that makes the student explain.
    """
    enc = tokenizer(list(sources), add_special_tokens=add_special_tokens, truncation=False,
                    return_offsets_mapping=tokenizer.is_fast, verbose=False)
    out = []
    for i, (src, ids) in enumerate(zip(sources, enc["input_ids"])):
        if len(ids) <= max_length:
            out.append(list(ids))
            continue
        cut = src.rfind(SOURCE_SUFFIX)
        if cut < 0 or not tokenizer.is_fast:
            out.append(list(ids[: max_length - 1]) + [ids[-1]])  # keep EOS at least
            continue
        # first token that starts inside the suffix (special tokens have empty (0, 0) offsets)
        offsets = enc["offset_mapping"][i]
        first_tail = next((j for j, (a, b) in enumerate(offsets) if b > a and a >= cut), len(ids) - 1)
        tail = list(ids[first_tail:])
        head = list(ids[:first_tail])[: max(0, max_length - len(tail))]
        out.append((head + tail)[-max_length:] if len(tail) > max_length else head + tail)
    return out




# ------------------------------------------------------------------------------------------------
# decoder-only (causal) students: prompt + completion
#
# A causal student reads the same source and writes the same target as a seq2seq one, as one sequence:
# the prompt (the source, in the model's chat template as a user turn when its tokenizer has one) and the
# completion (the target and the end-of-sequence token). Training masks the prompt out of the loss;
# inference generates after the prompt. Both encode with these two functions.


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def causal_prompt(tokenizer, source: str) -> str:
    """The prompt text of a source: a user turn with the assistant's turn opened (chat template), or the
    source itself."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": source}], tokenize=False,
                                             add_generation_prompt=True)
    return source


def encode_prompts(tokenizer, sources: Sequence[str], max_length: int) -> list[list[int]]:
    """Prompt token ids, at most `max_length`, truncated as `encode_sources` truncates: the end of the
    knowledge goes; the instruction, question, options and the "Explanation:" cue (and the template's
    assistant turn after it) stay. A chat template writes its own BOS text, so none is added to it."""
    texts = [causal_prompt(tokenizer, s) for s in sources]
    return encode_sources(tokenizer, texts, max_length, add_special_tokens=not uses_chat_template(tokenizer))


def encode_completions(tokenizer, targets: Sequence[str], max_length: Optional[int] = None) -> list[list[int]]:
    """Completion token ids: the target then EOS; cut to `max_length` (EOS kept) only when it is set.
    Without a chat template the completion continues the prompt's line, so it starts with a space."""
    lead = "" if uses_chat_template(tokenizer) else " "
    ids = tokenizer([lead + t for t in targets], add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("a causal student's tokenizer needs an eos_token (where a completion ends)")
    out = [list(x) + [eos] for x in ids]
    if max_length is None:
        return out
    return [x if len(x) <= max_length else x[: max_length - 1] + [eos] for x in out]
