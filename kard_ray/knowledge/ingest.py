"""Corpus ingest: raw corpus files -> `<run>/passages/` (parquet: id, title, text), with Ray Data.

Pipeline (nothing passes through the driver but counts):

    read (CorpusDatasource: JSONL / .jsonl.gz / parquet, any pyarrow filesystem, line numbers kept)
      -> normalise + validate each row (bad rows become rejections: file, line, reason, raw)
      -> split long documents into passages of `words_per_passage` words (`overlap_words` shared)
      -> [materialised in the object store: counts + rejected rows are read from here]
      -> hash-shuffle by text hash, keep the first copy of each text          (dedup, counted)
      -> hash-shuffle by passage id, make every id unique                      (rule below)
      -> write parquet

Input rows: JSON objects (or parquet rows) with a text field (`text`, `contents` or `abstract`), an
optional `title`, and an optional id (`id`, `_id`, `docid`, `doc_id` or `pmid`; integers become
strings). Rejected: not JSON / not an object, text missing, not a string or blank, a title or id of the
wrong type, invalid UTF-8.

Passage ids:
  * a document that fits in one passage keeps its corpus id (the Wikipedia slice's "27481099_2");
  * a document split into n > 1 passages gets `{doc_id}_{piece}` with piece = 0..n-1;
  * a document without an id gets `{file stem}-{line}` first (e.g. `corpus-17`);
  * if an id is still taken twice, the holder that comes first — corpus ids before generated ones,
    then (file path, line, piece) order — keeps it and the others become `{id}~1`, `{id}~2`, ...
    (counted as `renamed_ids`). Building the BM25 index re-checks global uniqueness.
"First" for duplicates means first in (file order, line, piece) order, file order being the order of
`knowledge.corpus_paths` as listed (a directory's files sorted by path): a corpus listed first wins
its duplicates, and reruns give the same passages. Dedup is a Ray Data hash shuffle on the text hash:
every copy of a text lands in one reduce block, which keeps the first by that order — no process,
the driver included, holds more than a block of the corpus.
"""

from __future__ import annotations

import io as _io
import json
import posixpath
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kard_ray import io
from kard_ray.config import KnowledgeConfig
from kard_ray.data import schemas
from kard_ray.data.questions import enforce_rejected_share
from kard_ray.knowledge.text import split_words, text_hash
from kard_ray.console import say

CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".parquet")
TEXT_KEYS = ("text", "contents", "abstract")
ID_KEYS = ("id", "_id", "docid", "doc_id", "pmid")
STAGE = "ingest"
# Up to this many chunked passages, dedup and id uniqueness run on one block instead of two hash shuffles
# (a few tens of MB of Arrow; measured in README "Streaming ingest").
ONE_BLOCK_ROWS = 100_000

# Rows as read: one per input line/row, valid or not.
RAW_SCHEMA = pa.schema([
    ("source", pa.string()), ("file_index", pa.int64()), ("line", pa.int64()), ("doc_id", pa.string()),
    ("generated_id", pa.bool_()),
    ("title", pa.string()), ("text", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
])
# Rows after chunking: one per passage, or one per rejected input row (reason set).
STAGED_SCHEMA = pa.schema([
    ("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("hash", pa.string()),
    ("generated", pa.bool_()), ("source", pa.string()), ("file_index", pa.int64()), ("line", pa.int64()),
    ("piece", pa.int64()),
    ("doc_start", pa.int64()), ("reason", pa.string()), ("raw", pa.string()),
])


# ----------------------------------------------------------------------------------------------
# reading


class RowError(ValueError):
    pass


def normalise_row(obj: Any, source: str, line: int) -> dict:
    """One raw corpus row -> {doc_id, generated_id, title, text}; raises RowError naming the field."""
    if not isinstance(obj, dict):
        raise RowError(f"row: expected a JSON object, got {type(obj).__name__}")
    key = next((k for k in TEXT_KEYS if k in obj), None)
    if key is None or obj[key] is None:
        raise RowError(f"text: missing (looked for {', '.join(TEXT_KEYS)})")
    text = obj[key]
    if not isinstance(text, str):
        raise RowError(f"{key}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise RowError(f"{key}: empty")
    title = obj.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise RowError(f"title: expected a string, got {type(title).__name__}")
    id_key = next((k for k in ID_KEYS if obj.get(k) not in (None, "")), None)
    doc_id, generated = None, False
    if id_key is not None:
        v = obj[id_key]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise RowError(f"{id_key}: expected a string or integer id, got {type(v).__name__}")
        doc_id = str(v).strip()
    if not doc_id:
        stem = posixpath.basename(source).split(".")[0] or "doc"
        doc_id, generated = f"{stem}-{line}", True
    return {"doc_id": doc_id, "generated_id": generated, "title": " ".join(title.split()), "text": text.strip()}


class _Rows:
    """Accumulates RAW_SCHEMA rows column-wise and cuts blocks of bounded size."""

    def __init__(self, source: str, rows_per_block: int, file_index: int = 0):
        self.source, self.rows_per_block, self.file_index = source, rows_per_block, file_index
        self._reset()

    def _reset(self):
        self.cols: dict[str, list] = {f.name: [] for f in RAW_SCHEMA}

    def add(self, line: int, obj: Any = None, error: str | None = None, raw: str | None = None) -> None:
        c = self.cols
        if error is None:
            try:
                r = normalise_row(obj, self.source, line)
            except RowError as e:
                error = str(e)
                raw = raw if raw is not None else _raw_text(obj)
        if error is not None:
            r = {"doc_id": None, "generated_id": None, "title": None, "text": None}
        c["source"].append(self.source)
        c["file_index"].append(self.file_index)
        c["line"].append(line)
        for k in ("doc_id", "generated_id", "title", "text"):
            c[k].append(r[k])
        c["reason"].append(error)
        c["raw"].append(raw[:2000] if error is not None and raw is not None else None)

    def full(self) -> bool:
        return len(self.cols["line"]) >= self.rows_per_block

    def take(self) -> pa.Table:
        t = pa.Table.from_pydict(self.cols, schema=RAW_SCHEMA)
        self._reset()
        return t


def _raw_text(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)[:2000]
    except (TypeError, ValueError):
        return repr(obj)[:2000]


def _corpus_datasource_cls():
    """Defined lazily: importing ray.data at module import costs ~1 s in every process."""
    from ray.data.datasource import FileBasedDatasource

    class CorpusDatasource(FileBasedDatasource):
        """JSONL(.gz) and parquet corpus files as RAW_SCHEMA rows, keeping each row's line number.

        `read_json` would fail a whole file on one bad line and forget line numbers; here a bad line
        becomes a rejection row. One file is read by one task, streaming, in bounded blocks.
        """

        def __init__(self, paths: list[str], rows_per_block: int = 8192, **kw):
            super().__init__(paths, **kw)
            self._rows_per_block = rows_per_block
            # position of each file in the listed order ("first" for dedup), by the path Ray hands back
            self._file_index = {}
            for i, p in enumerate(paths):
                self._file_index.setdefault(p, i)
                self._file_index.setdefault(io.resolve(p)[1], i)

        def _index_of(self, path: str) -> int:
            for key in (path, path.split("://", 1)[-1], "/" + path.lstrip("/")):
                if key in self._file_index:
                    return self._file_index[key]
            raise KeyError(f"ingest: read a file that was not listed: {path}")

        def _open_input_source(self, filesystem, path: str, **open_args):
            if path.endswith(".parquet"):  # parquet needs random access, not a stream
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            rows = _Rows(path, self._rows_per_block, self._index_of(path))
            if path.endswith(".parquet"):
                import pyarrow.parquet as pq

                line = 0
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self._rows_per_block):
                    for obj in batch.to_pylist():
                        line += 1
                        rows.add(line, obj)
                    if rows.full():
                        yield rows.take()
            else:
                reader = _io.BufferedReader(f, buffer_size=1 << 20)
                for line, raw in enumerate(reader, start=1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        rows.add(line, error=f"encoding: not valid UTF-8 ({e.reason} at byte {e.start})",
                                 raw=raw.decode("utf-8", "replace"))
                    except json.JSONDecodeError as e:
                        rows.add(line, error=f"json: invalid JSON line ({e.msg} at column {e.colno})",
                                 raw=raw.decode("utf-8", "replace"))
                    else:
                        rows.add(line, obj)
                    if rows.full():
                        yield rows.take()
            if rows.cols["line"]:
                yield rows.take()

    return CorpusDatasource


def expand_corpus_paths(paths: list[str]) -> list[str]:
    """Files under each path (directories recursively, sorted), corpus suffixes only, in the order the
    paths are listed (a file listed twice counts once, at its first place); clear errors otherwise."""
    if not paths:
        raise ValueError("knowledge.corpus_paths is empty: name at least one corpus file or directory")
    files: list[str] = []
    for p in paths:
        if not io.exists(p):
            raise FileNotFoundError(f"corpus path not found: {p}")
        # list_files returns a file path as itself whatever its suffix: check suffixes here.
        found = [f for f in io.list_files(p, suffixes=CORPUS_SUFFIXES) if f.endswith(CORPUS_SUFFIXES)]
        if not found:
            if io.list_files(p) == [p]:
                raise ValueError(f"{p}: unsupported corpus file (expected one of {', '.join(CORPUS_SUFFIXES)})")
            raise ValueError(f"{p}: no corpus files ({', '.join(CORPUS_SUFFIXES)}) in this directory")
        files.extend(sorted(found))
    return list(dict.fromkeys(files))


# ----------------------------------------------------------------------------------------------
# transforms (pure functions on pyarrow tables: each unit-testable without Ray)


def chunk_table(raw: pa.Table, words_per_passage: int, overlap_words: int) -> pa.Table:
    """RAW_SCHEMA rows -> STAGED_SCHEMA rows: each valid document split into passages."""
    out: dict[str, list] = {f.name: [] for f in STAGED_SCHEMA}
    cols = raw.to_pydict()
    for i in range(raw.num_rows):
        source, line, reason = cols["source"][i], cols["line"][i], cols["reason"][i]
        if reason is not None:
            pieces = [None]
        else:
            pieces = split_words(cols["text"][i], words_per_passage, overlap_words)
            if not pieces:  # whitespace-only text slipped through: reject rather than drop
                reason, pieces = "text: empty", [None]
        for p, piece in enumerate(pieces):
            if reason is not None:
                row = dict(id=None, title=None, text=None, hash=None, generated=None, piece=None, doc_start=0,
                           reason=reason, raw=cols["raw"][i])
            else:
                doc_id = cols["doc_id"][i]
                row = dict(id=doc_id if len(pieces) == 1 else f"{doc_id}_{p}", title=cols["title"][i],
                           text=piece, hash=text_hash(piece), generated=bool(cols["generated_id"][i] or len(pieces) > 1),
                           piece=p, doc_start=int(p == 0), reason=None, raw=None)
            row.update(source=source, file_index=cols["file_index"][i], line=line)
            for k, v in row.items():
                out[k].append(v)
    return pa.Table.from_pydict(out, schema=STAGED_SCHEMA)


def _order(table: pa.Table, *first: tuple[str, str]) -> pa.Table:
    keys = list(first) + [("file_index", "ascending"), ("line", "ascending"), ("piece", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def _first_of_each(table: pa.Table, key: str) -> np.ndarray:
    """Boolean mask (over an ordered table): True for the first row of each `key` value."""
    _, first = np.unique(table.column(key).to_numpy(zero_copy_only=False), return_index=True)
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[first] = True
    return mask


def dedup_block(table: pa.Table) -> pa.Table:
    """Keep the first passage (file order, line, piece) of each text hash. The block must hold every
    row of its hashes (hash-partitioned)."""
    if table.num_rows == 0:
        return table
    table = _order(table)
    return table.filter(pa.array(_first_of_each(table, "hash")))


def unique_ids_block(table: pa.Table) -> pa.Table:
    """Make ids unique within a block holding every row of its ids (id-partitioned); adds `renamed`."""
    if table.num_rows == 0:
        return table.append_column("renamed", pa.array([], pa.int64()))
    table = _order(table, ("id", "ascending"), ("generated", "ascending"))
    ids = table.column("id").to_pylist()
    # Walk runs of equal ids: the first keeps it, the others get ~1, ~2, ...
    out_ids, renamed = [], []
    run_id, run_n = None, 0
    for x in ids:
        if x == run_id:
            out_ids.append(f"{x}~{run_n}")
            renamed.append(1)
            run_n += 1
        else:
            run_id, run_n = x, 1
            out_ids.append(x)
            renamed.append(0)
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(out_ids, pa.string()))
    return table.append_column("renamed", pa.array(renamed, pa.int64()))


def _valid(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table.column("reason"))).drop_columns(["reason", "raw", "doc_start"])


def _rejected_rows(table: pa.Table) -> pa.Table:
    t = table.filter(pc.is_valid(table.column("reason")))
    n = t.num_rows
    return pa.table({"stage": pa.array([STAGE] * n, pa.string()), "source": t.column("source"),
                     "line": t.column("line"), "reason": t.column("reason"), "raw": t.column("raw")},
                    schema=schemas.REJECTED)


def _counts_block(table: pa.Table) -> pa.Table:
    return pa.table({"documents": [int(pc.sum(table.column("doc_start")).as_py() or 0)],
                     "pieces": [int(pc.sum(pc.is_null(table.column("reason")).cast(pa.int64())).as_py() or 0)],
                     "rejected": [int(pc.sum(pc.is_valid(table.column("reason")).cast(pa.int64())).as_py() or 0)]})


# ----------------------------------------------------------------------------------------------
# the stage


def _clear_previous(run_passages: str, rejected_dir: str) -> None:
    if io.exists(run_passages):
        io.remove(run_passages)
    if io.exists(rejected_dir):
        for f in io.list_files(rejected_dir):
            if posixpath.basename(f).startswith(STAGE):
                io.remove(f)


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    total = 0
    for f in io.list_files(path, suffixes=(".parquet",)):
        fs, p = io.resolve(f)
        with fs.open_input_file(p) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def ingest_corpus(paths: list[str], run: io.RunDir, cfg: KnowledgeConfig, max_rejected_fraction: float = 0.01) -> dict:
    """Read, validate, chunk, dedup and write the corpus as `run.passages` (parquet directory).

    Rejected rows go to `run.rejected/ingest_*.parquet` (file, line, reason, raw). Prints the counts
    and raises `RejectedShareError` when the rejected share of input rows exceeds
    `max_rejected_fraction`. Returns {documents, passages, duplicates, rejected, renamed_ids, seconds}.
    """
    import ray
    from ray.data.datasource import FilenameProvider

    t0 = time.perf_counter()
    files = expand_corpus_paths(list(paths))
    _clear_previous(run.passages, run.rejected)
    wpp, overlap = cfg.words_per_passage, cfg.overlap_words

    ds = ray.data.read_datasource(_corpus_datasource_cls()(files, rows_per_block=cfg.ingest_block_rows))
    staged = ds.map_batches(chunk_table, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"words_per_passage": wpp, "overlap_words": overlap}).materialize()

    c = staged.map_batches(_counts_block, batch_format="pyarrow", batch_size=None).to_pandas().sum()
    documents, pieces, n_rejected = int(c.get("documents", 0)), int(c.get("pieces", 0)), int(c.get("rejected", 0))

    where = None
    if n_rejected:
        class _Names(FilenameProvider):
            def get_filename_for_task(self, write_uuid, task_index):
                return f"{STAGE}_{write_uuid}_{task_index:06}.parquet"

        staged.map_batches(_rejected_rows, batch_format="pyarrow", batch_size=None) \
            .write_parquet(run.rejected, filename_provider=_Names(), min_rows_per_file=1)
        where = io.join(run.rejected, f"{STAGE}_*.parquet")
    enforce_rejected_share(STAGE, documents, n_rejected, max_rejected_fraction, where)

    valid = staged.map_batches(_valid, batch_format="pyarrow", batch_size=None)
    n_blocks = max(1, staged.num_blocks())

    def partitioned(ds, key: str):
        # A small corpus becomes one block, which holds every row of every hash and id: no hash shuffle,
        # whose actor pools cost more than the whole stage's work below ONE_BLOCK_ROWS rows.
        return ds.repartition(1) if pieces <= ONE_BLOCK_ROWS else ds.repartition(n_blocks, keys=[key])

    if cfg.dedup:
        valid = partitioned(valid, "hash").map_batches(dedup_block, batch_format="pyarrow", batch_size=None)
    final = partitioned(valid, "id").map_batches(unique_ids_block, batch_format="pyarrow", batch_size=None).materialize()
    renamed = int(final.sum("renamed") or 0) if final.count() else 0
    final.select_columns(["id", "title", "text"]).write_parquet(run.passages)
    n_passages = _num_rows(run.passages) if io.exists(run.passages) else 0
    if n_passages == 0:
        raise ValueError(f"[{STAGE}] no passages written from {len(files)} file(s): every row was rejected or empty")
    counts = {"documents": documents, "passages": n_passages, "duplicates": pieces - n_passages,
              "rejected": n_rejected, "renamed_ids": renamed, "files": len(files),
              "seconds": round(time.perf_counter() - t0, 2)}
    say(f"[{STAGE}] {documents} documents from {len(files)} file(s) -> {n_passages} passages "
        f"({counts['duplicates']} duplicate texts dropped, {renamed} ids renamed, {n_rejected} rows rejected) "
        f"-> {run.passages} in {counts['seconds']} s")
    return counts
