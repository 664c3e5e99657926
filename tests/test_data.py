"""Question converters, row validation and rejected rows; the synthetic task."""

import gzip
import json

import pytest

from kard_ray import io
from kard_ray.data.questions import (RejectedShareError, detect_format, enforce_rejected_share, load_questions,
                                     write_rejected)
from kard_ray.data.synthetic import make_task


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_strategyqa_kard_format_counts(shared_data):
    train, rej_train = load_questions(str(shared_data / "train.jsonl"), "auto", "strategyqa", "train")
    test, rej_test = load_questions(str(shared_data / "test.jsonl"), "kard", "strategyqa", "test")
    assert (train.num_rows, test.num_rows) == (1603, 687)
    assert rej_train == [] and rej_test == []
    for t in (train, test):
        assert all(o == ["yes", "no"] for o in t.column("options").to_pylist())
        assert set(t.column("answer").to_pylist()) == {0, 1}


def test_malformed_rows_are_rejected_with_line_and_reason(tmp_path):
    good = {"id": "q1", "sent1": "Is water wet?", "sent2": "", "ending0": "yes", "ending1": "no", "ending2": "", "ending3": "", "label": 0}
    rows = [
        good,                                                  # line 1 ok
        '{"id": "q2", "sent1": "Trunc',                        # line 2 truncated JSON
        {**good, "id": "q3", "sent1": None},                   # line 3 missing question
        {**good, "id": "q4", "label": 3},                      # line 4 label out of range
        {**good, "id": "q1"},                                  # line 5 duplicate id
        {**good, "id": "q6", "ending1": ""},                   # line 6 fewer than two options
        {**good, "id": "q7", "label": "x"},                    # line 7 label wrong type
        {**good, "id": "q8"},                                  # line 8 ok
        {k: v for k, v in good.items() if k != "label"} | {"id": "q9"},  # line 9 missing label
    ]
    path = _jsonl(tmp_path / "q.jsonl", rows)
    table, rejected = load_questions(path, "kard", "strategyqa", "train")
    assert table.column("id").to_pylist() == ["q1", "q8"]
    got = {r.line: r.reason for r in rejected}
    assert set(got) == {2, 3, 4, 5, 6, 7, 9}
    assert "invalid JSON line" in got[2]
    assert got[3].startswith("sent1: missing")
    assert got[4].startswith("answer: index 3 out of range")
    assert "duplicate id 'q1'" in got[5] and ":1)" in got[5]
    assert got[6].startswith("options: fewer than two")
    assert got[7].startswith("label: expected an integer")
    assert got[9].startswith("label: missing")

    run = io.RunDir(str(tmp_path / "run"))
    where = write_rejected(run.rejected, "questions_train", rejected)
    back = io.read_table(where).to_pylist()
    assert [(r["line"], r["source"]) for r in back] == [(r.line, path) for r in rejected]
    with pytest.raises(RejectedShareError, match=r"7/9 rows rejected"):
        enforce_rejected_share("questions/train", table.num_rows, len(rejected), 0.01, where)


@pytest.mark.parametrize("fmt, row, expect", [
    ("medqa", {"question": "Which drug?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer_idx": "C"}, (["x", "y", "z", "w"], 2)),
    ("obqa", {"id": "o1", "question": {"stem": "Sun is a?", "choices": [{"text": "star", "label": "A"}, {"text": "moon", "label": "B"}]}, "answerKey": "A"}, (["star", "moon"], 0)),
    ("strategyqa", {"qid": "s1", "question": "Can fish fly?", "answer": False, "facts": []}, (["yes", "no"], 1)),
    ("generic", {"id": 5, "question": "2+2?", "options": ["3", "4"], "answer": "B"}, (["3", "4"], 1)),
    ("generic", {"id": "g2", "question": "2+2?", "options": ["3", "4"], "answer": "4"}, (["3", "4"], 1)),
])
def test_converters_detect_and_convert(tmp_path, fmt, row, expect):
    assert detect_format(row) == fmt
    for suffix, writer in (("jsonl", lambda p: _jsonl(p, [row])),
                           ("jsonl.gz", lambda p: p.write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))),
                           ("json", lambda p: p.write_text(json.dumps([row])))):
        p = tmp_path / f"q.{suffix}"
        writer(p)
        table, rejected = load_questions(str(p), "auto", "x", "train")
        assert rejected == [], rejected
        r = table.to_pylist()[0]
        assert (r["options"], r["answer"]) == expect


def test_parquet_input_and_format_errors_name_the_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": "a", "question": "q?", "options": ["x", "y"], "answer": "B"},
                                         {"id": "b", "question": "q?", "options": ["x", "y"], "answer": "Z"}]), tmp_path / "q.parquet")
    table, rejected = load_questions(str(tmp_path / "q.parquet"), "generic", "g", "test")
    assert table.num_rows == 1 and rejected[0].line == 2 and rejected[0].reason.startswith("answer: expected an option letter")


def test_synthetic_task_is_deterministic_and_split_by_entity(synthetic_cfg):
    a, b = make_task(synthetic_cfg), make_task(synthetic_cfg)
    assert a.train_questions == b.train_questions and a.passages == b.passages and a.rationales == b.rationales
    train_entities = {q["question"].split()[-1].rstrip("?") for q in a.train_questions}
    test_entities = {q["question"].split()[-1].rstrip("?") for q in a.test_questions}
    assert train_entities and test_entities and not train_entities & test_entities
    assert len(a.train_questions) == synthetic_cfg.n_train_entities * synthetic_cfg.n_attributes
    by_id = {p["id"]: p for p in a.passages}
    for q in a.test_questions:  # every test fact is in the corpus, so retrieval can answer it
        entity, attr = q["id"].split("-")[1:3]
        assert q["options"][q["answer"]] in by_id[f"{entity}-{attr}"]["text"]
    wrong = sum(1 for r in a.rationales
                if not any(r["text"].endswith(f"answer is {q['options'][q['answer']]}.") for q in a.train_questions if q["id"] == r["question_id"]))
    assert 0 < wrong < len(a.rationales) * 0.3, "a controllable share of wrong-answer rationales"
    assert len({r["question_id"] for r in a.rationales}) == len(a.train_questions)
    other = make_task(type(synthetic_cfg)(**{**synthetic_cfg.__dict__, "seed": 99}))
    assert other.passages != a.passages


@pytest.mark.parametrize("family", ["towns", "people"])
def test_synthetic_distractors_are_written_in_the_facts_own_templates(family):
    """A distractor is another entity's *true* fact, stating one of the question's wrong options, in the same
    frames the facts use with the question's entity in the frame: no template tells it apart, only whose
    fact it states. Question-only BM25 therefore cannot separate them; the rationale (right value) can."""
    import re

    import collections

    import pyarrow as pa

    from kard_ray.config import BM25Config, SyntheticConfig
    from kard_ray.data.synthetic import FAMILIES, entity_slug
    from kard_ray.inference.formats import question_query
    from kard_ray.knowledge.bm25 import BM25Index

    cfg = SyntheticConfig(family=family, n_train_entities=150, n_test_entities=30, distractor_rate=0.5,
                          listing_distractor_rate=0.0, seed=3)
    task, fam = make_task(cfg), FAMILIES[family]
    by_id = {p["id"]: p["text"] for p in task.passages}
    assert len(set(by_id.values())) == len(by_id), "no two passages share a text (dedup would drop one)"
    frames = [re.compile("^" + re.escape(f).replace(re.escape("{x}"), "(?P<x>.+?)")
                         .replace(re.escape("{fact}"), "(?P<fact>.+)").replace(re.escape("{fact_lc}"), "(?P<fact>.+)") + "$")
              for f in fam.frames]

    def frame_of(text):  # (frame index, entity in the frame, the fact sentence)
        hits = [(i, m["x"], m["fact"]) for i, rx in enumerate(frames) for m in [rx.match(text)] if m]
        assert hits, text
        return hits[0]

    true_facts = {}  # (entity slug, attribute) -> value
    for q in task.train_questions + task.test_questions:
        slug, attr = q["id"].split("-", 1)[1].rsplit("-", 1)
        true_facts[(slug, attr)] = q["options"][q["answer"]]
    used = collections.Counter()
    with_distractor = 0
    for q in task.test_questions + task.train_questions:
        slug, attr = q["id"].split("-", 1)[1].rsplit("-", 1)
        fact_frame, x, fact = frame_of(by_id[f"{slug}-{attr}"])
        assert entity_slug(x) != slug and q["options"][q["answer"]] in fact
        used[fact_frame] += 1
        d = by_id.get(f"{slug}-{attr}-d0")
        if d is None:
            continue
        with_distractor += 1
        d_frame, x, inner = frame_of(d)
        used[d_frame] += 1
        assert entity_slug(x) == slug, d  # the question's entity stands in the frame
        wrong = [o for i, o in enumerate(q["options"]) if i != q["answer"] and re.search(rf"\b{o}\b", inner)]
        assert len(wrong) == 1, (d, q["options"])
        holder = next((e for e in task.entity_split if inner.startswith(e) or f" {e} " in f" {inner} "), inner)
        assert true_facts[(entity_slug(holder), attr)] == wrong[0], d  # a true fact about somebody else
    n = len(task.train_questions) + len(task.test_questions)
    assert 0.4 * n < with_distractor < 0.6 * n and len(used) == len(fam.frames)

    # question + options: fact and distractor about a tie (BM25 top-1 right for about half of those
    # questions); the rationale finds the fact every time
    index = BM25Index.build(pa.Table.from_pylist(task.passages), BM25Config())

    tested = [q for q in task.test_questions if f"{q['id'].split('-', 1)[1]}-d0" in by_id]
    top_q = index.search([question_query(q["question"], q["options"]) for q in tested], 1)
    top_r = index.search([r["text"] for r in task.test_rationales
                          if any(r["question_id"] == q["id"] for q in tested)], 1)
    right_q = sum(ids[0] == q["id"].split("-", 1)[1] for ids, q in zip(top_q[0], tested))
    right_r = sum(ids[0] == q["id"].split("-", 1)[1] for ids, q in zip(top_r[0], tested))
    assert 0.2 * len(tested) < right_q < 0.8 * len(tested) and right_r >= 0.95 * len(tested), (right_q, right_r, len(tested))


def test_reading_a_run_table_starts_no_footer_reader_actors(ray_session, tmp_path):
    """Run tables are read through Ray Data's V1 parquet datasource (kard_ray.runtime.configure_data_context):
    V2's FooterReader actors cost new worker processes and seconds on every read_parquet."""
    import glob
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    def footer_readers() -> int:  # each actor's worker log starts with its ":actor_name:" marker
        logs = os.path.join(ray_session._private.worker._global_node.get_session_dir_path(), "logs")
        return sum(":actor_name:FooterReader" in open(f, errors="replace").read(400)
                   for f in glob.glob(os.path.join(logs, "worker-*.out")))

    before = footer_readers()
    for i in range(3):
        pq.write_table(pa.table({"id": list(range(i * 10, i * 10 + 10))}), tmp_path / f"part-{i}.parquet")
    rows = ray_session.data.read_parquet(str(tmp_path)).take_all()
    assert sorted(r["id"] for r in rows) == list(range(30))
    assert footer_readers() == before
