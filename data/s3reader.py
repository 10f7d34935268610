"""Streaming reads of one S3 object: ``ResilientReader``, what ``data.storage.open_url`` gives for ``s3://``.

The object is fetched in ranged GETs on background threads ahead of the reader, each GET retried from its
start (``data.retries``) after checking that the object did not change, so a tar stream survives an S3
server restart.
"""

from __future__ import annotations

import io
import queue
import threading
from typing import Any

from nuance.data.retries import with_retries
from nuance.data.s3clients import _cached_client, _new_s3_client

# Bytes per ranged GET while streaming, and how many GETs a reader keeps going ahead of its position. An
# open shard holds up to 2 * READAHEAD_STREAMS + 1 blocks (fetched, ready, being read) in every DataLoader
# worker; two parallel GETs stream faster than one (each pays the server's latency), larger ones hardly.
STREAM_BLOCK_SIZE = 8 * 2**20
READAHEAD_STREAMS = 2


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
