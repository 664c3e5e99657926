"""Answer parsing, prompts and teacher-output import (no Ray)."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from kard_ray.teacher import build_messages, load_teacher_rationales, parse_answer, parse_prediction
from kard_ray.teacher.importers import load_teacher_records
from kard_ray.teacher.prompts import load_few_shot

YN = ["yes", "no"]
SYN = ["silk", "cotton", "tin", "salt"]


@pytest.mark.parametrize("text,options,expected", [
    ("Therefore, the answer is (B) no.", YN, 1),
    ("Answer: B", YN, 1),
    ("(A) yes", YN, 0),
    ("So, the correct answer is B) no, it did not.", YN, 1),
    ("Therefore, the answer to the question is A, yes, dessert can be made with vegetables.", YN, 0),
    ("Thus, Option B is correct.", YN, 1),
    ("So the answer is yes.", YN, 0),
    ('Therefore, the answer to the question "Do bald eagles nest on Mount Sharp?" is no.', YN, 1),
    ("Since the population is smaller, we can conclude that yes, every resident could fit.", YN, 0),
    ("This makes answer (A) correct. Answer (B) is incorrect as it contradicts this logic.", YN, 0),
    # a later mention of (A) as "the wrong option" dismisses it: the stated (B) stands
    ("The answer is (B) no. Later text mentions (A) only as the wrong option.", YN, 1),
    ("The answer is (B) no. On reflection, the answer is (A) yes.", YN, 0),  # the last statement wins
    # synthetic task styles: option text, no letter
    ("The main export of Graerthex is cotton. So the answer is cotton.", SYN, 1),
    ("According to the records, the main export of Graerthex is tin. Therefore, the answer is tin.", SYN, 2),
    ("The main export of Graerthex is salt. Hence salt is correct, so the answer is salt.", SYN, 3),
    ("We know that the main export of Graerthex is silk. The answer is silk.", SYN, 0),
    ("The answer is Vitamin B12.", ["Vitamin B", "Vitamin B12", "Iron", "Zinc"], 1),  # longest option wins
    ("First, some facts. The drug of choice here is ceftriaxone.", ["Ceftriaxone", "Penicillin"], 0),
])
def test_parse_stated_answers(text, options, expected):
    assert parse_answer(text, options) == expected


@pytest.mark.parametrize("text", [
    "There is no evidence that it happened, and it is unlikely that he did.",  # tone, not a statement
    "It is unlikely that a bee would survive.",
    "The options are (A) yes or (B) no. It depends on the context.",  # a listing states nothing
    "Is November in the bloom season? No, it is not. Photographers still go there.",  # sub-question reply
    "the answer is a tricky one",  # "a" is an article, not option A
    "",
])
def test_parse_refuses_to_guess(text):
    assert parse_answer(text, YN) is None


def test_parse_prediction_reads_letter_and_text():
    gen = "The main export of Graerthex is cotton. So the answer is cotton.\nAnswer: B"
    assert parse_prediction(gen, SYN) == {"letter": 1, "text": 1}
    # letter and text disagree: both are reported so evaluation can count the disagreement
    assert parse_prediction("The main export of Graerthex is silk.\nAnswer: D", SYN) == {"letter": 3, "text": 0}
    assert parse_prediction("the the the", SYN) == {"letter": None, "text": None}
    assert parse_prediction("Answer: C", SYN) == {"letter": 2, "text": None}
    assert parse_prediction("Answer: Z", SYN)["letter"] is None  # out of range


def test_shared_strategyqa_parse_rate(shared_data):
    """The real gpt-3.5 rationales: parse rate >= 93%, >= 97% of parsed agreeing with gold (fast)."""
    records = load_teacher_records(str(shared_data / "teacher_gpt35_responses.jsonl.gz"))
    gold = {}
    with open(shared_data / "train.jsonl") as fh:
        for line in fh:
            row = json.loads(line)
            gold[row["id"]] = row["label"]
    assert len(records) == 1603 and sum(len(r.texts) for r in records.values()) == 16030
    t0 = time.time()
    parsed = agree = total = 0
    for qid, rec in records.items():
        for text in rec.texts:
            total += 1
            p = parse_answer(text, YN)
            if p is not None:
                parsed += 1
                agree += p == gold[qid]
    seconds = time.time() - t0
    print(f"\nStrategyQA teacher file: parse rate {parsed / total:.2%} ({parsed}/{total}), "
          f"agreement with gold {agree / parsed:.2%}, {total - parsed} unparsed, {seconds:.1f}s")
    assert parsed / total >= 0.93
    assert agree / parsed >= 0.97
    assert seconds < 30
    rec = records["train-00000"]
    assert rec.teacher == "gpt-3.5-turbo-0301"
    # usage: prompt tokens once per response, completion tokens split over its rationales
    assert rec.prompt_tokens[0] == 71 and sum(rec.prompt_tokens) == 71 and sum(rec.completion_tokens) == 2163


def test_load_teacher_rationales_formats_and_errors(tmp_path):
    raw = {"id": "q1", "response": {"object": "chat.completion", "model": "m", "usage": {"prompt_tokens": 10, "completion_tokens": 7},
                                    "choices": [{"index": 1, "message": {"content": "second"}},
                                                {"index": 0, "message": {"content": "first"}}]}}
    plain = {"id": "q2", "rationales": ["a", "b", "c"]}
    p = tmp_path / "t.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps(raw) + "\n\n" + json.dumps(plain) + "\n" + json.dumps({"id": "q2", "rationales": ["d"]}) + "\n")
    out = load_teacher_rationales(str(p))
    assert out == {"q1": ["first", "second"], "q2": ["a", "b", "c", "d"]}
    rec = load_teacher_records(str(p))["q1"]
    assert rec.prompt_tokens == [10, 0] and rec.completion_tokens == [4, 3]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(plain) + "\n" + json.dumps({"id": "q3", "rationales": "not a list"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'rationales'"):
        load_teacher_rationales(str(bad))
    bad.write_text(json.dumps({"id": "q3", "response": {"choices": [{"message": {}}]}}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'response.choices\[0\].message.content'"):
        load_teacher_rationales(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: invalid JSON"):
        load_teacher_rationales(str(bad))


def test_synthetic_task_rationales_parse(synthetic_task):
    """Every rationale the synthetic teacher writes states its option's text, and the parser reads it."""
    questions = {q["id"]: q for q in synthetic_task.train_questions}
    n = agree = 0
    for r in synthetic_task.rationales:
        q = questions[r["question_id"]]
        p = parse_answer(r["text"], q["options"])
        assert p is not None, r["text"]
        n += 1
        agree += p == q["answer"]
    # wrong_rationale_rate=0.1 by default: about 90% agree, never all
    assert 0.75 < agree / n < 1.0


def test_build_messages_per_dataset():
    q = {"id": "q", "question": "Is the sky green?", "options": ["yes", "no"], "answer": 1}
    msgs = build_messages(q, "strategyqa")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "(A) yes\n(B) no" in msgs[1]["content"] and "Correct answer: (B) no" in msgs[1]["content"]
    assert "Therefore, the answer is" in msgs[0]["content"]
    solve = build_messages(q, "strategyqa", with_answer=False)
    assert "Correct answer" not in solve[1]["content"] and "Solve them in a step-by-step fashion" in solve[0]["content"]
    med = build_messages({**q, "options": ["a", "b", "c", "d"], "answer": 2}, "medqa", load_few_shot(None, "medqa", 1))
    assert "about medical knowledge" in med[0]["content"]
    assert [m["role"] for m in med] == ["system", "user", "assistant", "user"]
    assert "(C) c" in med[-1]["content"]
    for ds in ("obqa", "synthetic", "generic"):
        assert build_messages(q, ds)[0]["role"] == "system"
    with pytest.raises(ValueError, match="no teacher prompt template for dataset 'nope'"):
        build_messages(q, "nope")


def test_few_shot_file(tmp_path):
    p = tmp_path / "shots.jsonl"
    p.write_text(json.dumps({"question": "Q1?", "options": ["yes", "no"], "answer": "B", "rationale": "R1."}) + "\n"
                 + json.dumps({"question": "Q2?", "options": ["x", "y", "z"], "answer": "z", "rationale": "R2."}) + "\n")
    shots = load_few_shot(str(p), "strategyqa", 2)
    assert [s["answer"] for s in shots] == [1, 2]
    msgs = build_messages({"question": "Q?", "options": ["yes", "no"], "answer": 0}, "strategyqa", shots)
    assert msgs[2] == {"role": "assistant", "content": "R1."} and "Correct answer: (B) no" in msgs[1]["content"]
    with pytest.raises(ValueError, match="n_few_shot=3 but .* hold only 2"):
        load_few_shot(str(p), "strategyqa", 3)
    p.write_text(json.dumps({"question": "Q1?", "options": ["yes", "no"], "answer": 5, "rationale": "R"}) + "\n")
    with pytest.raises(ValueError, match=r"shots.jsonl:1: field 'answer': index 5 out of range"):
        load_few_shot(str(p), "strategyqa", 1)


OPTS4 = ["violin", "accordion", "drum", "flute"]


@pytest.mark.parametrize("generation, letter, text", [
    # cut at max_new_tokens right after the answer sentence (the fragment "A" is not an answer)
    ("Jan plays music. So the answer is (B) accordion.\nA", 1, 1),
    ("Jan plays music. So the answer is (B) accordion.\nAnsw", 1, 1),
    ("Jan plays the accordion. So the answer is accordion.\nAnswer: B\nAnswer: C\nAns", 2, 1),  # last line wins
    ("the answer is (B) accordion. the answer is (C) drum\nAnsw", 2, 2),  # the last statement wins
    ("Jan plays the accordion in a band. He also", None, 1),  # the fragment after the last sentence is ignored
    ("accordion\nAnswer: B", 1, 1),  # FT's target
    ("accordion\nAnsw", None, 1),
    ("So the answer is accordion. Answer: B. The answer is", 1, 1),  # trailing junk
    ("Answer: B", 1, None),
    ("the the the", None, None),
])
def test_parse_prediction_reads_the_stated_answer_wherever_it_stands(generation, letter, text):
    assert parse_prediction(generation, OPTS4) == {"letter": letter, "text": text}
