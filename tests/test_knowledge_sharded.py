"""Sharded exact BM25 on the real Wikipedia slice (../shared/data/strategyqa/wiki_passages.jsonl.gz).

3 shards built with global statistics == one bm25s index over everything, for 500 queries: the same
top-10 scores (bit for bit), the same ids wherever a score is not tied, and every id the shards return
scores in the single index exactly what the shards say. The Serve-style online `Retriever` (shard
actors) returns what batch `retrieve` (a Ray Data stage sharing one set of shard actors) returns.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import slice_passages

from kard_ray import io
from kard_ray.config import BM25Config, KnowledgeConfig

N_QUERIES = 500
K = 10


@pytest.fixture(scope="module")
def slice_run(shared_data, tmp_path_factory):
    """The slice's passages (non-empty, as ingest keeps them) written as a run's passages: 4 parquet
    files of uneven size, so shards cut across files."""
    rows = slice_passages(shared_data)
    run = io.RunDir(str(tmp_path_factory.mktemp("sharded") / "run"))
    io.makedirs(run.passages)
    cuts = [0, 1000, 6000, 6100, len(rows)]
    for i in range(4):
        pq.write_table(pa.Table.from_pylist(rows[cuts[i]:cuts[i + 1]]), io.join(run.passages, f"part-{i}.parquet"),
                       row_group_size=700)
    return run, rows


def _queries(rows: list[dict]) -> list[str]:
    sample = random.Random(0).sample(rows, N_QUERIES)
    # title + the first words: many distinct top-10s, and some ties at the tail
    return [f"{p['title']} {' '.join(p['text'].split()[:12])}" for p in sample]


def _assert_same_topk(single, ids_a, scores_a, ids_b, scores_b, queries):
    np.testing.assert_array_equal(scores_a, scores_b)  # bit-identical float32 scores, every rank
    untied = 0
    for q, ia, ib, sa in zip(queries, ids_a, ids_b, scores_a):
        for r in range(len(ia)):
            if np.sum(sa == sa[r]) == 1 and sa[r] != sa[-1]:  # a score no other hit shares: no tie
                assert ia[r] == ib[r], f"{q!r}: rank {r} is {ib[r]} in the shards, {ia[r]} in one index"
                untied += 1
        # ties aside, every id the shards return has exactly that score in the single index
        np.testing.assert_array_equal(single.score_pairs(q, ib), sa)
    assert untied > 0.8 * len(queries) * K


@pytest.mark.timeout(300)
def test_three_shards_equal_one_index_on_the_slice(ray_session, slice_run):
    from kard_ray.knowledge import BM25Index
    from kard_ray.knowledge.sharded import build_sharded_bm25, load_bm25, plan_slices

    run, rows = slice_run
    cfg = BM25Config()
    single = BM25Index.build(io.read_table(run.passages), cfg)
    slices = plan_slices(run.passages, 3)
    sizes = [sum(hi - lo for _, lo, hi in s) for s in slices]
    assert sum(sizes) == len(rows) and max(sizes) - min(sizes) <= 1
    assert any(len(s) > 1 for s in slices)  # a shard spans files
    stats = build_sharded_bm25(run.passages, run.bm25_index, cfg, n_shards=3)
    assert stats["shards"] == 3 and stats["passages"] == len(single) == len(rows)
    assert stats["nnz"] == len(single.bm25.scores["data"])  # the same (term, passage) pairs, split
    sharded = load_bm25(run.bm25_index)  # in this process
    assert len(sharded) == len(rows)
    queries = _queries(rows)
    ids_1, scores_1 = single.search(queries, K)
    ids_3, scores_3 = sharded.search(queries, K)
    _assert_same_topk(single, ids_1, scores_1, ids_3, scores_3, queries)
    # pair scores by id agree too (the reranker's silver labels)
    some = [r["id"] for r in random.Random(1).sample(rows, 64)]
    np.testing.assert_array_equal(sharded.score_pairs(queries[0], some), single.score_pairs(queries[0], some))
    # an unknown query term scores nothing anywhere: zeros, not an error
    _, z = sharded.search_rows(["qqqzzzunknownterm"], 3)
    assert z.tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("k", [1, 10])
def test_pruned_shards_searched_against_a_corpus_wide_floor_equal_one_index(ray_session, slice_run, tmp_path, k):
    """Large shards are searched in two rounds: the k-th best of every shard's seed scores is a floor
    under the corpus-wide k-th best, and each shard prunes against it. Forced here on the slice's 3 small
    shards: the same top-k as one index scoring every passage, with fewer passages scored."""
    from kard_ray.knowledge import BM25Index
    from kard_ray.knowledge.sharded import build_sharded_bm25, load_bm25, start_shard_actors

    run, rows = slice_run
    single = BM25Index.build(io.read_table(run.passages), BM25Config())
    build_sharded_bm25(run.passages, str(tmp_path / "bm25"), BM25Config(), n_shards=3)
    sharded = load_bm25(str(tmp_path / "bm25"))
    shards = list(sharded.local.shards.values())
    queries = _queries(rows)
    want_ids, want_scores = single.search(queries, k)  # the slice is small: every passage scored
    for idx in shards:
        idx.prune = True
    scored = {}
    for floors in (False, True):
        sharded.floors = floors
        got_ids, got_scores, scored[floors] = [], [], 0
        for q in queries:  # one at a time, to count the passages each query scores
            ids, sc = sharded.search([q], k)
            got_ids += ids
            got_scores.append(sc[0])
            scored[floors] += sum(idx._pruning.scored for idx in shards)
        if k == K:
            _assert_same_topk(single, want_ids, want_scores, got_ids, np.stack(got_scores), queries)
        else:
            np.testing.assert_array_equal(np.stack(got_scores), want_scores)
    assert scored[True] < 0.9 * scored[False], scored
    # through shard actors (2 of them), as the Serve Retriever and `retrieve` search: the floor round's
    # seed scores and floors travel to the actors and back, and the answer is the same
    actors = start_shard_actors(str(tmp_path / "bm25"), BM25Config(shards_per_actor=2))
    try:
        remote = load_bm25(str(tmp_path / "bm25"), actors=actors)
        remote.floors = True
        ids, sc = remote.search(queries, k)
        np.testing.assert_array_equal(sc, np.stack(got_scores))
    finally:
        for a in actors:
            ray_session.kill(a)


@pytest.mark.timeout(300)
def test_serve_retriever_over_shard_actors_equals_batch_retrieve(ray_session, slice_run):
    from kard_ray.knowledge import Retriever, retrieve
    from kard_ray.knowledge.sharded import ShardedBM25

    run, rows = slice_run
    cfg = KnowledgeConfig(bm25=BM25Config(shards=3, shards_per_actor=2), retrieval_actors=2, retrieval_batch_size=64)
    from kard_ray.knowledge import build_indexes

    build_indexes(run, cfg)
    queries = _queries(rows)[:200]
    online = Retriever.from_run_dir(run.root, cfg, num_threads=1)  # what the Serve deployment builds
    assert isinstance(online.bm25, ShardedBM25) and len(online.bm25.actors) == 2  # shards {0,1} and {2}
    one_at_a_time = [online.search([q], K)[0] for q in queries[:50]]
    batched = online.search(queries, K)
    for a, b in zip(one_at_a_time, batched):
        assert a == b
    ds = ray_session.data.from_items([{"q": q} for q in queries])
    out = retrieve(ds, "q", K, run.root, cfg).to_pandas()
    got = {r.q: (list(r.passage_ids), list(r.passage_scores)) for r in out.itertuples()}
    for q, hits in zip(queries, batched):
        ids, scores = got[q]
        assert ids == [h["id"] for h in hits], q
        np.testing.assert_array_equal(np.float32(scores), np.float32([h["score"] for h in hits]))
        assert all(isinstance(h["text"], str) and h["text"] for h in hits)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_pruned_top_k_equals_scoring_every_passage(slice_run, k):
    """MaxScore pruning (bm25.exact_top_k) returns what scoring every passage with bm25s returns: the same
    float32 scores, and the same rows with equal scores in the smaller row first -- while scoring only a
    fraction of the passages the query matches."""
    from kard_ray.knowledge import BM25Index
    from kard_ray.knowledge.bm25 import PostingLists, exact_top_k

    run, rows = slice_run
    index = BM25Index.build(io.read_table(run.passages), BM25Config())
    lists = PostingLists.of(index.bm25)
    rng = random.Random(2)
    queries = _queries(rows)[:200] + [
        " ".join(rng.choice(rows)["text"].split()[:n]) for n in (1, 2, 3, 30)] + [
        "river river river bank", "Paris", "qqqzzzunknownterm", "the of and"]  # repeats, stopwords only
    pruned_some = 0
    for q in queries:
        qids = index.query_token_ids(q)
        full = index.bm25.get_scores_from_ids(qids) if qids else np.zeros(len(index), np.float32)
        want = np.lexsort((np.arange(len(full)), -full))[:k]  # by score, then the smaller row
        for prune in (True, False):
            got_rows, got_scores = exact_top_k(lists, qids, k, prune=prune)
            np.testing.assert_array_equal(got_scores, full[want], err_msg=q)
            np.testing.assert_array_equal(got_rows, want, err_msg=q)
            if prune and qids:
                matched = np.count_nonzero(full)
                pruned_some += lists.scored < matched
    assert pruned_some > 0.5 * len(queries)  # the pruned path really skipped passages (k=100: 58%)
