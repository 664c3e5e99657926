"""Student examples (KARD / RD / FT), tokenisation with explicit truncation, and train_student."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from kard_ray import io
from kard_ray.inference.formats import answer_letter, encode_sources, format_source, format_target
from kard_ray.training.student import (
    Seq2SeqCollate, _tokenizer, build_student_examples, count_target_tokens, encode_targets, train_student,
)


# ------------------------------------------------------------------------------------------------
# formatting (KARD.md §3, the authors' templates)


def test_format_source_kard_and_rd_strategyqa_style():
    src = format_source("Is the sky green?", ["yes", "no"], ["Sky . The sky is blue.", "Grass . Grass\nis green."],
                        "strategyqa")
    assert src == ("The following are multiple-choice questions. Generate a step-by-step explanations for each "
                   "question.\nQuestion: Is the sky green? A. yes B. no\n"
                   "Knowledge: Sky . The sky is blue.\tGrass . Grass is green.\nExplanation:")
    rd = format_source("Is the sky green?", ["yes", "no"], None, "strategyqa")
    assert rd == ("The following are multiple-choice questions. Generate a step-by-step explanations for each "
                  "question.\nQuestion: Is the sky green? A. yes B. no\nExplanation:")


def test_format_source_medqa_names_the_domain():
    src = format_source("Which drug?", ["a", "b", "c", "d"], ["T . x"], "medqa")
    assert src.startswith("The following are multiple-choice questions about medical knowledge. Generate a "
                          "step-by-step explanations for each question with given medical knowledge.\n")
    assert "\nQuestion: Which drug? A. a B. b C. c D. d\nKnowledge: T . x\nExplanation:" in src
    rd = format_source("Which drug?", ["a", "b", "c", "d"], None, "medqa")
    assert "with given medical knowledge" not in rd and "Knowledge:" not in rd


def test_format_target_and_letters():
    assert format_target("Because X.  ", "B") == "Because X.\nAnswer: B"
    assert format_target(None, "C") == "Answer: C"  # FT: the answer alone
    assert answer_letter(0) == "A" and answer_letter(3, 4) == "D"
    with pytest.raises(ValueError):
        answer_letter(4, 4)
    with pytest.raises(ValueError, match="2-26 options"):
        format_source("q", ["only"], None, "generic")


# ------------------------------------------------------------------------------------------------
# tokenisation


def test_encode_sources_truncates_the_middle_and_keeps_the_suffix(tiny_t5_dir):
    tok = _tokenizer(tiny_t5_dir)
    short = format_source("What is the main export of Tralk?", ["salt", "tin"], ["Tralk . The main export is tin."],
                          "synthetic")
    long = format_source("What is the main export of Tralk?", ["salt", "tin"], ["Tralk . " + "silk wool " * 200],
                         "synthetic")
    plain = tok([short, long])["input_ids"]
    assert encode_sources(tok, [short], 128)[0] == plain[0]  # a source that fits: exactly the tokenizer's ids
    enc = encode_sources(tok, [short, long], len(plain[0]))
    assert enc[0] == plain[0]
    assert len(plain[1]) > len(plain[0]) and len(enc[1]) == len(plain[0])
    assert enc[1][-1] == tok.eos_token_id
    assert tok.decode(enc[1], skip_special_tokens=True).endswith("\nExplanation:")
    assert enc[1][:20] == plain[1][:20]  # the head (instruction, question) survives


def test_encode_targets_are_not_cut_unless_configured(tiny_t5_dir):
    tok = _tokenizer(tiny_t5_dir)
    target = format_target("word " * 300, "A")
    full = encode_targets(tok, [target])[0]
    assert len(full) > 300 and full[-1] == tok.eos_token_id
    cut = encode_targets(tok, [target], 32)[0]
    assert len(cut) == 32 and cut[-1] == tok.eos_token_id


def test_collate_pads_dynamically_with_minus_100_labels():
    batch = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
             "labels": np.array([np.array([9]), np.array([3, 4])], dtype=object)}
    out = Seq2SeqCollate(pad_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[9, -100], [3, 4]]
    assert count_target_tokens(out) == 3


# ------------------------------------------------------------------------------------------------
# examples from a run directory (questions + BM25 index + rationales)


@pytest.fixture(scope="module")
def student_run(ray_session, synthetic_cfg, synthetic_task, tmp_path_factory):
    from kard_ray.config import DataConfig, KardConfig
    from kard_ray.data import schemas
    from kard_ray.data.stage import synthetic_inputs, write_synthetic_inputs
    from kard_ray.knowledge import build_indexes, ingest_corpus

    cfg = KardConfig(run_dir=str(tmp_path_factory.mktemp("student_run")), data=DataConfig(synthetic=synthetic_cfg))
    run = io.RunDir(cfg.run_dir)
    write_synthetic_inputs(cfg, run)
    ingest_corpus([synthetic_inputs(run)["corpus"]], run, cfg.knowledge)
    build_indexes(run, cfg.knowledge)
    questions = {q["id"]: q for q in synthetic_task.train_questions}
    rows = []
    for r in synthetic_task.rationales:  # what the teacher stage writes, with the parse filter's verdict
        q = questions[r["question_id"]]
        ok = q["options"][q["answer"]] in r["text"]
        rows.append({**r, "parsed_answer": q["answer"] if ok else None, "consistent": ok, "teacher": "synthetic",
                     "prompt_tokens": 0, "completion_tokens": 0, "error": None})
    io.write_table(pa.Table.from_pylist(rows, schema=schemas.RATIONALES), io.join(run.rationales, "part-0.parquet"))
    return cfg, run, rows


def _read(path: str) -> list[dict]:
    return io.read_table(path).to_pylist()


@pytest.mark.timeout(300)
def test_kard_examples_carry_the_passage_the_rationale_retrieves(student_run, synthetic_task):
    cfg, run, rationales = student_run
    path = build_student_examples(cfg, run, "kard")
    assert path == run.examples("student_kard")
    ex = _read(path)
    kept = [r for r in rationales if r["consistent"]]
    assert len(ex) == len(kept) and set(ex[0]) == {"question_id", "sample", "source", "target"}
    facts = {p["id"]: p["text"] for p in synthetic_task.passages}
    hit = 0
    for e in ex:
        assert "\nKnowledge: " in e["source"] and e["source"].endswith("\nExplanation:")
        assert e["target"].rsplit("\nAnswer: ", 1)[1] in "ABCD"
        hit += facts[e["question_id"].split("-", 1)[1]] in e["source"]
    # the rationale restates the fact, so BM25 by rationale finds the fact passage almost always
    assert hit / len(ex) > 0.9, hit / len(ex)


@pytest.mark.timeout(300)
def test_rd_and_ft_examples(student_run, synthetic_task):
    cfg, run, rationales = student_run
    rd = _read(build_student_examples(cfg, run, "rd"))
    assert len(rd) == sum(r["consistent"] for r in rationales)
    assert all("Knowledge:" not in e["source"] and "\nAnswer: " in e["target"] for e in rd)
    ft = _read(build_student_examples(cfg, run, "ft"))
    assert len(ft) == len(synthetic_task.train_questions)  # one per question, rationales unused
    by_id = {q["id"]: q for q in synthetic_task.train_questions}
    for e in ft:  # FT: the answer alone, its option text then its letter
        q = by_id[e["question_id"]]
        assert e["target"] == f"{q['options'][q['answer']]}\nAnswer: {'ABCD'[q['answer']]}"


@pytest.mark.timeout(300)
def test_rationale_cap_and_bad_rows(student_run, tmp_path):
    import dataclasses

    from kard_ray.data import schemas

    cfg, run, rationales = student_run
    capped = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, max_rationales_per_question=1))
    rd = _read(build_student_examples(capped, run, "rd"))
    assert len(rd) == len({r["question_id"] for r in rationales if r["consistent"]})
    assert all(e["sample"] == min(r["sample"] for r in rationales if r["question_id"] == e["question_id"]
                                  and r["consistent"]) for e in rd)

    bad_run = io.RunDir(str(tmp_path / "bad"))
    io.write_bytes(bad_run.questions("train"), io.read_bytes(run.questions("train")))
    rows = [dict(rationales[0]), {**rationales[1], "question_id": "no-such-question"}]
    io.write_table(pa.Table.from_pylist(rows, schema=schemas.RATIONALES), io.join(bad_run.rationales, "p.parquet"))
    with pytest.raises(ValueError, match=r"rationales: row 1: question_id 'no-such-question'"):
        build_student_examples(cfg, bad_run, "rd")
    with pytest.raises(ValueError, match="variant"):
        build_student_examples(cfg, run, "cot")


@pytest.mark.timeout(300)
def test_train_student_in_process(student_run, tiny_t5_dir):
    import dataclasses

    from kard_ray.models import load_seq2seq

    cfg, run, _ = student_run
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(
        cfg.student, num_workers=0, batch_size=8, max_steps=6, lr=2e-3, log_every_steps=3, max_source_length=96))
    r = train_student(cfg, run, "kard", tiny_t5_dir)
    assert r["steps"] == 6 and r["variant"] == "kard" and r["examples"] > 0
    assert r["model_dir"] == run.model("student_kard")
    assert os.path.exists(io.join(r["model_dir"], "train_log.jsonl"))
    assert load_seq2seq(r["model_dir"]) is not None


@pytest.mark.timeout(600)
def test_validation_holds_out_entities_and_scores_them_as_test_time_does(student_run, tiny_t5_dir, tmp_path):
    """student.validation_fraction holds whole training entities out of the examples; their questions are
    validated with what test time has (KARD: passages BM25 retrieves by the question), every N steps,
    logged, and the best step exported."""
    import dataclasses
    import shutil

    from kard_ray.data.stage import validation_group
    from kard_ray.inference.formats import question_query
    from kard_ray.knowledge import Retriever, format_passage
    from kard_ray.training.student import validation_path

    cfg0, run0, _ = student_run
    shutil.copytree(run0.root, tmp_path / "run")  # the module's run stays as the other tests expect it
    cfg = dataclasses.replace(cfg0, run_dir=str(tmp_path / "run"), student=dataclasses.replace(
        cfg0.student, num_workers=0, batch_size=8, max_steps=6, lr=2e-3, log_every_steps=3, max_source_length=96,
        validation_fraction=0.25, validate_every_steps=3))
    run = io.RunDir(cfg.run_dir)
    build_student_examples(cfg, run, "kard")
    held = _read(validation_path(run, "kard"))
    trained = {r["question_id"] for r in _read(run.examples("student_kard"))}
    assert held and trained
    held_groups = {validation_group(r["question_id"], "synthetic") for r in held}
    assert not {validation_group(q, "synthetic") for q in trained} & held_groups  # no fact of a held entity trained
    retriever = Retriever.from_run_dir(run.root, cfg.knowledge)
    for r in held[:5]:  # the passages test time would retrieve, by the question
        (hit,) = retriever.search([question_query(r["question"], r["options"])], cfg.eval.k)
        assert r["passages"] == [format_passage(p["title"], p["text"]) for p in hit]
    result = train_student(cfg, run, "kard", tiny_t5_dir)
    summary = io.read_json(io.join(run.model("student_kard"), "train_summary.json"))
    assert set(summary["val_accuracy"]) == {"3", "6"} and summary["exported_step"] in (3, 6)
    assert summary["best_val_accuracy"] == max(summary["val_accuracy"].values()) and result["steps"] == 6
