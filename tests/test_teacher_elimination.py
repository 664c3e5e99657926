"""Elimination-style rationales: the reader tells options argued FOR from options DISMISSED.

tests/data/teacher_elimination_cases.jsonl holds 82 hand-written rationales over 4- and 5-option
questions, one JSON object a line: {id, kind, options, expected (option index, or null when the text
states no answer of its own), text}. Kinds: elimination (every other option ruled out, the answer
never named), stated_then_dismissed (the answer stated, then the others dismissed: the last option
mentioned is a wrong one), contrast ("(C) is correct, unlike (D)"), dismissed_last (a dismissed
option mentioned again at the end), text_elimination (options named by their text), plain, tricky,
duplicate ("This question is a duplicate. Please refer to the explanation above.") and no_answer.
The last 16 cases (e067-e082) were written after the reader, as a held-out check.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kard_ray.teacher.parsing import AGAINST, FOR, mentions_with_stance, parse_answer, read_answer

CASES_PATH = Path(__file__).parent / "data" / "teacher_elimination_cases.jsonl"


def _cases() -> list[dict]:
    return [json.loads(line) for line in CASES_PATH.read_text().splitlines() if line.strip()]


def test_case_file_is_varied():
    cases = _cases()
    assert len(cases) >= 60
    sizes = Counter(len(c["options"]) for c in cases)
    assert sizes[4] >= 30 and sizes[5] >= 10
    kinds = Counter(c["kind"] for c in cases)
    assert kinds["duplicate"] >= 5 and kinds["contrast"] + kinds["contrast5"] >= 5
    assert kinds["dismissed_last"] + kinds["dismissed_last5"] >= 5
    for c in cases:
        assert c["expected"] is None or 0 <= c["expected"] < len(c["options"]), c["id"]


def test_elimination_case_rates(capsys):
    """>= 90% of answerable cases parsed, >= 95% of those correct; no answer read where none is stated."""
    cases = _cases()
    answerable = [c for c in cases if c["expected"] is not None]
    results = {c["id"]: parse_answer(c["text"], c["options"]) for c in cases}
    parsed = [c for c in answerable if results[c["id"]] is not None]
    correct = [c for c in parsed if results[c["id"]] == c["expected"]]
    read_from_nothing = [c["id"] for c in cases if c["expected"] is None and results[c["id"]] is not None]
    duplicates_read = [c["id"] for c in cases if c["kind"] == "duplicate" and results[c["id"]] is not None]
    wrong = [(c["id"], results[c["id"]], c["expected"]) for c in parsed if results[c["id"]] != c["expected"]]
    with capsys.disabled():
        print(f"\nelimination cases: {len(answerable)} answerable, parsed {len(parsed) / len(answerable):.1%}, "
              f"correct of parsed {len(correct) / max(1, len(parsed)):.1%}; wrong {wrong}; "
              f"answers read where none is stated: {read_from_nothing}")
    assert len(parsed) / len(answerable) >= 0.90
    assert len(correct) / len(parsed) >= 0.95, wrong
    assert duplicates_read == []
    assert read_from_nothing == []


def test_reading_explains_itself():
    opts = ["wind", "soil", "the sun", "a magazine"]
    text = ("Plants make food by photosynthesis, so the sun drives it. Option (A) is unrelated. Option (B) is also "
            "incorrect because it does not depend on the sun. Option (D) is a reference to a magazine and not related "
            "to digestion.")
    r = read_answer(text, opts)
    assert (r.answer, r.how, r.dismissed) == (2, "eliminated", frozenset({0, 1, 3}))
    # the same text with one option left undismissed states nothing: never a guess
    assert parse_answer(text.replace("Option (B) is also incorrect", "Option (B) is about soil, and"), opts) is None
    r = read_answer("This question is a duplicate. Please refer to the explanation above: (C).", opts)
    assert (r.answer, r.how) == (None, "refers_elsewhere")
    stances = {(m.option, m.stance) for m in mentions_with_stance("(C) is correct, unlike (D).", opts)}
    assert stances == {(2, FOR), (3, AGAINST)}
    # "eliminate (A) and (B), leaving (C)": the list shares its cue; "leaving" argues for C
    r = read_answer("We can eliminate (A) and (B), leaving (C).", opts)
    assert (r.answer, r.dismissed) == (2, frozenset({0, 1}))


@pytest.mark.parametrize("text,expected", [
    ("The answer is (B) no, humans do not have gills.", 1),  # a "no" is argued with negations
    ("Therefore, we can conclude that (B) no, the two companies are not related.", 1),
    ("If it were summer, the answer would be (A) yes. It is winter, so the answer is (B) no.", 1),
    ("Therefore, the answer is (B) no. However, if the question asked about boats, the answer would be (A) yes.", 1),
    ("We can choose (A) yes or (B) no depending on how the question is read.", None),  # alternatives
    ("The answer is not (A) yes, it is (B) no.", 1),
    ("Option (B) no is not correct, as the bones are not removed.", 0),
])
def test_yes_no_statements(text, expected):
    assert parse_answer(text, ["yes", "no"]) == expected
