"""Object storage behind one small API: local paths, ``file://`` URLs and ``s3://`` URLs.

S3 settings come only from the environment, never from recipes (``data.s3clients`` lists them).

Every S3 operation here retries transient failures (connection refused/reset, timeouts, HTTP 5xx,
throttling) with exponential backoff and jitter for at most ``NUANCE_S3_RETRY_SECONDS`` (default 120 s)
per outage; reads from ``open_url`` fetch the object in ranged GETs ahead of the reader and retry each
one from its start, so a tar stream survives an S3 server restart. ``retry_count()`` counts the retries
of this process.

The pieces live in their own modules, the names other code uses re-exported here: ``data.s3clients``
(settings from the environment, per-process clients), ``data.retries`` (what is transient, the backoff;
its tunables) and ``data.s3reader`` (``ResilientReader``; ``STREAM_BLOCK_SIZE``, ``READAHEAD_STREAMS``).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from typing import IO, Any

import fsspec

from nuance.data.retries import (
    RETRY_SECONDS_ENV,
    RetriesExhausted,
    is_transient,
    retry_count,
    retry_seconds,
    with_retries,
)
from nuance.data.s3clients import _cached_client, _new_s3fs, _s3_env, describe
from nuance.data.s3reader import ResilientReader
from nuance.data.s3reader import _S3Object as _S3Object  # tests patch its _call here

__all__ = [
    "RETRY_SECONDS_ENV",
    "ResilientReader",
    "RetriesExhausted",
    "arrow_filesystem",
    "atomic_write_bytes",
    "describe",
    "exists",
    "filesystem",
    "get_file",
    "get_folder",
    "is_transient",
    "list_urls",
    "local_path",
    "makedirs",
    "open_url",
    "put_file",
    "read_bytes",
    "register_webdataset_s3",
    "retry_count",
    "retry_seconds",
    "with_retries",
    "write_bytes",
]

_GLOB_CHARS = "*?["


# ------------------------------------------------------------------------------------- URLs and filesystems


def _scheme(url: str) -> str:
    """The URL scheme in lower case; "" for a plain local path."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def local_path(url: str | os.PathLike) -> str | None:
    """The local filesystem path behind ``url`` (plain path or ``file://`` URL), else None."""
    url = os.fspath(url)
    scheme = _scheme(url)
    return url[len("file://") :] if scheme == "file" else (url if scheme == "" else None)


def filesystem(url: str | os.PathLike) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url``: s3fs for ``s3://`` (one per process: ``s3clients._cached_client``),
    local for paths and ``file://``."""
    scheme = _scheme(os.fspath(url))
    if scheme in ("", "file"):
        return fsspec.filesystem("file")
    if scheme != "s3":
        return fsspec.filesystem(scheme)  # other fsspec protocols work, without the retry guarantees
    return _cached_client("s3fs", _new_s3fs)


def _remote(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-free path of a non-local URL."""
    fs = filesystem(url)
    return fs, fs._strip_protocol(url)


# --------------------------------------------------------------------------------------------- streaming


def open_url(url: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """Open a local path, ``file://`` or ``s3://`` URL in binary mode ``"rb"`` or ``"wb"``.

    S3 reads give a :class:`ResilientReader`; S3 writes give s3fs's file (the object appears atomically
    on close, nothing is retried mid-upload). Open inside the process that reads: S3 clients are per process.
    """
    url = os.fspath(url)
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_url supports mode 'rb' or 'wb', got {mode!r}")
    local = local_path(url)
    if local is not None:
        if mode == "wb":
            _make_parent(local)
        return open(local, mode)
    if _scheme(url) == "s3" and mode == "rb":
        return ResilientReader(url)
    fs, path = _remote(url)
    return fs.open(path, mode)


# ------------------------------------------------------------------------------------- whole-object ops


def _make_parent(path: str) -> None:
    """Create the parent directory of a local path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole content of a file or object."""
    url = os.fspath(url)
    local = local_path(url)
    if local is not None:
        with open(local, "rb") as f:
            return f.read()
    fs, path = _remote(url)
    return with_retries(f"reading {url}", fs.cat_file, path)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a file (parents created) or an object (one PUT, atomic per object)."""
    url = os.fspath(url)
    local = local_path(url)
    if local is None:
        fs, path = _remote(url)
        with_retries(f"writing {url}", fs.pipe_file, path, bytes(data))
        return
    _make_parent(local)
    with open(local, "wb") as f:
        f.write(data)


def atomic_write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write so that readers see the old content or the new, never a partial file.

    Local: a temporary file in the same directory, fsync'ed, then ``os.replace``. S3: a PUT already
    replaces an object atomically.
    """
    url = os.fspath(url)
    local = local_path(url)
    if local is None:
        return write_bytes(url, data)
    _make_parent(local)
    tmp = f"{local}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open with 0o666 honours the umask, unlike mkstemp's 0o600 (which os.replace would keep).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):  # only when something failed before the replace
            os.unlink(tmp)


def _bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """HEAD the bucket (s3fs's own exists() turns every error, even connection refused, into False)."""
    try:
        with_retries(f"checking bucket {bucket}", fs.call_s3, "head_bucket", Bucket=bucket)
    except FileNotFoundError:
        return False
    return True


def exists(url: str | os.PathLike) -> bool:
    """Whether a file, directory, object, prefix or bucket exists. Connection errors raise, never False."""
    url = os.fspath(url)
    local = local_path(url)
    if local is not None:
        return os.path.exists(local)
    fs, path = _remote(url)
    if _scheme(url) == "s3" and "/" not in path.strip("/"):
        return _bucket_exists(fs, path.strip("/"))
    fs.invalidate_cache(path)  # another process may have written it since this one last listed
    try:
        with_retries(f"checking {url}", fs.info, path)
    except FileNotFoundError:
        return False
    return True


def makedirs(url: str | os.PathLike) -> None:
    """Create a local directory, or the bucket of an S3 URL if missing (prefixes need no creation)."""
    url = os.fspath(url)
    local = local_path(url)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        return
    fs, path = _remote(url)
    if _scheme(url) != "s3":
        with_retries(f"creating {url}", fs.makedirs, path, exist_ok=True)
        return
    bucket = path.strip("/").split("/")[0]
    try:
        if _bucket_exists(fs, bucket):
            return
    except PermissionError:  # keys scoped to a prefix may not HEAD the bucket: it exists, writes will tell
        return
    with_retries(f"creating bucket {bucket}", fs.makedirs, bucket, exist_ok=True)


def put_file(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Upload (or copy) one local file to ``url``."""
    local, url = os.fspath(local), os.fspath(url)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"no such local file: {local}")
    dest = local_path(url)
    if dest is not None:
        _make_parent(dest)
        shutil.copyfile(local, dest)
        return
    fs, path = _remote(url)
    with_retries(f"uploading {local} to {url}", fs.put_file, local, path)


def get_file(url: str | os.PathLike, local: str | os.PathLike) -> None:
    """Download ``url`` to a local file, which appears complete or not at all."""
    url, local = os.fspath(url), os.fspath(local)
    src = local_path(url)
    _make_parent(local)
    tmp = f"{local}.{uuid.uuid4().hex[:12]}.part"
    try:
        if src is not None:
            shutil.copyfile(src, tmp)
        else:
            fs, path = _remote(url)
            with_retries(f"downloading {url}", fs.get_file, path, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def list_urls(prefix_or_pattern: str | os.PathLike) -> list[str]:
    """Sorted URLs of the files matching a glob (``s3://b/shards/*.tar``; ``**`` recurses), or directly
    under a directory / prefix (``s3://b/shards/``), or the file itself; [] when nothing matches.
    Results keep the input's form: ``s3://`` and ``file://`` URLs stay URLs, plain paths stay plain."""
    url = os.fspath(prefix_or_pattern)
    local = local_path(url)
    is_glob = any(c in url for c in _GLOB_CHARS)
    if local is not None:
        import glob

        head = url[: len(url) - len(local)]  # "file://" or ""
        if is_glob:
            found = glob.glob(local, recursive=True)
        else:
            found = [os.path.join(local, n) for n in os.listdir(local)] if os.path.isdir(local) else [local]
        return sorted(head + p for p in found if os.path.isfile(p))
    fs, path = _remote(url)
    fs.invalidate_cache()  # other processes may have written since this one last listed
    if is_glob:
        entries = list(with_retries(f"listing {url}", fs.glob, path, detail=True).values())
    else:
        try:
            entries = with_retries(f"listing {url}", fs.ls, path.rstrip("/"), detail=True)
        except FileNotFoundError:
            return []
    # Keys ending in "/" are directory markers (pyarrow, hence Ray Train, writes them), not files.
    names = (e["name"] for e in entries if e.get("type") == "file" and not e["name"].endswith("/"))
    return sorted(f"{_scheme(url)}://{name}" for name in names)


# ------------------------------------------------------------------------------------------- webdataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset ``gopen`` handler for ``s3://``: our resilient ``open_url``."""
    return open_url(url, mode)


def register_webdataset_s3() -> bool:
    """Let ``webdataset.gopen`` (hence ``WebDataset("s3://...")``) open ``s3://`` through ``open_url``.

    Returns False, doing nothing, when webdataset is not installed.
    """
    try:
        import webdataset  # noqa: F401  (the package shadows its gopen module with the function)
    except ImportError:
        return False
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = _gopen_s3
    return True


# ------------------------------------------------------------------------------------------- arrow / folders


def arrow_filesystem(url: str | os.PathLike):
    """(pyarrow filesystem, path) for `url` -- what Ray Train's `storage_filesystem` wants. S3 settings
    come from the same environment as `filesystem()`; local paths get (None, path)."""
    url = os.fspath(url)
    local = local_path(url)
    if local is not None:
        return None, os.path.abspath(os.path.expanduser(local))
    if _scheme(url) != "s3":
        raise ValueError(f"{url}: only local paths and s3:// are supported as a storage path")
    from pyarrow import fs as pafs

    env = _s3_env()
    kwargs: dict[str, Any] = {"region": env["region"] or "us-east-1"}
    if env["endpoint"]:
        scheme, _, host = env["endpoint"].partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if env["key_id"] and env["secret"]:
        kwargs.update(access_key=env["key_id"], secret_key=env["secret"], session_token=env["token"])
    return pafs.S3FileSystem(**kwargs), url.split("://", 1)[1].rstrip("/")


def get_folder(url: str | os.PathLike, local: str | os.PathLike) -> str:
    """Download every file under `url` into `local` (same relative layout); returns `local`."""
    url = os.fspath(url).rstrip("/")
    for file_url in list_urls(f"{url}/**"):
        target = os.path.join(os.fspath(local), file_url[len(url) + 1 :])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        get_file(file_url, target)
    return os.fspath(local)
