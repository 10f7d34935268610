"""Object storage behind one small API: local paths, ``file://`` URLs and ``s3://`` URLs.

S3 settings come only from the environment (or the named ``AWS_PROFILE``), never from recipes, so that no
recipe, checkpoint or log ever carries a credential:

- endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (unset: AWS, or the profile's endpoint);
- credentials: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``), else
  ``AWS_PROFILE``, else botocore's default chain;
- region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``.

Every S3 operation here retries transient failures (connection refused/reset, timeouts, HTTP 5xx,
throttling) with exponential backoff and jitter for at most ``NUANCE_S3_RETRY_SECONDS`` (default 120 s)
per outage; reads from ``open_url`` fetch the object in ranged GETs ahead of the reader and retry each
one from its start, so a tar stream survives an S3 server restart. ``retry_count()`` counts the retries
of this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import queue
import random
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS_ENV = "NUANCE_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
# Bytes per ranged GET while streaming, and how many GETs a reader keeps going ahead of its position. An
# open shard holds up to 2 * READAHEAD_STREAMS + 1 blocks (fetched, ready, being read) in every DataLoader
# worker; two parallel GETs stream faster than one (each pays the server's latency), larger ones hardly.
STREAM_BLOCK_SIZE = 8 * 2**20
READAHEAD_STREAMS = 2
_BACKOFF_FIRST_S, _BACKOFF_CAP_S = 0.2, 8.0
# S3 error codes that mean "try again later" even when the HTTP status is not 5xx.
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError"}
_TRANSIENT_CODES |= {"RequestLimitExceeded", "TooManyRequestsException", "ServiceUnavailable"}
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)
_GLOB_CHARS = "*?["

_clients_lock = threading.Lock()
_clients: dict[tuple, Any] = {}
_retry_lock = threading.Lock()
_retries = 0


class RetriesExhausted(OSError):
    """A transient S3 failure lasted longer than ``NUANCE_S3_RETRY_SECONDS``."""


# ------------------------------------------------------------------------------------------------ settings


def _s3_env() -> dict[str, str | None]:
    """The S3-related environment, secrets included: for building clients only, never for display."""
    env = os.environ.get
    return {
        "endpoint": env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or None,
        "profile": env("AWS_PROFILE") or None,
        "region": env("AWS_REGION") or env("AWS_DEFAULT_REGION") or None,
        "key_id": env("AWS_ACCESS_KEY_ID") or None,
        "secret": env("AWS_SECRET_ACCESS_KEY") or None,
        "token": env("AWS_SESSION_TOKEN") or None,
    }


def retry_seconds() -> float:
    """Longest time one outage is retried (``NUANCE_S3_RETRY_SECONDS``, default 120)."""
    raw = os.environ.get(RETRY_SECONDS_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise ValueError(f"{RETRY_SECONDS_ENV} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{RETRY_SECONDS_ENV} must be >= 0, got {raw!r}")
    return value


def describe() -> dict[str, str]:
    """Where S3 requests go and how they authenticate; safe to log (no secret, not even the key id)."""
    s = _s3_env()
    if s["key_id"] and s["secret"]:
        credentials = "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    else:
        credentials = f"profile {s['profile']!r}" if s["profile"] else "botocore default chain"
    present = {True: "present", False: "absent"}
    return {
        "endpoint": s["endpoint"] or "(default: AWS, or the profile's endpoint_url)",
        "region": s["region"] or "(default)",
        "profile": s["profile"] or "(none)",
        "credentials": credentials,
        "access_key_id": present[bool(s["key_id"])],
        "secret_access_key": present[bool(s["secret"])],
        "session_token": present[bool(s["token"])],
        "retry_seconds": f"{retry_seconds():g}",
    }


# ------------------------------------------------------------------------------------------------ retrying


def retry_count() -> int:
    """Transient S3 failures retried so far in this process (each DataLoader worker counts its own)."""
    return _retries


def _classify(exc: BaseException) -> bool | None:
    """True: transient; False: permanent; None: this exception alone does not tell."""
    import botocore.exceptions as bex

    if isinstance(exc, (RetriesExhausted, *_PERMANENT_ERRORS, bex.SSLError)):
        return False
    if isinstance(exc, bex.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError)):
        return True
    # Refused / reset / aborted / broken pipe, and timeouts (asyncio's is a distinct class before 3.11).
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    aiohttp = sys.modules.get("aiohttp")  # aiobotocore's transport, loaded once s3fs is in use
    if aiohttp is not None and isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, or what caused it (s3fs wraps botocore errors in OSError), is worth retrying."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            break
        verdict = _classify(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


class _Backoff:
    """Exponential backoff with jitter over one outage, bounded by ``retry_seconds()`` in total."""

    def __init__(self, what: str) -> None:
        self.what, self.budget = what, retry_seconds()
        self.started: float | None = None
        self.attempts = 0

    def wait(self, exc: BaseException) -> None:
        """Sleep before the next attempt, or raise RetriesExhausted once the budget is spent."""
        now = time.monotonic()
        self.started = now if self.started is None else self.started
        elapsed = now - self.started
        if elapsed >= self.budget:
            raise RetriesExhausted(
                f"{self.what}: still failing after {self.attempts} retries in {elapsed:.1f}s "
                f"({RETRY_SECONDS_ENV}={self.budget:g}): {type(exc).__name__}: {exc}"
            ) from exc
        # Jitter in [delay/2, delay] keeps many workers from hitting a recovering server in lockstep.
        delay = min(_BACKOFF_CAP_S, _BACKOFF_FIRST_S * 2**self.attempts) * random.uniform(0.5, 1.0)
        self.attempts += 1
        global _retries
        with _retry_lock:
            _retries += 1
        log = logger.warning if self.attempts == 1 else logger.debug
        log("%s: %s: %s; retry %d in %.2fs", self.what, type(exc).__name__, exc, self.attempts, delay)
        time.sleep(min(delay, self.budget - elapsed))


def with_retries(what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)``, retrying transient failures under the backoff policy."""
    backoff = _Backoff(what)
    while True:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            backoff.wait(exc)


# ---------------------------------------------------------------------------------------- URLs and clients


def _scheme(url: str) -> str:
    """The URL scheme in lower case; "" for a plain local path."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def local_path(url: str | os.PathLike) -> str | None:
    """The local filesystem path behind ``url`` (plain path or ``file://`` URL), else None."""
    url = os.fspath(url)
    scheme = _scheme(url)
    return url[len("file://") :] if scheme == "file" else (url if scheme == "" else None)


def _botocore_config() -> dict[str, Any]:
    """botocore ``Config`` arguments for the current environment (both S3 clients use them)."""
    s = _s3_env()
    # Region via botocore Config, not region_name=: s3fs would turn that into a bucket LocationConstraint,
    # which some S3 servers reject on bucket creation. (botocore alone ignores AWS_REGION.)
    config: dict[str, Any] = {"region_name": s["region"]} if s["region"] else {}
    if not os.environ.get("AWS_MAX_ATTEMPTS") and not os.environ.get("AWS_RETRY_MODE"):
        # No hidden inner retries: every transient failure goes through our bounded, counted backoff
        # (botocore's own would silently add up to seconds per request on top of it).
        config["retries"] = {"mode": "standard", "total_max_attempts": 1}
    return config


def _profile() -> str | None:
    """The profile to name explicitly: ``AWS_PROFILE``, unless keys in the environment take precedence."""
    s = _s3_env()
    return s["profile"] if s["profile"] and not (s["key_id"] and s["secret"]) else None


def _new_s3fs() -> fsspec.AbstractFileSystem:
    """An S3FileSystem for the current environment. Keys are left for botocore to read from the
    environment / profile, so no secret ever sits in the filesystem's storage_options."""
    import s3fs

    endpoint, profile = _s3_env()["endpoint"], _profile()
    kwargs: dict[str, Any] = {"skip_instance_cache": True, "config_kwargs": _botocore_config()}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if profile:
        kwargs["profile"] = profile
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = 1  # s3fs's own retry loop (default 5 tries) likewise gives way to ours
    return fs


def _new_s3_client() -> Any:
    """A plain (synchronous) botocore S3 client for the current environment, for streaming reads.

    Its responses are read by urllib3 / http.client in C, in the calling thread: about a third less CPU
    per MB than s3fs, whose aiohttp transport parses the body in Python on fsspec's event-loop thread and
    hops threads for every request. Keys are left for botocore to read, as for s3fs.
    """
    import botocore.config
    import botocore.session

    session = botocore.session.Session(profile=_profile())
    config = botocore.config.Config(**_botocore_config())
    return session.create_client("s3", endpoint_url=_s3_env()["endpoint"], config=config)


def _cached_client(kind: str, factory: Callable[[], T]) -> T:
    """This process's ``kind`` of S3 client for the current S3 settings, built by ``factory`` once.

    Clients are cached per process id and S3 settings: neither s3fs nor botocore clients are fork-safe,
    so each process (e.g. each DataLoader worker) builds its own on first use.
    """
    s = _s3_env()
    digest = hashlib.sha256(f"{s['secret']}\0{s['token']}".encode()).hexdigest()  # never the secret itself
    key = (kind, os.getpid(), s["endpoint"], s["profile"], s["region"], s["key_id"], digest)
    with _clients_lock:
        if key not in _clients:
            # Clients inherited from a parent process must not be used (or closed) here: forget them.
            for stale in [k for k in _clients if k[1] != key[1]]:
                del _clients[stale]
            _clients[key] = factory()
        return _clients[key]


def filesystem(url: str | os.PathLike) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``url``: s3fs for ``s3://`` (one per process, see ``_cached_client``),
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


class _S3Object:
    """One S3 object read by byte ranges through this process's botocore client, with retries: what a
    ``ResilientReader`` and its readahead threads share. It holds no reference to the reader, so an
    unclosed reader is still collected (and closed, which stops the threads)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, _, self.key = url.split("://", 1)[1].partition("/")
        self.retries = 0
        self.identity = with_retries(f"opening {url}", self._identity)

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """An S3 ``operation`` on the object. S3 error codes become the OSErrors that s3fs raises
        (missing: FileNotFoundError, denied: PermissionError) with the ClientError as their cause."""
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        client = _cached_client("botocore", _new_s3_client)
        try:
            return getattr(client, operation)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as exc:
            raise translate_boto_error(exc) from exc

    def _identity(self) -> tuple[int, str | None]:
        """(size, ETag) as the server has them now."""
        head = self._call("head_object")
        return head["ContentLength"], head.get("ETag")

    @property
    def size(self) -> int:
        """Object size in bytes, as opened."""
        return self.identity[0]

    def get(self, start: int, end: int, stop: threading.Event) -> bytes:
        """Bytes ``[start, end)`` in one ranged GET, retrying transient failures. After a failure the
        object must still have the size and ETag it had when opened: resuming on another version would
        splice two versions together. Gives up (ValueError) once ``stop`` is set."""
        attempts = 0

        def attempt() -> bytes:
            nonlocal attempts
            if stop.is_set():
                raise ValueError(f"{self.url}: reader closed")
            attempts += 1
            if attempts > 1:
                self.retries += 1
                if self._identity() != self.identity:
                    raise OSError(f"{self.url} changed while being read (size/ETag differ); not resuming")
            data = self._call("get_object", Range=f"bytes={start}-{end - 1}")["Body"].read()
            if len(data) != end - start:
                raise OSError(f"{self.url}: got {len(data)} bytes of [{start}, {end}): shorter since opened?")
            return data

        return with_retries(f"reading {self.url} at byte {start}", attempt)


class _Readahead:
    """Fetches bytes ``[start, end)`` of an object in blocks, ahead of ``next()``, on ``streams`` daemon
    threads: stream ``k`` fetches blocks ``k, k + streams, ...`` and holds at most one of them ready, so
    at most ``2 * streams`` blocks are fetched or waiting. The transfer overlaps the reader's work on the
    current block, and parallel requests hide the latency of each (a lone s3fs file fetched one block
    at a time, only once the reader asked for it)."""

    def __init__(self, obj: _S3Object, start: int, end: int, block_size: int, streams: int) -> None:
        self._stop = threading.Event()
        self._ready = [queue.Queue(maxsize=1) for _ in range(streams)]
        self._next = 0  # index of the next block for next()
        starts = range(start, end, block_size)
        for k, ready in enumerate(self._ready):
            args = (obj, starts[k::streams], end, block_size, ready)
            threading.Thread(target=self._run, args=args, name=f"readahead {obj.url}", daemon=True).start()

    def _run(self, obj: _S3Object, starts: range, end: int, block_size: int, ready: queue.Queue) -> None:
        """Fetch the blocks starting at ``starts`` in order; an error is handed on in place of a block."""
        try:
            for start in starts:
                if not self._put(ready, obj.get(start, min(end, start + block_size), self._stop)):
                    return
        except BaseException as exc:  # whatever it is, the reader must see it rather than wait forever
            self._put(ready, exc)

    def _put(self, ready: queue.Queue, item: bytes | BaseException) -> bool:
        """Hand ``item`` on; False when the reader stopped wanting blocks first."""
        while not self._stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> bytes:
        """The next block, waiting for it; raises what fetching it raised."""
        item = self._ready[self._next % len(self._ready)].get()
        self._next += 1
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop fetching (each thread ends after its current request)."""
        self._stop.set()


class ResilientReader(io.RawIOBase):
    """Read-only, seekable file over one S3 object that reads ahead and survives transient failures.

    The object is fetched in ranged GETs of ``block_size`` bytes on ``READAHEAD_STREAMS`` background
    threads ahead of the reader, so that transfer and the caller's decoding overlap. A GET that fails
    transiently is retried (bounded backoff) from its start, after checking that the
    object did not change meanwhile (size or ETag differ: reading stops, rather than splice two versions
    together). ``retries`` counts this reader's retries.
    """

    def __init__(self, url: str, block_size: int | None = None) -> None:
        super().__init__()
        self.url, self.block_size = url, block_size or STREAM_BLOCK_SIZE
        self._object = _S3Object(url)
        self._pos = 0  # next byte to hand out
        self._rest = memoryview(b"")  # the unread part of the current block: it starts at _pos
        self._ahead: _Readahead | None = None

    def __repr__(self) -> str:
        return f"ResilientReader({self.url!r}, pos={self._pos}, retries={self.retries})"

    @property
    def retries(self) -> int:
        """Transient failures this reader retried."""
        return self._object.retries

    @property
    def size(self) -> int:
        """Object size in bytes."""
        return self._object.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the read position; reading ahead restarts there at the next read."""
        position = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        if position != self._pos:
            self._stop_reading_ahead()
            self._pos = position
        return position

    def _stop_reading_ahead(self) -> None:
        """Drop the current block and the blocks fetched ahead."""
        if self._ahead is not None:
            self._ahead.close()
        self._ahead, self._rest = None, memoryview(b"")

    def start(self) -> None:
        """Start fetching from the current position now, before the first read (a shard opened while
        the one before it is still being read); reads start it anyway."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self._ahead is None and self._pos < self.size:
            self._ahead = _Readahead(self._object, self._pos, self.size, self.block_size, READAHEAD_STREAMS)

    def _rest_of_block(self) -> memoryview:
        """The unread part of the current block, moving to the next block when it is used up; empty at
        the end of the object."""
        if not self._rest and self._pos < self.size:
            self.start()
            self._rest = memoryview(self._ahead.next())
        elif self.closed:
            raise ValueError("I/O operation on closed file")
        return self._rest

    def _consume(self, n: int) -> None:
        """Move ``n`` bytes on within the current block."""
        self._rest = self._rest[n:]
        self._pos += n

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` (fewer bytes only at the end of the object); returns the number of bytes."""
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view):
            rest = self._rest_of_block()
            if not rest:
                break
            n = min(len(rest), len(view) - filled)
            view[filled : filled + n] = rest[:n]
            filled += n
            self._consume(n)
        return filled

    def readall(self) -> bytes:
        """All the rest of the object."""
        parts = []
        while rest := self._rest_of_block():
            parts.append(rest)
            self._consume(len(rest))
        return b"".join(parts)

    def close(self) -> None:
        self._stop_reading_ahead()
        super().close()


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
