"""Streaming ingest of many files: exact dedup is a distributed hash shuffle that keeps the FIRST copy of
every text in listed-file order (not path order), across files and across dedup blocks."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kard_ray import io
from kard_ray.config import KnowledgeConfig


def _text(i: int) -> str:
    return f"passage number {i} about topic {i % 17} " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(12))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("shuffled", [True, False], ids=["hash-shuffled", "one-block"])
def test_dedup_across_files_and_blocks_keeps_the_first_by_file_order(ray_session, tmp_path, monkeypatch, shuffled):
    """Both ways: the hash shuffles of a large corpus, and the one block a small corpus is ingested in."""
    from kard_ray.knowledge import ingest, ingest_corpus
    from kard_ray.knowledge.text import text_hash

    rng = random.Random(3)
    n_texts = 600
    # four files, listed z, a, m, b: "first" is the listed order, not the path order
    names = ["z_first.jsonl", "a_second.jsonl.gz", "m_third.parquet", "b_fourth.jsonl"]
    files: list[list[dict]] = [[] for _ in names]
    first: dict[int, str] = {}  # text number -> id of its first copy in (listed file, line) order
    for f in range(len(names)):
        for line in range(400):
            t = rng.randrange(n_texts)
            pid = f"f{f}-l{line}"
            text = _text(t)
            if rng.random() < 0.3:  # a copy that differs only by whitespace is still a duplicate
                text = "  " + text.replace(" ", "   ", 3) + " "
            files[f].append({"id": pid, "title": "T", "text": text})
            first.setdefault(t, pid)
    paths = [tmp_path / n for n in names]
    for p, rows in zip(paths, files):
        if p.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=50)
        else:
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            p.write_bytes(gzip.compress(data) if p.name.endswith(".gz") else data)

    monkeypatch.setattr(ingest, "ONE_BLOCK_ROWS", 0 if shuffled else 4 * 400)
    run = io.RunDir(str(tmp_path / "run"))
    cfg = KnowledgeConfig(words_per_passage=100, ingest_block_rows=64)  # ~25 blocks: copies meet across blocks
    counts = ingest_corpus([str(p) for p in paths], run, cfg)
    out = io.read_table(run.passages)
    assert out.num_rows == counts["passages"] == len(first)  # every distinct text once
    assert counts["duplicates"] == 4 * 400 - len(first) and counts["files"] == 4
    hashes = [text_hash(x) for x in out.column("text").to_pylist()]
    assert len(set(hashes)) == len(hashes)  # no duplicate text survives
    assert sorted(out.column("id").to_pylist()) == sorted(first.values())  # the first copy of each
    assert len(set(out.column("id").to_pylist())) == out.num_rows  # ids unique
