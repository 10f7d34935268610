"""S3 settings from the environment, and this process's S3 clients built from them.

S3 settings come only from the environment (or the named ``AWS_PROFILE``), never from recipes, so that no
recipe, checkpoint or log ever carries a credential:

- endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (unset: AWS, or the profile's endpoint);
- credentials: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``), else
  ``AWS_PROFILE``, else botocore's default chain;
- region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``.

``describe()`` tells where requests go without any secret. Clients are built per process (neither s3fs nor
botocore clients are fork-safe) with botocore's own retries off: ``data.retries`` does the retrying.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from nuance.data.retries import retry_seconds

T = TypeVar("T")

_clients_lock = threading.Lock()
_clients: dict[tuple, Any] = {}


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


# ------------------------------------------------------------------------------------------------ clients


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
