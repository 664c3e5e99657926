"""Reading the answer a rationale *states*.

A teacher rationale usually ends with "Therefore, the answer is (B) no."; a student generation ends
with "\\nAnswer: B". The parser reads only answers the text states explicitly:

* a stated letter: "the answer is (B)", "Answer: B", "option B", "(B) no", "B) no", "Answer B is
  correct" (letters are upper case, so the article "a" is never read as option A);
* an answer statement naming an option's text: "the answer is no", "the answer to the question
  "...?" is "yes"", "So the answer is cotton.";
* a yes/no said as a reply (followed by a comma, full stop or quote: "we can conclude that yes, ...",
  "No, it is not."), never a "no" inside a phrase such as "there is no evidence";
* the option text named in the final sentence, when it names exactly one option.

It never guesses from tone ("it is unlikely that ..."): such rationales stay unparsed (None) and are
counted; the verifier can score them. When a text states several answers, the last one wins (the
conclusion comes last). Option matching is case-insensitive, on word boundaries, longest option first.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

LETTERS = "ABCDEFGHIJ"

# "answer" + optional "to the question "...?"" + a copula. The quoted question may itself contain a
# question mark, so the quote is matched as a whole instead of stopping at sentence punctuation.
_ANSWER_HEAD = (
    r"answer(?:\s+to\s+(?:the|this|that|our)\s+question)?"
    r"(?:\s*(?:\"[^\"\n]{0,400}\"|“[^”\n]{0,400}”|'[^'\n]{0,400}'))?"
    r"\s*(?:,\s*)?(?:is|would\s+be|will\s+be|should\s+be|must\s+be|has\s+to\s+be|remains|:|=|-)\s*"
    r"(?:(?:most\s+)?likely|probably|definitely|clearly|therefore|thus|still|also|then|simply|indeed|option|choice|letter)?\s*"
    r"[:\"'“‘(\[*]*\s*"
)
# The head is case-insensitive; the letter must be upper case ("is a" is an article), re-checked below.
_RE_ANSWER_LETTER = re.compile(_ANSWER_HEAD + r"([A-J])(?=$|[)\].,:;!\s\"'”’*])", re.IGNORECASE)
_RE_PAREN_LETTER = re.compile(r"\(([A-J])\)")
_RE_CLOSE_LETTER = re.compile(r"([A-J])\)(?=\s|$)")  # "B) no"; the char before is checked in code
_RE_NAMED_LETTER = re.compile(r"(?i:option|choice|answer|letter)\s*\(?([A-J])\)?(?![\w'])")
# Patterns anchored on a keyword run only where str.find located the keyword (much faster than
# scanning every position of 16k rationales with a regex).
_NAMED_KEYWORDS = ("option", "choice", "answer", "letter")
_RE_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:\-]\s*\(?([A-J])\)?(?![\w])")
_RE_RULED_OUT = re.compile(r"\)?\s*(?:is|was|would\s+be)\s+(?:incorrect|wrong|false|not\s+(?:the\s+)?(?:correct|right|answer))",
                           re.IGNORECASE)
# A sentence ends at . ! ? (then optional closing quotes/brackets and whitespace) or a newline.
_SENTENCE_SPLIT = re.compile(r"[.!?][\"'”’)]*\s+|\n+")


@lru_cache(maxsize=256)
def _option_regex(options: tuple[str, ...]) -> re.Pattern:
    """One alternation of all option texts, longest first (so "Vitamin B12" beats "Vitamin B")."""
    alts = sorted({o.strip() for o in options if o.strip()}, key=len, reverse=True)
    body = "|".join(re.escape(a) for a in alts) or r"(?!x)x"
    return re.compile(r"(?<![\w])(" + body + r")(?![\w])", re.IGNORECASE)


@lru_cache(maxsize=256)
def _answer_text_regex(options: tuple[str, ...]) -> re.Pattern:
    return re.compile(_ANSWER_HEAD + _option_regex(options).pattern, re.IGNORECASE)


@lru_cache(maxsize=256)
def _reply_regex(options: tuple[str, ...]) -> Optional[re.Pattern]:
    """A yes/no said as a reply: at a clause start or after "that"/"is", followed by , . ! or a quote."""
    words = [o for o in options if o.strip().lower() in ("yes", "no")]
    if not words:
        return None
    alt = "|".join(re.escape(w.strip()) for w in words)
    return re.compile(
        r"(?:^|(?<=[.!?:;,]\s)|(?<=\n)|\bthat\s+|\bsay\s+|\bis\s+|\bbe\s+|[\"“‘'])(" + alt + r")(?=\s*[,.!;]|[\"”’'])",
        re.IGNORECASE)


def _index_of(text: str, options: tuple[str, ...]) -> Optional[int]:
    t = text.strip().lower()
    for i, o in enumerate(options):
        if o.strip().lower() == t:
            return i
    return None


def _letter_index(letter: str, n_options: int) -> Optional[int]:
    i = LETTERS.find(letter)
    return i if 0 <= i < n_options else None


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the sentences of `text` (split after . ! ? and at newlines)."""
    spans, start = [], 0
    for m in _SENTENCE_SPLIT.finditer(text):
        end = m.start() + (text[m.start()] in ".!?")  # the full stop belongs to its sentence
        if text[start:end].strip(" \t\"'”’"):
            spans.append((start, end))
        start = m.end()
    if text[start:].strip(" \t\"'”’"):
        spans.append((start, len(text)))
    return spans


def _sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in _sentence_spans(text)]


def _span_of(spans: list[tuple[int, int]], pos: int) -> int:
    for k, (a, b) in enumerate(spans):
        if a <= pos < b:
            return k
    return len(spans) - 1


def _lower_same_length(text: str) -> str:
    """text.lower() with the same offsets (a few Unicode letters lower-case to two characters)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _keyword_matches(text: str, low: str, keywords: tuple[str, ...], rx: re.Pattern):
    """Matches of `rx` anchored where one of `keywords` starts a word (found with str.find)."""
    for kw in keywords:
        i = low.find(kw)
        while i >= 0:
            if i == 0 or not low[i - 1].isalnum():
                m = rx.match(text, i)
                if m is not None:
                    yield m
            i = low.find(kw, i + 1)


def _letter_candidates(text: str, n: int, spans: list[tuple[int, int]] | None = None,
                       low: str | None = None) -> list[tuple[int, int]]:
    """(position, option index) of every stated letter, sorted by position."""
    low = low if low is not None else _lower_same_length(text)
    found: dict[int, int | None] = {}
    for m in _keyword_matches(text, low, ("answer",), _RE_ANSWER_LETTER):
        if m.group(1).isupper():
            found[m.start(1)] = _letter_index(m.group(1), n)
    for m in _keyword_matches(text, low, _NAMED_KEYWORDS, _RE_NAMED_LETTER):
        found[m.start(1)] = _letter_index(m.group(1), n)
    if "answer" in low:
        for m in _RE_ANSWER_LINE.finditer(text):
            found[m.start(1)] = _letter_index(m.group(1).upper(), n)
    if ")" in text:
        for m in _RE_PAREN_LETTER.finditer(text):
            found[m.start(1)] = _letter_index(m.group(1), n)
        for m in _RE_CLOSE_LETTER.finditer(text):
            p = m.start(1)
            if p == 0 or not (text[p - 1].isalnum() or text[p - 1] in "_("):
                found[p] = _letter_index(m.group(1), n)
    # "Answer (A) is incorrect" rules an option out: it is not a stated answer.
    out = sorted((p, i) for p, i in found.items()
                 if i is not None and not _RE_RULED_OUT.match(text, p + 1))
    if len({i for _, i in out}) > 1:
        # A sentence naming two different letters lists the options ("(A) yes or (B) no"): it
        # states no answer, so its letters are dropped.
        spans = spans if spans is not None else _sentence_spans(text)
        per: dict[int, set[int]] = {}
        for p, i in out:
            per.setdefault(_span_of(spans, p), set()).add(i)
        out = [(p, i) for p, i in out if len(per[_span_of(spans, p)]) == 1]
    return out


def _text_candidates(text: str, options: tuple[str, ...], spans: list[tuple[int, int]] | None = None,
                     low: str | None = None) -> list[tuple[int, int]]:
    """(position, option index) of every answer statement naming an option's text.

    A bare yes/no reply ("we can conclude that yes, ...") counts only in the final sentence: earlier
    ones often answer the rationale's own sub-questions ("Is November in bloom time? No, ...").
    """
    low = low if low is not None else _lower_same_length(text)
    out = []
    for m in _keyword_matches(text, low, ("answer",), _answer_text_regex(options)):
        idx = _index_of(m.group(1), options)
        if idx is not None:
            out.append((m.start(1), idx))
    rx = _reply_regex(options)
    if rx is not None:
        spans = spans if spans is not None else _sentence_spans(text)
        if spans:
            for m in rx.finditer(text, spans[-1][0]):
                idx = _index_of(m.group(1), options)
                if idx is not None:
                    out.append((m.start(1), idx))
    return sorted(set(out))


def final_sentence_option(text: str, options: list[str] | tuple[str, ...]) -> Optional[int]:
    """The option whose text the last sentence names, when it names exactly one option."""
    options = tuple(options)
    sents = _sentences(text)
    if not sents:
        return None
    found = {_index_of(m.group(1), options) for m in _option_regex(options).finditer(sents[-1])}
    found.discard(None)
    if len(found) != 1:
        return None
    (idx,) = found
    # A bare "no" counts only as a reply ("... is no." / "No, ..."), never as a determiner
    # ("there is no evidence"); other option texts count when named at all.
    if options[idx].strip().lower() in ("yes", "no"):
        rx = _reply_regex(options)
        if rx is None or not any(_index_of(m.group(1), options) == idx for m in rx.finditer(sents[-1])):
            return None
    return idx


# Stated answers are nearly always near the end: the tail is searched first, the whole text only
# when the tail states nothing (the last statement overall is the last one in the tail, if any).
_TAIL_CHARS = 400


def _stated_from(text: str, start: int, opts: tuple[str, ...]) -> Optional[tuple[int, int, str]]:
    sub = text[start:]
    spans = _sentence_spans(sub)
    low = _lower_same_length(sub)
    letters = _letter_candidates(sub, len(opts), spans, low)
    texts = _text_candidates(sub, opts, spans, low)
    if not letters and not texts:
        return None
    last = max(_span_of(spans, p) for p, _ in letters + texts)
    # Within the concluding sentence a letter beats the text ("the answer is (B) no" is B).
    in_last = [c for c in letters if _span_of(spans, c[0]) == last]
    if in_last:
        return start + in_last[-1][0], in_last[-1][1], "letter"
    in_last = [c for c in texts if _span_of(spans, c[0]) == last]
    return start + in_last[-1][0], in_last[-1][1], "text"


def _stated(text: str, opts: tuple[str, ...]) -> Optional[tuple[int, int, str]]:
    """(position, index, kind) of the last stated answer; kind is "letter" or "text"."""
    if len(text) > 2 * _TAIL_CHARS:
        # Start the tail at a sentence boundary so its first sentence is whole.
        cut = 0
        for m in _SENTENCE_SPLIT.finditer(text, len(text) - 2 * _TAIL_CHARS, len(text) - _TAIL_CHARS):
            cut = m.end()
        if cut:
            hit = _stated_from(text, cut, opts)
            if hit is not None:
                return hit
    return _stated_from(text, 0, opts)


def parse_answer(text: str, options: list[str]) -> int | None:
    """The index of the option `text` states as its answer, or None when it states none.

    The last sentence stating an answer decides (a stated letter before an option text); failing
    any statement, the option named by the final sentence.
    """
    if not text or not options:
        return None
    opts = tuple(options)
    hit = _stated(text, opts)
    if hit is not None:
        return hit[1]
    return final_sentence_option(text, opts)


def parse_prediction(text: str, options: list[str]) -> dict:
    """Read a student generation "<rationale>\\nAnswer: B" both ways (KARD.md §5).

    Returns {"letter": idx | None, "text": idx | None}. `letter`: the last "Answer: X" line, else
    the last stated letter. `text`: read from the rationale (the part before the "Answer:" line):
    an "answer is <option text>" statement in its final sentence, else the one option its final
    sentence names, else its last "answer is <option text>" statement. Callers count disagreements.
    """
    if not text or not options:
        return {"letter": None, "text": None}
    opts = tuple(options)
    lines = list(_RE_ANSWER_LINE.finditer(text))
    letter = _letter_index(lines[-1].group(1).upper(), len(opts)) if lines else None
    rationale = text[: lines[-1].start()] if lines else text
    if letter is None:
        cands = _letter_candidates(text, len(opts))
        letter = cands[-1][1] if cands else None

    text_idx = None
    spans = _sentence_spans(rationale)
    statements = _text_candidates(rationale, opts, spans)
    if statements and spans:
        in_last = [c for c in statements if c[0] >= spans[-1][0]]
        text_idx = in_last[-1][1] if in_last else None
    if text_idx is None:
        text_idx = final_sentence_option(rationale, opts)
    if text_idx is None and statements:
        text_idx = statements[-1][1]
    return {"letter": letter, "text": text_idx}


def parse_many(texts: Iterable[str], options_list: Iterable[list[str]]) -> list[Optional[int]]:
    """parse_answer over parallel sequences."""
    return [parse_answer(t, o) for t, o in zip(texts, options_list)]
