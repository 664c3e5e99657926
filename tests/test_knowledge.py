"""Knowledge layer: chunking, ingest with rejections, BM25, dense/faiss, hybrid fusion, batch vs online retrieval."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kard_ray import io
from kard_ray.config import BM25Config, DenseConfig, KnowledgeConfig
from kard_ray.knowledge import BM25Index, BM25Tokenizer, format_passage, rrf_fuse, split_words
from kard_ray.knowledge.ingest import RAW_SCHEMA, chunk_table, dedup_block, unique_ids_block

NON_ASCII = "Zürich's café serves crème brûlée; 東京 and Москва are capitals — naïve façade ñandú"


def _raw(rows: list[dict]) -> pa.Table:
    base = {"source": "/c/corpus.jsonl", "line": 1, "doc_id": None, "generated_id": False, "title": "",
            "text": None, "reason": None, "raw": None}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=RAW_SCHEMA)


# ----------------------------------------------------------------------------------------------
# text, chunking, tokenisation (no Ray)


def test_format_passage():
    assert format_passage("M-tree", "M-trees are trees.") == "M-tree . M-trees are trees."
    assert format_passage("", "Just text.") == "Just text."


def test_split_words_long_document_overlap_and_tail():
    words = [f"w{i}" for i in range(1234)]
    pieces = split_words(" ".join(words), 100, 20)
    assert len(pieces) > 10
    step = 80
    for i, p in enumerate(pieces[:-1]):
        assert p.split() == words[i * step:i * step + 100]
    # every word is covered, in order, and the last window ends at the last word
    assert pieces[-1].split()[-1] == "w1233"
    covered = set()
    for p in pieces:
        covered.update(p.split())
    assert covered == set(words)
    # a short remainder joins the previous window instead of becoming a stub passage
    assert [len(p.split()) for p in split_words(" ".join(words[:210]), 100)] == [100, 110]
    assert [len(p.split()) for p in split_words(" ".join(words[:250]), 100)] == [100, 100, 50]
    assert split_words("   \n ", 100) == []
    assert split_words("one two", 100) == ["one two"]


def test_split_words_non_ascii_is_kept_intact():
    text = " ".join([NON_ASCII] * 20)
    pieces = split_words(text, 16, 4)
    assert len(pieces) > 10
    assert " ".join(pieces[0].split()[:3]) == "Zürich's café serves"
    assert all("\ufffd" not in p for p in pieces)


def test_tokenizer_keeps_one_character_tokens_and_non_ascii():
    tok = BM25Tokenizer(BM25Config())
    toks = tok("The answer is (B) 5, not the Zürich or 東京 one.")
    assert "b" in toks and "5" in toks  # bm25s's default pattern would drop both
    assert "the" not in toks and "is" not in toks  # English stopwords
    assert "zürich" in toks and "東京" in toks
    assert BM25Tokenizer(BM25Config(stopwords=None))("the a") == ["the", "a"]


def test_tokenizer_stemming():
    pytest.importorskip("Stemmer", reason="optional: pip install PyStemmer")
    tok = BM25Tokenizer(BM25Config(stemmer="english"))
    assert tok("running runs") == [tok("run")[0]] * 2


def test_chunk_table_rejects_empty_and_splits_with_ids_and_titles():
    long_text = " ".join(f"word{i}" for i in range(1100))
    table = chunk_table(_raw([
        {"line": 1, "doc_id": "d1", "title": "Long", "text": long_text},
        {"line": 2, "reason": "text: empty", "raw": '{"id": "e", "text": ""}'},
        {"line": 3, "doc_id": "d3", "title": "Wörter", "text": NON_ASCII},
    ]), words_per_passage=100, overlap_words=0)
    rows = table.to_pylist()
    long_rows = [r for r in rows if r["line"] == 1]
    assert len(long_rows) == 11
    assert [r["id"] for r in long_rows] == [f"d1_{i}" for i in range(11)]
    assert {r["title"] for r in long_rows} == {"Long"}
    assert sum(r["doc_start"] for r in rows) == 2
    rejected = [r for r in rows if r["reason"]]
    assert len(rejected) == 1 and rejected[0]["line"] == 2 and rejected[0]["raw"]
    short = [r for r in rows if r["line"] == 3][0]
    assert short["id"] == "d3" and short["text"] == NON_ASCII and not short["generated"]


def test_dedup_and_unique_ids_blocks():
    t = chunk_table(_raw([
        {"line": 1, "doc_id": "a", "title": "A", "text": " ".join(f"x{i}" for i in range(200))},  # a_0, a_1
        {"line": 2, "doc_id": "a_1", "title": "B", "text": "a corpus id that a generated id collides with"},
        {"line": 3, "doc_id": "c", "title": "C", "text": "same   text"},
        {"line": 4, "doc_id": "d", "title": "D", "text": "same text"},  # whitespace-normalised duplicate
        {"line": 5, "doc_id": "c", "title": "C2", "text": "another text under a repeated id"},
    ]), 100, 0)
    t = t.filter(pa.compute.is_null(t.column("reason")))
    deduped = dedup_block(t)
    assert deduped.num_rows == t.num_rows - 1
    assert "d" not in deduped.column("id").to_pylist()  # the later copy (line 4) is dropped
    out = {(r["line"], r["piece"]): r["id"] for r in unique_ids_block(deduped).to_pylist()}
    assert out[(2, 0)] == "a_1"  # the corpus id keeps its name ...
    assert out[(1, 1)] == "a_1~1"  # ... the generated one is renamed
    assert out[(3, 0)] == "c" and out[(5, 0)] == "c~1"  # repeated corpus id: first in file order keeps it


# ----------------------------------------------------------------------------------------------
# BM25 (no Ray)


def _passages(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.table({"id": [r[0] for r in rows], "title": [r[1] for r in rows], "text": [r[2] for r in rows]})


SMALL = _passages([
    ("p1", "Copper", "The main export of Zanthor is copper, mined in the hills."),
    ("p2", "Silk", "Silk is woven in Brelk; its flag is green."),
    ("p3", "Option B", "Option B is the answer with value 5."),
    ("p4", "Zürich", "Zürich liegt am Zürichsee; 東京 is far away."),
    ("p5", "Copper trade", "Copper and tin were traded across the sea by Zanthor merchants."),
])


@pytest.fixture(scope="module")
def small_bm25() -> BM25Index:
    return BM25Index.build(SMALL, BM25Config())


def test_bm25_search_ranks_and_shapes(small_bm25):
    ids, scores = small_bm25.search(["main export of Zanthor", "b 5", "東京 Zürich", "zzzz unknown"], k=3)
    assert ids[0][0] == "p1" and ids[1][0] == "p3" and ids[2][0] == "p4"
    assert scores.shape == (4, 3) and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.all(scores[3] == 0)  # no indexed term: zero scores, still k results
    ids, scores = small_bm25.search(["copper"], k=50)  # k larger than the corpus is clamped
    assert scores.shape == (1, 5) and set(ids[0][:2]) == {"p1", "p5"}


def test_bm25_score_pairs_equal_full_search(small_bm25):
    for q in ["copper Zanthor merchants", "copper copper sea", "flag green silk", "B 5"]:
        ids, scores = small_bm25.search([q], k=5)
        np.testing.assert_array_equal(small_bm25.score_pairs(q, ids[0]), scores[0])
        rev = list(reversed(ids[0]))
        np.testing.assert_array_equal(small_bm25.score_pairs(q, rev), scores[0][::-1])
    with pytest.raises(KeyError, match="nope"):
        small_bm25.score_pairs("copper", ["p1", "nope"])


def test_bm25_get_and_duplicate_ids():
    idx = BM25Index.build(SMALL, BM25Config())
    assert idx.get(["p4", "p1"]) == [{"id": "p4", "title": "Zürich", "text": SMALL.column("text")[3].as_py()},
                                     {"id": "p1", "title": "Copper", "text": SMALL.column("text")[0].as_py()}]
    with pytest.raises(ValueError, match="'p1' occurs more than once"):
        BM25Index.build(pa.concat_tables([SMALL, SMALL.slice(0, 1)]), BM25Config())


@pytest.mark.parametrize("uri", [False, True])
def test_bm25_save_load_identical(tmp_path, small_bm25, uri, monkeypatch):
    monkeypatch.setenv("KARD_INDEX_CACHE", str(tmp_path / "cache"))
    path = f"file://{tmp_path}/bm25" if uri else str(tmp_path / "bm25")
    small_bm25.save(path)
    small_bm25.save(path)  # overwriting an index is fine
    loaded = BM25Index.load(path)
    queries = ["main export of Zanthor", "b 5", "東京", "copper tin sea"]
    a_ids, a_scores = small_bm25.search(queries, 4)
    b_ids, b_scores = loaded.search(queries, 4)
    assert a_ids == b_ids
    np.testing.assert_array_equal(a_scores, b_scores)
    np.testing.assert_array_equal(loaded.score_pairs("copper", ["p5", "p1"]), small_bm25.score_pairs("copper", ["p5", "p1"]))
    assert loaded.get(["p2"]) == small_bm25.get(["p2"])
    with pytest.raises(FileNotFoundError):
        BM25Index.load(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------
# dense index and fusion (no Ray)


@pytest.mark.parametrize("index_type,refine", [("flat", None), ("hnsw", None), ("ivfpq", None), ("ivfpq", "sq8"),
                                                ("ivfpq", "flat")])
def test_dense_index_save_load_identical(tmp_path, index_type, refine):
    from kard_ray.knowledge.dense import DenseIndex

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(600, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cfg = DenseConfig(index_type=index_type, nlist=32, pq_m=8, nprobe=8, hnsw_m=16,  # 32 lists > 600/39: warns, uses 15
                      refine=refine)
    with pytest.warns(UserWarning) if index_type == "ivfpq" else _nullcontext():
        index = DenseIndex.build([f"v{i}" for i in range(600)], vecs, cfg)
    rows, scores = index.search(vecs[:50], 5)
    if index_type != "ivfpq" or refine == "flat":  # exact, HNSW and full-vector re-scoring find the vector itself
        assert np.all(rows[:, 0] == np.arange(50))
    index.save(str(tmp_path / "faiss"))
    loaded = DenseIndex.load(str(tmp_path / "faiss"))
    rows2, scores2 = loaded.search(vecs[:50], 5)
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(scores, scores2)
    assert loaded.ids.to_pylist()[:3] == ["v0", "v1", "v2"]


def test_refining_ivfpq_candidates_raises_recall():
    """IVF-PQ's 8-bit codes are approximate; re-scoring its refine_k_factor x k best with SQ8 or full vectors
    (faiss IndexRefine) recovers what PQ loses: recall@10 vs exact search rises, up to nearly all with
    full vectors."""
    from kard_ray.knowledge.dense import DenseIndex

    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(4000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = vecs[:200] + 0.3 * rng.normal(size=(200, 32)).astype(np.float32)
    ids = [f"v{i}" for i in range(len(vecs))]
    exact, _ = DenseIndex.build(ids, vecs, DenseConfig(index_type="flat")).search(queries, 10)
    recall = {}
    for refine in (None, "sq8", "flat"):
        index = DenseIndex.build(ids, vecs, DenseConfig(index_type="ivfpq", nlist=32, pq_m=8, nprobe=32,
                                                        refine=refine, refine_k_factor=8))
        got, _ = index.search(queries, 10)
        recall[refine] = np.mean([len(set(e) & set(g)) / 10 for e, g in zip(exact.tolist(), got.tolist())])
    assert recall[None] < 0.8 < recall["sq8"] and recall["flat"] > 0.95, recall
    with pytest.raises(ValueError, match="knowledge.dense.refine"):
        DenseConfig(index_type="hnsw", refine="sq8")


def test_dense_ivfpq_rejects_bad_pq_m():
    from kard_ray.knowledge.dense import DenseIndex

    with pytest.raises(ValueError, match="pq_m=7 must divide"):
        DenseIndex.build(["a"] * 300, np.ones((300, 32), np.float32), DenseConfig(index_type="ivfpq", pq_m=7))


def test_rrf_fuse():
    bm25 = (np.array([3, 1, 2]), np.array([9.0, 5.0, 1.0]))
    dense = (np.array([1, 4, -1]), np.array([0.9, 0.8, 0.0]))
    rows, scores = rrf_fuse([bm25, dense], k=3, rrf_k=60)
    assert rows.tolist() == [1, 3, 4]  # 1 is in both lists; 3 (rank 1) beats 4 (rank 2); -1 skipped
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------------------------------------
# ingest with Ray Data


def _write_jsonl(path, rows, gz=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as fh:
        fh.write(data)


@pytest.mark.timeout(180)
def test_ingest_corpus_formats_rejections_dedup_and_ids(ray_session, tmp_path):
    from kard_ray.data.questions import RejectedShareError
    from kard_ray.knowledge import ingest_corpus

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    long_text = " ".join(f"token{i}" for i in range(1150))  # 1150 words -> 11 passages of 100 + one of 50
    _write_jsonl(corpus / "a.jsonl", [
        {"id": "doc1", "title": "Long", "text": long_text},
        {"id": "doc2", "title": "Städte", "text": NON_ASCII},
        "{not json",
        {"id": "doc3", "title": "Empty", "text": "   "},
        {"id": "doc4", "title": 7, "text": "a title that is a number"},
        {"title": "No id", "contents": "Pyserini-style contents field without an id"},
    ])
    _write_jsonl(corpus / "sub" / "b.jsonl.gz", [
        {"id": 42, "title": "Int id", "text": "an integer id becomes a string"},
        {"id": "doc2-copy", "title": "Städte", "text": NON_ASCII},  # duplicate text -> dropped
        {"id": "doc1_3", "title": "Clash", "text": "a corpus id equal to a generated piece id"},
    ], gz=True)
    pq.write_table(pa.table({"id": ["pq1", "pq2"], "title": ["Parquet", "Parquet"],
                             "text": ["a passage read from parquet", None]}), corpus / "c.parquet")
    (corpus / "notes.txt").write_text("ignored: not a corpus suffix")

    # pyarrow-filesystem URIs for the corpus and the run directory (local paths: the tests below)
    run = io.RunDir(f"file://{tmp_path}/run")
    cfg = KnowledgeConfig(words_per_passage=100)
    counts = ingest_corpus([f"file://{corpus}"], run, cfg, max_rejected_fraction=0.5)
    assert counts["rejected"] == 4  # bad JSON, blank text, numeric title, null text (parquet)
    assert counts["documents"] == 7 and counts["duplicates"] == 1 and counts["renamed_ids"] == 1
    passages = {r["id"]: r for r in io.read_table(run.passages).to_pylist()}
    assert counts["passages"] == len(passages) == 12 + 5
    assert passages["doc1_0"]["title"] == "Long" and passages["doc1_11"]["text"].endswith("token1149")
    assert passages["doc1_3"]["title"] == "Clash" and passages["doc1_3~1"]["title"] == "Long"
    assert passages["doc2"]["text"] == NON_ASCII and "doc2-copy" not in passages
    assert passages["42"]["text"] == "an integer id becomes a string"
    assert passages["a-6"]["text"].startswith("Pyserini-style")  # generated id: file stem + line
    rejected = io.read_table(run.rejected).to_pylist()
    by_line = {(os.path.basename(r["source"]), r["line"]): r["reason"] for r in rejected}
    assert by_line[("a.jsonl", 3)].startswith("json: invalid JSON line")
    assert by_line[("a.jsonl", 4)] == "text: empty"
    assert by_line[("a.jsonl", 5)] == "title: expected a string, got int"
    assert by_line[("c.parquet", 2)].startswith("text: missing")
    assert all(r["stage"] == "ingest" for r in rejected)

    # rerun replaces (not appends) passages and rejections; a strict threshold fails the stage
    with pytest.raises(RejectedShareError, match="4/11 rows rejected"):
        ingest_corpus([f"file://{corpus}"], run, cfg, max_rejected_fraction=0.01)
    assert len(io.read_table(run.rejected)) == 4
    with pytest.raises(ValueError, match="unsupported corpus file"):
        ingest_corpus([str(corpus / "notes.txt")], run, cfg)


# ----------------------------------------------------------------------------------------------
# full build + batch vs online retrieval on the synthetic corpus


@pytest.fixture(scope="module")
def synthetic_run(ray_session, tmp_path_factory, synthetic_task, tiny_bert_dir):
    from kard_ray.knowledge import build_indexes, ingest_corpus

    root = tmp_path_factory.mktemp("knowledge_run")
    corpus = root / "inputs" / "synthetic_corpus.jsonl"
    corpus.parent.mkdir()
    _write_jsonl(corpus, synthetic_task.passages)
    run = io.RunDir(str(root))
    cfg = KnowledgeConfig(retriever="hybrid", retrieval_actors=2, retrieval_batch_size=16,
                          dense=DenseConfig(encoder=tiny_bert_dir, num_actors=1, num_cpus_per_actor=1.0, batch_size=64))
    counts = ingest_corpus([str(corpus)], run, cfg)
    stats = build_indexes(run, cfg)
    return run, cfg, counts, stats


@pytest.mark.timeout(300)
def test_build_indexes_writes_both_indexes(synthetic_run, synthetic_task):
    run, cfg, counts, stats = synthetic_run
    assert counts["passages"] == len(synthetic_task.passages) - counts["duplicates"]
    assert stats["bm25"]["passages"] == counts["passages"]
    assert stats["dense"]["passages"] == counts["passages"] and stats["dense"]["dim"] == 64
    assert io.exists(run.bm25_index) and io.exists(run.faiss_index)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["bm25", "hybrid"])  # hybrid runs the dense path too
def test_batch_retrieval_on_two_actors_equals_online(synthetic_run, synthetic_task, mode):
    import dataclasses

    import ray

    from kard_ray.knowledge import Retriever, retrieve

    run, cfg, _, _ = synthetic_run
    cfg = dataclasses.replace(cfg, retriever=mode)
    questions = [q["question"] for q in synthetic_task.train_questions[:60]]
    online = Retriever.from_run_dir(run.root, cfg).search(questions, k=4)
    ds = ray.data.from_items([{"qid": i, "question": q, "options": ["x", "y"]} for i, q in enumerate(questions)])
    rows = sorted(retrieve(ds, "question", 4, run.root, cfg, prefix="q_").take_all(), key=lambda r: r["qid"])
    assert len(rows) == len(questions) and list(rows[0]["options"]) == ["x", "y"]
    for row, hits in zip(rows, online):
        assert list(row["q_passage_ids"]) == [h["id"] for h in hits]
        assert list(row["q_passage_titles"]) == [h["title"] for h in hits]
        assert list(row["q_passage_texts"]) == [h["text"] for h in hits]
        np.testing.assert_allclose(row["q_passage_scores"], [h["score"] for h in hits], rtol=1e-6)
    if mode == "bm25":  # a question names its entity, whose fact passage BM25 should find
        entity_hit = np.mean([q["question"].rstrip("?").split()[-1] in r["q_passage_texts"][0]
                              for q, r in zip(synthetic_task.train_questions[:60], rows)])
        assert entity_hit > 0.8


@pytest.mark.timeout(120)
def test_retriever_score_pairs_match_search(synthetic_run):
    from kard_ray.knowledge import Retriever

    run, cfg, _, _ = synthetic_run
    import dataclasses

    r = Retriever.from_run_dir(run.root, dataclasses.replace(cfg, retriever="bm25"))
    q = "The main export of this town is copper, so the answer is copper."
    hits = r.search([q], k=8)[0]
    np.testing.assert_array_equal(r.score_pairs(q, [h["id"] for h in hits]), np.float32([h["score"] for h in hits]))
