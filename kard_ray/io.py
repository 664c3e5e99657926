"""Files on any pyarrow filesystem (local paths, s3://, gs://, ...) and the run-directory layout.

Every stage reads and writes through these helpers, so a run directory can live on shared object
storage on a cluster and on local disk on a laptop without a code change.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def remove(path: str) -> None:
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def list_files(path: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files under `path` (a file is returned as itself), sorted, as paths/URIs like the input."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    if info.type == pafs.FileType.File:
        return [path]
    out = []
    for fi in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if fi.type == pafs.FileType.File and (not suffixes or fi.path.endswith(suffixes)):
            rel = posixpath.relpath(fi.path, p) if is_uri(path) else os.path.relpath(fi.path, p)
            if not os.path.basename(rel).startswith((".", "_")):
                out.append(join(path, rel))
    return sorted(out)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as fh:
        data = fh.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically on local disk (temp file + rename) so a crash never leaves half a file."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = p + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    else:
        with fs.open_output_stream(p) as fh:
            fh.write(data)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def iter_text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a text file, gzip-aware, streaming."""
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
        for i, line in enumerate(text, start=1):
            yield i, line


def iter_json_objects(path: str) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file; a line that is not a JSON object
    raises ValueError naming file and line."""
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def write_table(table: pa.Table, path: str) -> None:
    """One parquet file (atomic on local disk)."""
    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = p + ".tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    else:
        pq.write_table(table, p, filesystem=fs)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file or a directory of parquet files (e.g. written by Ray Data)."""
    fs, p = resolve(path)
    return pq.read_table(p, filesystem=fs, columns=columns)


@dataclass(frozen=True)
class RunDir:
    """Names of everything a pipeline run writes (one place, so stages never disagree)."""

    root: str

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def config(self) -> str:
        return self.path("config.yaml")

    def questions(self, split: str) -> str:
        return self.path("questions", f"{split}.parquet")

    @property
    def passages(self) -> str:
        return self.path("passages")

    @property
    def bm25_index(self) -> str:
        return self.path("index", "bm25")

    @property
    def faiss_index(self) -> str:
        return self.path("index", "faiss")

    @property
    def embeddings(self) -> str:
        return self.path("index", "embeddings")

    @property
    def rationales(self) -> str:
        return self.path("rationales")

    def examples(self, kind: str) -> str:
        return self.path("examples", kind)

    def model(self, name: str) -> str:
        return self.path("models", name)

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    @property
    def eval(self) -> str:
        return self.path("eval")

    @property
    def rejected(self) -> str:
        return self.path("rejected")
