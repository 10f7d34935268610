"""Opening a worker's next S3 shard while the current one is still being read (``_OpenAhead``)."""

from __future__ import annotations

from typing import IO, Any

from nuance.data.retries import retry_while
from nuance.data.shards import _SHARD_ERRORS, _local_path, open_url


def _missing_or_forbidden(exc: BaseException) -> bool:
    """Whether opening a shard failed with 404 / 403 (or a local missing file / permission)."""
    return isinstance(exc, (FileNotFoundError, PermissionError))


class _OpenAhead:
    """Opens one worker's shards in order, each remote one while the shard before it is still being read.

    A remote shard's first bytes take a HEAD and a ranged GET (~20 ms to a local S3 server), during which
    the worker would idle once per shard; opened ahead, its read-ahead threads (``start()`` of
    ``data.storage.ResilientReader``) fetch them while the previous shard is decoded. Local files open on
    demand. An error opening ahead is raised when that shard's turn comes, as if opened then.
    """

    def __init__(self) -> None:
        self._url: str | None = None
        self._opened: Any = None  # the file opened ahead for _url, or the exception opening it raised

    def open(self, url: str) -> IO[bytes]:
        """The file of ``url``: the one opened ahead, or a fresh one."""
        if url != self._url:
            self.close()
            return open_url(url)
        opened, self._url, self._opened = self._opened, None, None
        if isinstance(opened, BaseException):
            raise opened
        return opened

    def open_retrying(self, url: str) -> IO[bytes]:
        """``open(url)``, retrying a missing or forbidden shard for up to ``NUANCE_S3_RETRY_SECONDS``
        (a shard still being uploaded, credentials being renewed); transient failures were already
        retried inside ``data.storage``. An error met opening ahead counts as the first attempt."""
        return retry_while(_missing_or_forbidden, f"opening shard {url}", self.open, url)

    def ahead(self, url: str | None) -> None:
        """Open ``url`` (the next shard) now when it is remote and its reader can start fetching."""
        if url is None or url == self._url or _local_path(url) is not None:
            return
        self.close()
        try:
            opened = open_url(url)
        except _SHARD_ERRORS as exc:
            opened = exc
        start = getattr(opened, "start", None)
        if start is None and not isinstance(opened, BaseException):
            opened.close()  # nothing gained by holding it open: open it in turn
            return
        if start is not None:
            start()
        self._url, self._opened = url, opened

    def close(self) -> None:
        """Close a file opened ahead and not used."""
        if self._opened is not None and not isinstance(self._opened, BaseException):
            self._opened.close()
        self._url = self._opened = None
