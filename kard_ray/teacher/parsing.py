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

A teacher's rationale (`parse_answer` → `read_answer`) is also read for what it *dismisses*:
elimination-style rationales end by ruling the other options out ("Option (D) is not related to
digestion."), so the last option mentioned is a wrong one. Each mention gets a stance from the cues
around it — FOR ("the answer is (C)", "(C) is correct", "leaving (C)"), AGAINST ("(A) is incorrect",
"too vague", "can be ruled out", "unlike (D)", "eliminate (A) and (B)") or neutral — and the answer is
the last option affirmed, else the stated answer unless dismissed, else the one option left standing
when every other is dismissed. Statements inside conditions ("if ..., the answer would be (A)") and
alternatives ("(A) or (B)") are no verdict; a reply that only refers elsewhere ("This question is a
duplicate. Please refer to the explanation above.") is unparsed. `parse_prediction` (the student's
"Answer: X" generations) keeps the plain last-statement reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------------------------
# Options argued for and options dismissed (elimination-style rationales)
#
# Many rationales explain by ruling options out: "... so the sun drives photosynthesis. Option (A) is
# unrelated. Option (B) is incorrect ... Option (D) is not related to digestion." The last option such a
# text mentions is a dismissed one, so "the last mention wins" reads it wrong. Each option mention gets
# a stance: FOR ("the answer is (C)", "(C) is correct", "leaving (C)"), AGAINST (a dismissal cue after
# it in its clause, "(D) is too vague", or before it, "unlike (D)", "rules out (A) and (B)") or NEUTRAL
# (a plain mention: "Stars are hot balls of gas (C)").

FOR, AGAINST, NEUTRAL = 1, -1, 0

# A mention of an option by letter: "(C)", "C)", "option C", "options A, B and D", "C is ...".
_RE_NAMED_LIST = re.compile(
    r"(?i:options?|choices?|answers?)\s*\(?[A-J]\)?(?![\w'])"
    r"(?:\s*(?:,\s*(?:and\s+|or\s+)?|and\s+|or\s+|&\s*|/\s*)(?:(?i:options?|choices?)\s*)?\(?[A-J]\)?(?![\w']))*")
_RE_LIST_LETTER = re.compile(r"(?<![A-Za-z])[A-J](?![\w'])")
# A bare letter as a subject ("C is correct", "A and B are wrong") at a clause start; what precedes it
# is checked in code (a lookbehind alternation here is slow on long texts).
_RE_BARE_LETTER = re.compile(
    r"\b([A-J])(?=\s+(?:is|are|was|were|would|can|cannot|could|does|do|did|seems|also|and|or)\b|,\s*[A-J]\b)")
_BARE_AFTER_WORDS = ("and", "or", "but", "while", "whereas")
# A clause ends at a sentence end or a semicolon; within it, the next mention of another option
# bounds a mention's window ("(C) is correct, unlike (D)": "unlike" is D's cue, not C's).
_RE_CLAUSE_STOP = re.compile(r"[;\n]|[.!?](?=[\"'”’)]*(?:\s|$))")
_NEG_POST = (
    r"incorrect|wrong|false|inaccurate|invalid|unrelated|irrelevant|unlikely|less\s+likely|implausible|"
    r"not\s+(?:the\s+|a\s+|an\s+)?(?:correct|right|answer|best|relevant|related|true|accurate|applicable|"
    r"appropriate|valid|possible|good|suitable|likely|plausible|case|option|choice|what|about|connected|linked)|"
    r"no\s+(?:relation|connection|relevance|bearing)|(?:has|have)\s+nothing\s+to\s+do|"
    r"too\s+(?:vague|broad|general|narrow|specific|extreme|simplistic)|too\s+\w+\s+to\s+be\b|"
    # "(D) is a base ingredient that is not sweet": a verdict on the option in a relative clause
    r"^\s*(?:is|are|was|were)\s+(?!the\s+only\b)[^.;]{0,60}?\b(?:that|which)\s+(?:is|are|was|were|does|do|did|can)(?:n't|\s+not)\b|"
    r"(?:ruled|rule)\s+out|eliminat\w*|exclud\w*|discard\w*|dismiss\w*|reject\w*|"
    r"(?:does|do|did)(?:n't|\s+not)\s+(?:fit|apply|make\s+sense|match|answer|relate|explain|describe|work|help)|"
    r"makes?\s+no\s+sense|not\s+(?:as|so)\s+(?:likely|good|accurate)|incomplete|contradict\w*|"
    r"can(?:not|'t)\s+be\s+(?:the\s+)?(?:answer|correct|right|true)|neither\b|none\s+of|"
    # the same subject going on: "(C) focuses light but does not separate its colors"
    r"\b(?:but|and|yet|so)\s+(?:it\s+|they\s+)?(?:also\s+)?(?:does|do|did|is|are|was|were|can|could|would|has|have)(?:n't|\s+not)\b|"
    r"\b(?:is|are)\s+out\b")
# Weak cues count only right after the mention ("(B) does not depend on the sun"), where the option is
# the subject; later in the clause they are usually part of the argument.
_NEG_WEAK = r"^[\s,]*(?:(?:which|that|it|they|this)\s+)?(?:also\s+)?(?:is|are|was|were|does|do|did|can|could|would|will|has|have)(?:\s+also)?(?:\s+not|n't)\b"
_POS_POST = (
    r"(?<!in)(?<!not\s)correct|is\s+right|(?:right|best|only|true|most\s+\w+)\s+(?:answer|option|choice|one|fit)|"
    r"the\s+answer|is\s+the\s+best|is\s+true|only\s+one|most\s+(?:likely|appropriate|accurate|suitable|reasonable|plausible)|"
    r"fits|is\s+accurate|makes\s+(?:the\s+most\s+)?sense|matches|not\s+(?:an?\s+)?(?:incorrect|wrong)|is\s+the\s+one|"
    r"(?:is|are)\s+(?:left|remaining)|stands")
_RE_POST_CUE = re.compile(rf"(?P<neg>{_NEG_POST})|(?P<pos>{_POS_POST})", re.IGNORECASE)
_RE_NEG_WEAK = re.compile(_NEG_WEAK, re.IGNORECASE)
# Cues right before a mention ("unlike (D)", "rules out options (A)"); only filler may sit between.
_RE_PRE_CUE = re.compile(
    r"(?:(?P<neg>\bnot|\bunlike|\brather\s+than|\binstead\s+of|\beliminat\w*|\brul(?:e|es|ed|ing)\s+out|\bexclud\w*|"
    r"\bexcept|\bother\s+than|\bcannot\s+be|\bcan't\s+be|\bisn't|\bneither|\bnor|\bas\s+opposed\s+to|\bdismiss\w*|"
    r"\breject\w*|\bdiscard\w*|\bcross\s+out|\bagainst)"
    r"|(?P<pos>\bleav(?:e|es|ing)(?:\s+us\s+with|\s+only)?|\bchoose|\bselect|\bpick|\bgo\s+with|\bopt\s+for|"
    r"\b(?:correct|right|best)\s+(?:answer|option|choice)\s+(?:is|would\s+be)|\bthat\s+is|\bi\.e\.)"
    r"|(?P<contrast>\bbut|\bwhile|\bwhereas|\bhowever|\balthough|\bthough))"
    r"(?:[\s,(:]|\b(?:the|an?|options?|choices?|answers?|wrong|incorrect|other|remaining|possible)\b)*$",
    re.IGNORECASE)
# A clause that passes a verdict on what the clause before it named: "...; both can be ruled out",
# "Option (A) refers to magnets. This is incorrect."
_RE_ANAPHORA = re.compile(
    r"[\s\"'”’)]*(?:(?:so|and|thus|therefore|hence|but)\s+)?(?:(?P<many>both|all|they|these|those|each|neither)"
    r"|(?P<one>this|that))\b(?:\s+(?:of\s+them|options?|choices?|answers?))?", re.IGNORECASE)
_CONNECTOR = re.compile(r"^[\s,\"'”’]*(?:(?:and|or|nor|as\s+well\s+as|&|/)[\s,]*)?(?:(?:options?|choices?)\s*)?\(?$", re.IGNORECASE)
# A rationale that only points elsewhere ("This question is a duplicate. Please refer to the explanation
# above.") states no answer of its own, even when it names a letter.
_RE_REFERRAL = re.compile(
    r"(?:is|as)\s+a\s+duplicate|duplicate\s+(?:question|of)|^\W*duplicate\b|"
    r"identical\s+to\s+(?:the|a|this)\s+(?:previous|earlier|last|prior)|same\s+(?:question|problem)\s+as|"
    r"(?:refer|see|check)\s+(?:back\s+)?(?:to\s+)?(?:the\s+|my\s+|our\s+)?(?:previous|earlier|prior|above)\s+"
    r"(?:explanation|answer|response|rationale|reasoning|solution|question)|"
    r"(?:refer|see|check)\s+(?:back\s+)?(?:to\s+)?(?:the\s+|my\s+)?(?:explanation|answer|response|rationale|"
    r"reasoning|solution)s?\s+(?:given\s+|provided\s+)?(?:above|before|earlier|previously)|"
    r"already\s+(?:been\s+)?(?:answered|explained|addressed)|previous\s+(?:response|answer|explanation)",
    re.IGNORECASE)


_REFERRAL_WORDS = ("duplicate", "identical", "same question", "same problem", "above", "before", "earlier",
                   "previous", "already")


def refers_elsewhere(text: str) -> bool:
    """True for a "duplicate question / see the explanation above" reply (it argues nothing itself)."""
    low = text.lower()
    if not any(w in low for w in _REFERRAL_WORDS):  # a cheap filter before the long regex
        return False
    return _RE_REFERRAL.search(text) is not None


@dataclass
class Mention:
    start: int
    end: int
    option: int
    how: str  # "stated" (an answer statement), "letter", "text" or "listed" (one of alternatives)
    stance: int = NEUTRAL
    # "(B) no, humans do not ..." / "no (B)": a yes/no answer said with its letter; what follows restates
    # the answer (a "no" is argued with negations), so only a verdict right after it counts.
    restates: bool = False


# "the answer to the multiple choice question is (B)", "answer this question with (A)", "choose answer
# (B)": an answer statement the stricter _ANSWER_HEAD misses (it ends right before the letter).
_RE_STATED_BEFORE = re.compile(
    r"(?:\banswers?\b[^.;:!?\n]{0,80}?\b(?:is|would\s+be|will\s+be|should\s+be|must\s+be|as|with|of|remains)"
    r"(?:\s+(?:actually|clearly|definitely|most\s+likely|likely|probably|indeed|simply|therefore|thus|still|then))?|"
    r"\b(?:correct|right|best|final)\s+(?:answer|option|choice)(?:\s+(?:is|would\s+be))?|"
    r"\bmak(?:e|es|ing)\s+(?:the\s+|it\s+the\s+)?(?:(?:correct|right|final|best)\s+)?(?:answer|option|choice)|"
    r"\b(?:choose|select|pick|go\s+with)(?:\s+(?:the\s+)?(?:answer|option|choice))?|\banswer\s*:)"
    r"\s*(?:(?:option|choice|letter)\s*)?[(\"'“‘*\[]*\s*$", re.IGNORECASE)
_RE_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor)\b|n't\b", re.IGNORECASE)
# A statement inside a condition ("If it rained, the answer would be (A)") is no verdict.
_RE_CONDITION = re.compile(r"\b(?:if|unless|whether|suppose|supposing|assuming)\b", re.IGNORECASE)


def _own_text_around(text: str, m: Mention, options: tuple[str, ...]) -> None:
    """Extend a letter mention over its option's text right after it ("(C) freezing", "(B), no")."""
    o = options[m.option].strip()
    rest = text[m.end:m.end + len(o) + 6]
    k = len(rest) - len(rest.lstrip(" ,:-\"'“‘"))
    if o and rest[k:k + len(o)].lower() == o.lower() and not rest[k + len(o):k + len(o) + 1].isalnum():
        m.end += k + len(o)
        m.restates = o.lower() in ("yes", "no")
    elif o.lower() in ("yes", "no"):
        before = text[max(0, m.start - len(o) - 4):m.start].rstrip(" (\"'")
        m.restates = before.lower().endswith(o.lower())


def _letter_mentions(text: str, n: int, low: str) -> dict[int, Mention]:
    """{start: Mention} of every option named by letter; answer statements are FOR from the start."""
    found: dict[int, Mention] = {}

    def put(pos: int, end: int, letter: str, how: str) -> None:
        i = _letter_index(letter, n)
        if i is not None and (pos not in found or how == "stated"):
            found[pos] = Mention(pos, end, i, how, FOR if how == "stated" else NEUTRAL)

    if ")" in text:
        for m in _RE_PAREN_LETTER.finditer(text):
            put(m.start(1), m.end(), m.group(1), "letter")
        for m in _RE_CLOSE_LETTER.finditer(text):
            p = m.start(1)
            if p == 0 or not (text[p - 1].isalnum() or text[p - 1] in "_("):
                put(p, m.end(), m.group(1), "letter")
    # ("letter B" is left out: questions about letters of the alphabet name them so)
    for m in _keyword_matches(text, low, ("option", "choice", "answer"), _RE_NAMED_LIST):
        for k in _RE_LIST_LETTER.finditer(text, m.start(), m.end()):
            if k.start() > m.start() + 3:  # past the keyword itself
                end = k.end() + (1 if text[k.end():k.end() + 1] == ")" else 0)
                put(k.start(), end, k.group(0), "letter")
    for m in _RE_BARE_LETTER.finditer(text):
        before = text[max(0, m.start() - 10):m.start()].rstrip()
        if not before or before[-1] in ".;:!?,\n" or before.rsplit(None, 1)[-1].lower() in _BARE_AFTER_WORDS:
            put(m.start(1), m.end(1), m.group(1), "letter")
    for m in _keyword_matches(text, low, ("answer",), _RE_ANSWER_LETTER):
        if m.group(1).isupper():
            put(m.start(1), m.end(1) + (1 if text[m.end(1):m.end(1) + 1] == ")" else 0), m.group(1), "stated")
    if "answer" in low:
        for m in _RE_ANSWER_LINE.finditer(text):
            put(m.start(1), m.end(), m.group(1).upper(), "stated")
    return found


def _promote_statements(text: str, letters: dict[int, Mention], options: tuple[str, ...], spans) -> None:
    """Mark answer statements the letter patterns miss as FOR; demote conditional ones to plain mentions."""
    for pos, m in letters.items():
        cut = pos - (1 if text[pos - 1:pos] == "(" else 0)
        o = options[m.option].strip()
        head = text[max(0, cut - 140):cut].rstrip(" \"'”’")
        if o and head.lower().endswith(o.lower()):  # "the answer is "no" (B)"
            cut = max(0, cut - 140) + len(head) - len(o)
        if m.how != "stated" and _RE_STATED_BEFORE.search(text, max(0, cut - 120), cut):
            m.how, m.stance = "stated", FOR
        if m.how == "stated":
            a = spans[_span_of(spans, pos)][0] if spans else 0
            if _RE_CONDITION.search(text, a, pos):
                m.how, m.stance = "letter", NEUTRAL


def _text_mentions(text: str, options: tuple[str, ...], letters: dict[int, Mention]) -> list[Mention]:
    """Options named by their text (not yes/no, which are everyday words), apart from those right
    beside a letter naming the same option ("(C) freezing", "The skin (B)"): those extend the letter."""
    named = [i for i, o in enumerate(options) if len(o.strip()) >= 3 and o.strip().lower() not in ("yes", "no")]
    if not named:
        return []
    rx = _option_regex(tuple(options[i] for i in named))
    by_end = {m.end: m for m in letters.values()}
    by_start = {m.start - (1 if text[m.start - 1:m.start] == "(" else 0): m for m in letters.values() if m.start}
    out = []
    for m in rx.finditer(text):
        idx = _index_of(m.group(1), options)
        if idx is None:
            continue
        gap_before = len(text[:m.start()]) - len(text[:m.start()].rstrip(" ,:-\"'“‘"))
        left = by_end.get(m.start() - gap_before)
        if left is not None and left.option == idx:
            left.end = max(left.end, m.end())
            continue
        gap_after = len(text[m.end():]) - len(text[m.end():].lstrip(" ,"))
        right = by_start.get(m.end() + gap_after)
        if right is not None and right.option == idx:
            continue
        out.append(Mention(m.start(), m.end(), idx, "text"))
    return out


def _joined(text: str, a: Mention, b: Mention, options: tuple[str, ...]) -> bool:
    """True when only a connector separates two mentions ("(A), (C) and (D)", "(B) and the bathroom (C)")."""
    between = text[a.end:b.start]
    if b.how != "text":
        o = options[b.option].strip().lower()
        head = between.rstrip(" (\"'“‘")
        if o and head.lower().endswith(o):
            between = re.sub(r"(?i)\b(?:the|an?)\s*$", "", head[:len(head) - len(o)])
    return _CONNECTOR.match(between) is not None


def _clause_end(text: str, pos: int, limit: int) -> int:
    m = _RE_CLAUSE_STOP.search(text, pos, limit)
    return m.start() if m else limit


def _clause_start(text: str, pos: int, floor: int) -> int:
    start = floor
    for m in _RE_CLAUSE_STOP.finditer(text, floor, pos):
        # a contrast word starts the next clause and stays in it (it is a cue of that clause)
        start = m.start() if m.group(0)[-1].isalpha() else m.end()
    return start


def _post_stance(window: str, how: str) -> int:
    if how == "restated":
        m = re.match(r"^[\s\"'”’]*(?:(?:is|are|was|would\s+be)\s+)?(?:also\s+)?(?:clearly\s+)?", window)
        cue = _RE_POST_CUE.match(window, m.end()) if m else None
        return NEUTRAL if cue is None else (AGAINST if cue.group("neg") else FOR)
    if how == "text":  # an option's text as the subject of a verdict: "Granite is incorrect"
        m = re.match(r"^[\s,]*(?:(?:is|are|was|would\s+be)\s+)?(?:also\s+)?(?:clearly\s+)?", window)
        window = window[m.end():] if m else window
        cue = _RE_POST_CUE.match(window) or _RE_POST_CUE.search(window, 0, 60)
    else:
        cue = _RE_POST_CUE.search(window)
    weak = _RE_NEG_WEAK.match(window)
    if weak and (cue is None or weak.start() <= cue.start()):
        return AGAINST if not (cue and cue.group("pos") and cue.start() < weak.end()) else FOR
    if cue is None:
        return NEUTRAL
    return AGAINST if cue.group("neg") else FOR


def _pre_stance(window: str) -> int | str:
    last = _RE_PRE_CUE.search(window[-60:])
    if last is None:
        return NEUTRAL
    if last.group("neg"):
        return AGAINST
    return FOR if last.group("pos") else "contrast"


def mentions_with_stance(text: str, options: list[str] | tuple[str, ...], spans=None, low=None) -> list[Mention]:
    """Every option mention in `text` with its stance (FOR / AGAINST / NEUTRAL), in text order."""
    opts = tuple(options)
    low = low if low is not None else _lower_same_length(text)
    spans = spans if spans is not None else _sentence_spans(text)
    letters = _letter_mentions(text, len(opts), low)
    for m in letters.values():
        _own_text_around(text, m, opts)
    _promote_statements(text, letters, opts, spans)
    ms = sorted(list(letters.values()) + _text_mentions(text, opts, letters), key=lambda m: m.start)
    ms = [m for k, m in enumerate(ms) if k == 0 or m.start >= ms[k - 1].end]  # overlapping: first wins
    sent = [_span_of(spans, m.start) for m in ms]
    # Phase 1: cues after each mention, up to the next mention or the clause end; a mention followed
    # only by a connector ("(A), (C) and (D) are wrong") shares the stance of the next one.
    for k in range(len(ms) - 1, -1, -1):
        m = ms[k]
        if m.how == "stated":
            continue
        s_end = spans[sent[k]][1] if spans else len(text)
        nxt = ms[k + 1].start if k + 1 < len(ms) and sent[k + 1] == sent[k] else s_end
        other = next((x.start for x in ms[k + 1:] if x.option != m.option), s_end)
        stop = _clause_end(text, m.end, min(other, s_end))
        if stop == other:  # "... (A) and arrive at the correct answer (B)": the cue is B's
            intro = _RE_STATED_BEFORE.search(text, m.end, stop) or _RE_PRE_CUE.search(text, max(m.end, stop - 60), stop)
            stop = intro.start() if intro else stop
        window = text[m.end:stop]
        if nxt < s_end and _joined(text, m, ms[k + 1], opts):
            m.stance = ms[k + 1].stance
        else:
            m.stance = _post_stance(window, "restated" if m.restates else m.how)
    # Two options affirmed together ("choose (A) or (B)") are alternatives, not an answer.
    for k in range(len(ms) - 1):
        a, b = ms[k], ms[k + 1]
        if (a.stance == FOR and a.option != b.option and sent[k] == sent[k + 1]
                and _joined(text, a, b, opts)):
            a.stance = b.stance = NEUTRAL
            a.how = b.how = "listed"
    _clause_verdicts(text, ms)
    # Phase 2: mentions still neutral look at the cue before them in their clause ("unlike (D)");
    # a list ("eliminate (A) and (B)") shares the stance of its first member.
    for k, m in enumerate(ms):
        if m.stance != NEUTRAL or m.how in ("stated", "listed"):
            continue
        floor = spans[sent[k]][0] if spans else 0
        prev = ms[k - 1] if k and sent[k - 1] == sent[k] else None
        if prev is not None and _joined(text, prev, m, opts):
            if prev.how != "stated":
                m.stance = prev.stance
            continue
        lo = max(floor, prev.end if prev else floor)
        st = _pre_stance(text[_clause_start(text, m.start, lo):m.start])
        if st == "contrast":  # "(C) fits, while (B) ..." dismisses B only when set against an answer
            st = AGAINST if any(p.stance == FOR and p.option != m.option and sent[j] == sent[k]
                                for j, p in enumerate(ms[:k])) else NEUTRAL
        m.stance = st
    return ms


def _clause_verdicts(text: str, ms: list[Mention]) -> None:
    """Neutral mentions take the verdict of the next clause when it names no option and starts with
    a pronoun: plural ("both", "they") for every mention of the clause, singular ("this", "it") only
    when the clause names one option."""
    done: set[int] = set()
    for m in ms:
        if m.stance != NEUTRAL or m.how == "stated" or m.restates:
            continue
        stop = _RE_CLAUSE_STOP.search(text, m.end)
        if stop is None or stop.end() in done:
            continue
        c = stop.end()
        done.add(c)
        nxt = _RE_CLAUSE_STOP.search(text, c + 1)
        d = nxt.end() if nxt else len(text)
        if any(c <= x.start < d for x in ms):
            continue
        ref = _RE_ANAPHORA.match(text, c, d)
        verdict = _post_stance(text[ref.end():d], "letter") if ref else NEUTRAL
        if verdict == NEUTRAL:
            continue
        a = 0  # the clause start: just after the last stop before m
        for st in _RE_CLAUSE_STOP.finditer(text, max(0, m.start - 600), m.start):
            a = st.end()
        named = [x for x in ms if a <= x.start < c]
        if ref.group("one") and len({x.option for x in named}) > 1:
            continue
        for x in named:
            if x.stance == NEUTRAL and x.how != "stated":
                x.stance = verdict


@dataclass
class Reading:
    """What a rationale says about the options: its answer (or None) and how it was read."""

    answer: Optional[int]
    how: str  # "affirmed", "stated", "eliminated", "mentioned", "final_sentence", "refers_elsewhere", "none"
    dismissed: frozenset = frozenset()


def read_answer(text: str, options: list[str]) -> Reading:
    """The option a rationale argues for, telling options argued FOR from options DISMISSED.

    In order: the last option affirmed (an answer statement or a cue such as "(C) is correct") and not
    dismissed afterwards; the answer the text states (`_stated`, the last statement) unless that option
    is dismissed; the one option left standing when every other is dismissed; the last plain mention of
    an option not dismissed (outside a sentence that lists several); the option the final sentence
    names. Anything else — including a reply that refers to another answer — is None: never a guess.
    """
    if not text or not options:
        return Reading(None, "none")
    if refers_elsewhere(text):
        return Reading(None, "refers_elsewhere")
    opts = tuple(options)
    spans = _sentence_spans(text)
    low = _lower_same_length(text)
    ms = mentions_with_stance(text, opts, spans, low)
    last: dict[int, Mention] = {}
    for m in ms:
        if m.stance != NEUTRAL:
            last[m.option] = m
    dismissed = frozenset(i for i, m in last.items() if m.stance == AGAINST)
    affirmed = [m for m in last.values() if m.stance == FOR]
    if affirmed:
        return Reading(max(affirmed, key=lambda m: m.start).option, "affirmed", dismissed)
    hit = _stated(text, opts)
    if hit is not None and hit[1] not in dismissed:
        return Reading(hit[1], "stated", dismissed)
    standing = [i for i in range(len(opts)) if i not in dismissed]
    if len(standing) == 1:
        return Reading(standing[0], "eliminated", dismissed)
    per_sentence: dict[int, set[int]] = {}
    for m in ms:
        per_sentence.setdefault(_span_of(spans, m.start), set()).add(m.option)
    # (a plain mention whose clause negates something — "(A) is where they are cooked, not grown" —
    # may be a dismissal without a cue: too uncertain to answer with)
    plain = [m for m in ms if m.stance == NEUTRAL and m.option not in dismissed and m.how == "letter"
             and len(per_sentence[_span_of(spans, m.start)]) == 1
             and not _RE_NEGATION.search(text, m.end, _clause_end(text, m.end, spans[_span_of(spans, m.start)][1]))]
    if plain and hit is not None:  # the stated answer was dismissed: fall back to a plain mention
        return Reading(plain[-1].option, "mentioned", dismissed)
    idx = final_sentence_option(text, opts)
    if idx is not None and idx not in dismissed:
        return Reading(idx, "final_sentence", dismissed)
    if plain:
        return Reading(plain[-1].option, "mentioned", dismissed)
    return Reading(None, "none", dismissed)


def parse_answer(text: str, options: list[str]) -> int | None:
    """The index of the option `text` argues for, or None when it states none (`read_answer`)."""
    return read_answer(text, options).answer


@lru_cache(maxsize=256)
def _stated_text_regex(options: tuple[str, ...]) -> re.Pattern:
    """An answer statement naming an option's text, its letter allowed first: "the answer is (B)
    accordion", "Answer: B. accordion", "the answer is accordion" (students write all three)."""
    return re.compile(_ANSWER_HEAD + r"(?:[A-J]\s*[).:\]]\s*)?" + _option_regex(options).pattern, re.IGNORECASE)


def _complete_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans without a trailing fragment: a last sentence that does not end in . ! ? or a
    newline is what a generation cut at max_new_tokens leaves behind ("... accordion.\nA")."""
    spans = _sentence_spans(text)
    if len(spans) > 1 and text[spans[-1][0]:].rstrip(" \t\"'”’)").rstrip()[-1:] not in ".!?" \
            and not text.endswith("\n"):
        spans = spans[:-1]
    return spans


def parse_prediction(text: str, options: list[str]) -> dict:
    """Read a student generation "<rationale>\\nAnswer: B" both ways (KARD.md §5), wherever the answer
    stands and whatever fragment follows it (a generation cut at max_new_tokens, trailing junk,
    an answer repeated): the last complete statement wins.

    Returns {"letter": idx | None, "text": idx | None}. `letter`: the last complete "Answer: X" line,
    else the last stated letter. `text`, read from the rationale (the part before that line): the last
    answer statement naming an option's text ("the answer is (B) accordion"), else the one option the
    last complete sentence names. Callers count disagreements.
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
    low = _lower_same_length(rationale)
    statements = [(m.start(), _index_of(m.group(m.lastindex), opts))
                  for m in _keyword_matches(rationale, low, ("answer",), _stated_text_regex(opts))]
    statements = sorted(c for c in statements if c[1] is not None)
    text_idx = statements[-1][1] if statements else None
    if text_idx is None:
        spans = _complete_sentences(rationale)
        if spans:
            text_idx = final_sentence_option(rationale[: spans[-1][1]], opts)
    return {"letter": letter, "text": text_idx}


def parse_many(texts: Iterable[str], options_list: Iterable[list[str]]) -> list[Optional[int]]:
    """parse_answer over parallel sequences."""
    return [parse_answer(t, o) for t, o in zip(texts, options_list)]
