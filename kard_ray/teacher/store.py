"""The rationales directory as an append-only set of parquet part files, safe to kill at any moment.

* Every part is written whole under a hidden temporary name and renamed into place (object stores
  write objects atomically), so a killed run leaves complete parts or nothing; readers ignore names
  starting with "." or "_" (pyarrow's default), so a leftover temporary file is never read.
* A part holds only complete questions (every sample the run asked for), named by a hash of its
  (question id, sample) keys: writing the same rows twice overwrites instead of duplicating.
* On start, `index()` tells the generator which (question, sample) rows exist; `repair()` removes
  rows that another part supersedes (an error row replaced by a retried success, or a duplicate left
  by an interrupted rewrite), so `read_table(dir)` always yields one row per (question, sample).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kard_ray import io
from kard_ray.data.schemas import RATIONALES


class RationaleStore:
    """Part files under `root` (local path or URI) in the RATIONALES schema."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.path = io.resolve(root)

    # -- listing -----------------------------------------------------------------------------
    def parts(self) -> list[str]:
        """Inner paths of the visible part files, oldest first (modification time, then name)."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return []
        sel = pafs.FileSelector(self.path, recursive=False)
        files = [f for f in self.fs.get_file_info(sel)
                 if f.type == pafs.FileType.File and not posixpath.basename(f.path).startswith((".", "_"))]
        files.sort(key=lambda f: (f.mtime_ns or 0, f.path))
        return [f.path for f in files]

    def clean_temporaries(self) -> int:
        """Delete temporary files a killed writer left behind (never visible to readers)."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return 0
        n = 0
        for f in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False)):
            if f.type == pafs.FileType.File and posixpath.basename(f.path).startswith(".tmp-"):
                self.fs.delete_file(f.path)
                n += 1
        return n

    def _read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns)

    def read(self) -> pa.Table:
        """All rows (RATIONALES schema; empty table when nothing is written yet)."""
        parts = self.parts()
        if not parts:
            return RATIONALES.empty_table()
        return pa.concat_tables([self._read_part(p).select(RATIONALES.names).cast(RATIONALES) for p in parts])

    def index(self) -> dict[tuple[str, int], bool]:
        """{(question_id, sample): row has an error} over every written row."""
        out: dict[tuple[str, int], bool] = {}
        for p in self.parts():
            t = self._read_part(p, ["question_id", "sample", "error"])
            for q, s, e in zip(t["question_id"].to_pylist(), t["sample"].to_pylist(), t["error"].to_pylist()):
                # A success anywhere wins over an error elsewhere (repair() removes the loser).
                out[(q, s)] = out.get((q, s), True) and e is not None
        return out

    # -- writing -----------------------------------------------------------------------------
    def _atomic_write(self, table: pa.Table, name: str) -> str:
        self.fs.create_dir(self.path, recursive=True)
        final = posixpath.join(self.path, name) if io.is_uri(self.root) else os.path.join(self.path, name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = os.path.join(self.path, f".tmp-{uuid.uuid4().hex}-{name}")
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        else:  # object stores make a whole object visible at once
            pq.write_table(table, final, filesystem=self.fs)
        return final

    def write_part(self, rows: pa.Table | list[dict]) -> str | None:
        """Write rows (complete questions) as one part; returns its path (None for no rows)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=RATIONALES)
        table = table.select(RATIONALES.names).cast(RATIONALES)
        if table.num_rows == 0:
            return None
        keys = sorted(zip(table["question_id"].to_pylist(), table["sample"].to_pylist()))
        digest = hashlib.sha1(repr(keys).encode()).hexdigest()[:20]
        return self._atomic_write(table, f"part-{digest}.parquet")

    def write_empty(self) -> str:
        """An empty part in the RATIONALES schema (a run that produced no rows still reads back)."""
        return self._atomic_write(RATIONALES.empty_table(), "part-empty.parquet")

    # -- repair ------------------------------------------------------------------------------
    def repair(self) -> int:
        """Make (question_id, sample) unique across parts; returns the number of rows removed.

        Keeper of a duplicated key: a success over an error, then the newest part. Losing rows are
        removed by rewriting their part without them (atomically), or deleting it when emptied.
        """
        parts = self.parts()
        best: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (rank, part position)
        seen: dict[tuple[str, int], int] = {}
        loaded = []
        for pos, p in enumerate(parts):
            t = self._read_part(p, ["question_id", "sample", "error"])
            keys = list(zip(t["question_id"].to_pylist(), t["sample"].to_pylist()))
            errs = t["error"].to_pylist()
            loaded.append((p, keys))
            for k, e in zip(keys, errs):
                seen[k] = seen.get(k, 0) + 1
                cand = (0 if e is not None else 1, pos)
                if k not in best or cand >= best[k]:
                    best[k] = cand
        dup = {k for k, c in seen.items() if c > 1}
        removed = 0
        for pos, (p, keys) in enumerate(loaded):
            drop = [i for i, k in enumerate(keys) if k in dup and best[k][1] != pos]
            # Duplicates inside one part (should not happen) keep their first row.
            first: set = set()
            for i, k in enumerate(keys):
                if k in dup and best[k][1] == pos:
                    if k in first:
                        drop.append(i)
                    first.add(k)
            if not drop:
                continue
            removed += len(drop)
            table = self._read_part(p)
            drop_set = set(drop)
            mask = pa.array([i not in drop_set for i in range(table.num_rows)])
            kept = table.filter(mask)
            if kept.num_rows == 0:
                self.fs.delete_file(p)
            else:
                name = posixpath.basename(p)
                self._atomic_write(kept, name)
        return removed


def rows_by_question(table: pa.Table) -> dict[str, list[dict]]:
    """Group a RATIONALES table's rows by question id (samples in order)."""
    out: dict[str, list[dict]] = {}
    for row in table.sort_by([("question_id", "ascending"), ("sample", "ascending")]).to_pylist():
        out.setdefault(row["question_id"], []).append(row)
    return out


def count_true(arr) -> int:
    return int(pc.sum(pc.cast(arr, pa.int64())).as_py() or 0)
