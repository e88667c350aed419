"""Every file a stage reads or writes goes through here: local paths, shared filesystems and object
stores (`s3://bucket/prefix`, `gs://...`, anything `pyarrow.fs` understands) alike.

    from saerl_ray.core import storage
    storage.write_json(storage.join(run_dir, "plan", "summary.json"), {"rows": 3})
    table = storage.read_parquet(storage.join(run_dir, "ingest", "prompts.parquet"))
    local = storage.local_dir("s3://bucket/models/smollm2")   # fetched once into the local cache

Paths are plain strings. A local path is made absolute (`resolve`) before it is handed to another
process, since a Ray actor's working directory is not the driver's. S3 endpoint and credentials come
from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`), so the same config runs against a local S3-compatible server and real S3.

Writes are all-or-nothing: locally a temp file is renamed over the target, on an object store a single
PUT is atomic by nature. Transient errors (connection refused, timeouts) are retried with backoff;
what still fails raises `StorageError` naming the path, and no half-written file is left behind.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

T = TypeVar("T")
PARTIAL_TAG = ".partial-"  # local writes go to `<name>.partial-<random>` and are renamed over `<name>`
RETRIES = int(os.environ.get("SAERL_STORAGE_RETRIES", "6"))
BACKOFF_S = float(os.environ.get("SAERL_STORAGE_BACKOFF_S", "0.5"))


class StorageError(OSError):
    """A read or write that still failed after the retries; the message names the path."""


def is_uri(path: str | Path) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def resolve(path: str | Path) -> str:
    """An absolute local path or the URI unchanged: what another process can open."""
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return s if is_uri(s) else str(Path(s).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    s = str(base)
    if not is_uri(s):
        return str(Path(s).joinpath(*parts))
    return "/".join([s.rstrip("/"), *(p.strip("/") for p in parts if p)])


def name(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


@lru_cache(maxsize=None)
def _s3(endpoint: str | None, region: str | None) -> pafs.FileSystem:
    # torch's libraries must be loaded before the AWS SDK inside pyarrow initialises: the other
    # order made a Ray job's driver die in its first torch import ("oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so") once a stage had written to S3.
    import torch  # noqa: F401

    kwargs: dict[str, Any] = {"region": region or "us-east-1"}
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
    # Short connect timeout: an unreachable server should reach our retry loop, not hang for minutes.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=30, **kwargs)


_LOCAL = pafs.LocalFileSystem()


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Ray Data takes the pair as `filesystem=` + paths."""
    s = str(path)
    if not is_uri(s):
        # The sampler writes a log object per call: an absolute path needs no resolve() syscalls.
        return _LOCAL, s if s.startswith("/") and "/.." not in s and "~" not in s else resolve(s)
    u = urlparse(s)
    inner = (u.netloc + u.path).rstrip("/")
    if u.scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return _s3(endpoint, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")), inner
    if u.scheme == "hf":
        return _hub(), inner
    fs, inner = pafs.FileSystem.from_uri(s)
    return fs, inner


def _hub() -> pafs.FileSystem:
    """hf://datasets/<id>/<path>: the Hugging Face hub through huggingface_hub's fsspec filesystem (read
    only; HF_TOKEN for gated sets). Offline (HF_HUB_OFFLINE=1) its calls raise, and callers say so."""
    from huggingface_hub import HfFileSystem

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    text = str(e).lower()
    if any(s in text for s in ("nosuchkey", "nosuchbucket", "no_such_bucket", "no_such_key", "not found", "does not exist", "access denied")):
        return False
    return isinstance(e, OSError)


def _retry(what: str, path: str, fn: Callable[[], T]) -> T:
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not _transient(e):
                raise
            if attempt == RETRIES - 1:
                raise StorageError(f"{what} {path} failed after {RETRIES} attempts: {e}") from e
            time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ queries


def exists(path: str | Path) -> bool:
    fs, p = filesystem(path)
    return _retry("stat", str(path), lambda: fs.get_file_info(p).type != pafs.FileType.NotFound)


def is_dir(path: str | Path) -> bool:
    fs, p = filesystem(path)
    info = _retry("stat", str(path), lambda: fs.get_file_info(p))
    if info.type == pafs.FileType.Directory:
        return True
    # An S3 "directory" is only a prefix; it exists when something lies under it.
    return is_uri(path) and info.type == pafs.FileType.NotFound and bool(list_dir(path))


def list_dir(path: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Names (relative to `path`, sorted) of the files under it; [] when it does not exist."""
    return sorted(name for name in sizes(path, recursive) if name.endswith(suffix))


def sizes(path: str | Path, recursive: bool = True) -> dict[str, int]:
    """{name relative to `path`: size in bytes} for every file under it; {} when it does not exist."""
    fs, p = filesystem(path)
    sel = pafs.FileSelector(p, allow_not_found=True, recursive=recursive)
    infos = _retry("list", str(path), lambda: fs.get_file_info(sel))
    base = p.rstrip("/") + "/"
    return {i.path[len(base):]: int(i.size or 0) for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(base)}


def stat(path: str | Path) -> tuple[int, float]:
    """(size in bytes, mtime as a unix time; 0.0 where the store keeps none)."""
    fs, p = filesystem(path)
    info = _retry("stat", str(path), lambda: fs.get_file_info(p))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(str(path))
    return int(info.size or 0), info.mtime.timestamp() if info.mtime else 0.0


def version_of(path: str | Path) -> list:
    """What identifies this version of an input file: locally the sha256 of its bytes (a copied, re-mounted
    or touched file is the same input; an edited one is not), on an object store its size and mtime (a
    new upload; hashing would download the whole object on every up-to-date check)."""
    if is_uri(str(path)):
        return list(stat(path))
    import hashlib

    h = hashlib.sha256()
    with open(resolve(str(path)), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return ["sha256", h.hexdigest()]


# ------------------------------------------------------------------ bytes, text, json


def read_bytes(path: str | Path) -> bytes:
    fs, p = filesystem(path)

    def read() -> bytes:
        with fs.open_input_stream(p) as f:
            return f.read()

    return _retry("read", str(path), read)


def write_bytes(path: str | Path, data: bytes) -> None:
    """All-or-nothing write (see the module docstring)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{p}{PARTIAL_TAG}{uuid.uuid4().hex[:8]}"
        try:
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, p)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return

    def put() -> None:
        with fs.open_output_stream(p) as f:
            f.write(data)

    _retry("write", str(path), put)


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_bytes(path, json.dumps(obj, indent=indent, default=str).encode("utf-8"))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line index from 0, parsed value) for every non-blank line; a bad line raises ValueError
    naming the file and line. A UTF-8 byte-order mark is not part of the first row."""
    for i, line in enumerate(read_bytes(path).decode("utf-8-sig").splitlines()):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({e.msg})") from None


# ------------------------------------------------------------------ parquet


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(path)), columns=columns)


def parquet_columns(path: str | Path) -> list[str]:
    fs, p = filesystem(path)

    def schema() -> list[str]:
        with fs.open_input_file(p) as f:
            return pq.read_schema(f).names

    return _retry("read", str(path), schema)


def write_parquet(table: pa.Table, path: str | Path, **kwargs: Any) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------ trees


def delete(path: str | Path) -> None:
    """Remove a file or a whole tree; nothing there is fine."""
    fs, p = filesystem(path)
    info = _retry("stat", str(path), lambda: fs.get_file_info(p))
    if info.type == pafs.FileType.File:
        _retry("delete", str(path), lambda: fs.delete_file(p))
        return
    if info.type == pafs.FileType.Directory or (is_uri(path) and list_dir(path, recursive=True)):
        _retry("delete", str(path), lambda: fs.delete_dir_contents(p, missing_dir_ok=True))
        if info.type == pafs.FileType.Directory:
            _retry("delete", str(path), lambda: fs.delete_dir(p))


def copy_tree(src: str | Path, dst: str | Path) -> int:
    """Copy every file under `src` to the same relative place under `dst` (any mix of local and URI)."""
    files = list_dir(src, recursive=True)
    for rel in files:
        write_bytes(join(dst, rel), read_bytes(join(src, rel)))
    return len(files)


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Stream one file from `src` to `dst` (any mix of local and URI; never whole in memory, for
    multi-GB checkpoint shards); all-or-nothing like `write_bytes`."""
    sfs, sp = filesystem(src)
    dfs, dp = filesystem(dst)
    if not isinstance(dfs, pafs.LocalFileSystem):
        _retry("copy to", str(dst), lambda: pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs))
        return
    Path(dp).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{dp}{PARTIAL_TAG}{uuid.uuid4().hex[:8]}"
    try:
        _retry("copy from", str(src), lambda: pafs.copy_files(sp, partial, source_filesystem=sfs, destination_filesystem=dfs))
        os.replace(partial, dp)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def sync_tree(src: str | Path, dst: str | Path) -> int:
    """Copy the files under `src` that `dst` lacks or holds at another size (a re-upload after an
    interrupted one sends only what is missing); returns how many were copied."""
    have = sizes(dst)
    copied = 0
    for rel, size in sorted(sizes(src).items()):
        if PARTIAL_TAG in rel or have.get(rel) == size:
            continue
        copy_file(join(src, rel), join(dst, rel))
        copied += 1
    return copied


def cache_root() -> Path:
    return Path(os.environ.get("SAERL_CACHE", Path.home() / ".cache" / "saerl_ray"))


def local_dir(path: str | Path, version: str = "") -> Path:
    """A local directory holding `path`'s files: itself when local, else a copy in the local cache,
    fetched once per node and `version` (a `_COMPLETE` file marks a finished copy; a killed fetch is
    redone). Pass the stage marker as `version` for outputs that a rerun may replace."""
    if not is_uri(path):
        return Path(resolve(path))
    key = str(path).rstrip("/").replace("://", "/")
    dest = cache_root() / "remote" / key / (version or "_")
    if (dest / "_COMPLETE").exists():
        return dest
    if not list_dir(path, recursive=True):
        raise FileNotFoundError(f"{path}: nothing stored there")
    copy_tree(path, dest)
    (dest / "_COMPLETE").write_text(str(path))
    return dest
