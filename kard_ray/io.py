"""Files on any pyarrow filesystem (local paths, s3://, gs://, ...) and the run-directory layout.

Every stage reads and writes through these helpers, so a run directory can live on shared object
storage on a cluster and on local disk on a laptop without a code change.

S3 settings come from the standard AWS environment variables of every process that touches the run
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`/`AWS_DEFAULT_REGION`, and
`AWS_ENDPOINT_URL` for an S3-compatible store such as MinIO), or from pyarrow's URI parameters,
which `join` keeps on every derived path:

    s3://bucket/run?endpoint_override=minio.local:9000&scheme=http&region=us-east-1

Credentials are never URI parameters (pyarrow refuses `secret_key` there, and a URI is logged).
Libraries that read only local files (transformers, bm25s, faiss) get a cached local copy of a
remote directory (`local_copy`) or write into a staging directory that is uploaded (`staged_dir`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

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


def split_query(uri: str) -> tuple[str, str]:
    """("s3://bucket/run", "?endpoint_override=...") of a URI; the query is "" when there is none."""
    base, sep, query = uri.partition("?")
    return base, sep + query


def join(base: str, *parts: str) -> str:
    """Join path parts; on a URI the query parameters (endpoint, scheme, region) stay at the end."""
    if is_uri(base):
        base, query = split_query(base)
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts) + query
    return os.path.join(base, *parts)


def display(path: str) -> str:
    """The path without URI parameters (for log lines and error messages)."""
    return split_query(str(path))[0]


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
            # a URI's paths are strings, not this machine's (posixpath.relpath would consult the cwd)
            rel = fi.path[len(p):].lstrip("/") if is_uri(path) else os.path.relpath(fi.path, p)
            if not os.path.basename(rel).startswith((".", "_")):
                out.append(join(path, rel))
    return sorted(out)


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as fh:
        data = fh.read()
    if display(path).endswith(".gz"):
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
        stream = gzip.GzipFile(fileobj=raw) if display(path).endswith(".gz") else raw
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


def _cache_root() -> str:
    return os.environ.get("KARD_INDEX_CACHE", os.path.join(tempfile.gettempdir(), "kard_ray_index_cache"))


def _etag(fs: pafs.FileSystem, path: str) -> str:
    """The object's ETag where the filesystem reports one (S3: a HEAD request), else ""."""
    try:
        with fs.open_input_file(path) as fh:
            meta = fh.metadata() or {}
    except (OSError, NotImplementedError):
        return ""
    tag = meta.get("ETag") or meta.get(b"ETag") or b""
    return tag.decode() if isinstance(tag, bytes) else str(tag)


def local_copy(path: str) -> str:
    """A local directory with the files of `path`: a local path as it is, a URI copied into a cache.

    For libraries that read local files only (transformers' `from_pretrained`, bm25s, faiss). The copy
    is keyed by the URI and by the remote listing (names, sizes, mtimes and ETags), so a changed remote
    directory is copied again and an unchanged one is reused by every process on the node. The ETag
    matters: object-store mtimes have 1 s resolution, and a file rewritten with the same size within
    that second would otherwise be served stale."""
    if not is_uri(path):
        return path
    fs, inner = resolve(path)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File]
    if not infos:
        raise FileNotFoundError(f"directory not found or empty: {display(path)}")
    stamp = json.dumps(sorted((i.path, i.size, str(i.mtime), _etag(fs, i.path)) for i in infos)).encode()
    target = os.path.join(_cache_root(), hashlib.sha1(path.encode()).hexdigest()[:16],
                          hashlib.sha1(stamp).hexdigest()[:16])
    if not os.path.exists(os.path.join(target, ".complete")):
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.replace(tmp, target)
        except OSError:  # another process on this node finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def upload_dir(local: str, dest: str) -> None:
    """Replace the URI directory `dest` by the contents of the local directory `local`."""
    fs, inner = resolve(dest)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(local, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@contextlib.contextmanager
def staged_dir(dest: str) -> Iterator[str]:
    """A local directory to write `dest` into: `dest` itself when local, else a temporary directory
    uploaded to the URI when the block finishes without an error (nothing is uploaded on an error)."""
    if not is_uri(dest):
        os.makedirs(dest, exist_ok=True)
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="kard_stage_") as tmp:
        yield tmp
        upload_dir(tmp, dest)


def train_storage(path: str) -> tuple[str, Optional[pafs.FileSystem]]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    A local path is made absolute (Train's workers run in another directory). A URI gets its pyarrow
    filesystem built here, from the URI's parameters and the AWS environment variables, and the path
    inside it, so checkpoints go to the same endpoint as the rest of the run."""
    if not is_uri(path):
        return os.path.abspath(path), None
    fs, inner = resolve(path)
    return inner, fs


def tree_digest(path: str | None) -> str | None:
    """Content digest of a file or directory tree (local or URI), independent of file order and of
    the random part names Ray Data gives written files; None for a hub name or a missing path."""
    if not path or not exists(path):
        return None
    fs, root = resolve(path)
    info = fs.get_file_info(root)
    files = [info] if info.type == pafs.FileType.File else \
        [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    digests = []
    for f in files:
        if f.base_name.startswith((".", "_")):
            continue  # hidden files and writer metadata (_SUCCESS, _common_metadata) are not content
        h = hashlib.sha256()
        with fs.open_input_stream(f.path) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file or a directory of parquet files (e.g. written by Ray Data)."""
    fs, p = resolve(path)
    return pq.read_table(p, filesystem=fs, columns=columns)


def read_schema(path: str) -> pa.Schema:
    """The schema of a parquet file or directory, without reading its rows."""
    fs, p = resolve(path)
    return pq.ParquetDataset(p, filesystem=fs).schema


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
