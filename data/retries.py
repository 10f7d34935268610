"""Retrying transient S3 failures: which failures are transient, and a bounded backoff with jitter.

Every S3 operation of ``data.storage`` and ``data.s3reader`` runs through ``with_retries``: transient
failures (connection refused/reset, timeouts, HTTP 5xx, throttling) are retried with exponential backoff
and jitter for at most ``NUANCE_S3_RETRY_SECONDS`` (default 120 s) per outage, then ``RetriesExhausted``
is raised. ``retry_count()`` counts the retries of this process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

# Retries log as they did before they had a module of their own: S3 trouble under one logger name.
logger = logging.getLogger("nuance.data.storage")
T = TypeVar("T")

RETRY_SECONDS_ENV = "NUANCE_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
_BACKOFF_FIRST_S, _BACKOFF_CAP_S = 0.2, 8.0
# S3 error codes that mean "try again later" even when the HTTP status is not 5xx.
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError"}
_TRANSIENT_CODES |= {"RequestLimitExceeded", "TooManyRequestsException", "ServiceUnavailable"}
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)

_retry_lock = threading.Lock()
_retries = 0


class RetriesExhausted(OSError):
    """A transient S3 failure lasted longer than ``NUANCE_S3_RETRY_SECONDS``."""


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
    return retry_while(is_transient, what, func, *args, **kwargs)


def retry_while(
    retryable: Callable[[BaseException], bool], what: str, func: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """``func(*args, **kwargs)``, retrying the failures ``retryable`` accepts under the backoff policy
    (``with_retries`` is this for transient failures; a shard that is missing is retried the same way)."""
    backoff = _Backoff(what)
    while True:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not retryable(exc):
                raise
            backoff.wait(exc)
