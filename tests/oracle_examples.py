"""Test helper: student examples straight from the synthetic task, with *oracle* knowledge (the entity's true
fact passage): tests and benchmarks of the trainer without the knowledge and teacher stages.

The pipeline never uses this; it retrieves with BM25 (`student.build_student_examples`).
"""

from __future__ import annotations

from kard_ray.data.synthetic import SyntheticTask
from kard_ray.inference.formats import answer_letter, format_source, format_target


def oracle_examples(task: SyntheticTask, variant: str = "kard") -> list[dict]:
    """{question_id, sample, source, target} rows; only rationales naming the gold option are kept
    (the task's wrong-answer rationales argue for another option)."""
    questions = {q["id"]: q for q in task.train_questions}
    passages = {p["id"]: p for p in task.passages}
    rows = []
    for r in task.rationales:
        q = questions[r["question_id"]]
        gold = q["options"][q["answer"]]
        if gold not in r["text"]:
            continue
        fact = passages[r["question_id"].split("-", 1)[1]]  # question "train-<entity>-<attr>" -> passage "<entity>-<attr>"
        knowledge = [f"{fact['title']} . {fact['text']}"] if variant == "kard" else None
        rationale = None if variant == "ft" else r["text"]
        rows.append({"question_id": r["question_id"], "sample": r["sample"],
                     "source": format_source(q["question"], q["options"], knowledge, q["dataset"]),
                     "target": format_target(rationale, answer_letter(q["answer"], len(q["options"])))})
    return rows


def oracle_validation_rows(task: SyntheticTask, n: int = 16) -> list[dict]:
    """Held-out rows for validation during training: test questions with their entity's true fact passage
    ({question, options, passages, answer}, what `training.student.Seq2SeqValidate` scores)."""
    from kard_ray.knowledge import format_passage

    passages = {p["id"]: p for p in task.passages}
    rows = []
    for q in task.test_questions[:n]:
        fact = passages[q["id"].split("-", 1)[1]]
        rows.append({"question": q["question"], "options": list(q["options"]), "answer": q["answer"],
                     "passages": [format_passage(fact["title"], fact["text"])]})
    return rows
