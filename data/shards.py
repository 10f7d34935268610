"""The shards of a ``ShardStream``: which they are, how one is opened and read, which a rank reads.

``expand_urls`` turns a shard spec (brace pattern, directory, glob, remote prefix, list) into URLs;
``open_url`` opens one (through ``data.storage`` when it is there); ``iter_tar_samples`` reads its samples;
``rank_shards`` deals the shards of an epoch to the ranks. ``_rng`` seeds every random choice of the
stream, with a distinct first entry per purpose.
"""

from __future__ import annotations

import glob
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

import fsspec
import numpy as np
from braceexpand import braceexpand

from nuance.data.decode import read_tar

# Distinct first entries keep the RNG streams of different purposes independent.
_SHARD_ORDER, _SAMPLE_SHUFFLE, _AUGMENT, _RESAMPLE = 0, 1, 2, 3
_GLOB_CHARS = "*?["
# Names taken as shard objects without listing (anything else remote is first looked at as a prefix).
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What reading a damaged or vanished shard raises (tarfile, the gzip layer, the file system).
_SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)


# --------------------------------------------------------------------------------------------- shard URLs


def _storage() -> Any:
    """``data.storage`` when it is there (it adds S3 retries and listing), else None."""
    try:
        from nuance.data import storage
    except ModuleNotFoundError as exc:
        if exc.name != "nuance.data.storage":
            raise  # storage exists but one of its own imports is missing: that is a real error
        return None
    return storage


def _local_path(url: str) -> str | None:
    """The local filesystem path behind ``url`` (plain path or ``file://`` URL), else None."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else url


def _list_remote(url: str) -> list[str]:
    """Shards under a remote prefix (``s3://b/shards/``: its ``*.tar``) or matching a remote glob."""
    storage = _storage()
    if storage is not None:
        found = storage.list_urls(url)
    else:
        fs, path = fsspec.core.url_to_fs(url)
        pattern = path if any(c in url for c in _GLOB_CHARS) else path.rstrip("/") + "/*"
        protocol = url.split("://", 1)[0]
        found = sorted(f"{protocol}://{p.lstrip('/')}" for p in fs.glob(pattern))
    return [u for u in found if u.endswith(".tar")] if url.endswith("/") else list(found)


def _expand_one(url: str, spec: Any) -> list[str]:
    """Expand one brace-free item: a local directory -> its ``*.tar`` (sorted); a remote prefix or a
    glob -> the matching shards (sorted); a local file is checked; other remote URLs are kept as they are."""
    local = _local_path(url)
    if local is None:  # remote: single objects are checked when opened, in the workers
        if url.endswith("/") or any(c in url for c in _GLOB_CHARS):
            return _list_remote(url)
        if url.endswith(_SHARD_SUFFIXES):
            return [url]
        # A prefix given without its "/": S3 has no directories (AWS answers its HEAD with 404), so look
        # for shards under it; an object of that name is kept when there are none (or listing is denied).
        try:
            return _list_remote(url + "/") or [url]
        except PermissionError:
            return [url]
    prefix = url[: len(url) - len(local)]  # keep "file://" when the path was given as a URL
    if os.path.isdir(local):
        names = sorted(n for n in os.listdir(local) if n.endswith(".tar"))
        return [prefix + os.path.join(local, n) for n in names]
    if os.path.isfile(local):
        return [url]
    if any(c in local for c in _GLOB_CHARS):
        return [prefix + p for p in sorted(glob.glob(local)) if os.path.isfile(p)]
    raise ValueError(f"shard {url!r} from spec {spec!r} does not exist")


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    ``spec`` is a brace pattern (``data/shard-{000000..000009}.tar``), a local directory (its ``*.tar``
    files, sorted by name), a glob (``data/*.tar``, ``s3://b/shards/*.tar``), a remote prefix with or
    without its ``/`` (``s3://b/shards/``, ``s3://b/shards``: its ``*.tar``; a remote name without a
    ``.tar`` suffix and without shards under it is one object), a URL (``file:///...``, ``s3://...``) or
    a list of any of these. Local shards must exist; single remote ones are checked when opened. Remote
    listing goes
    through ``data.storage.list_urls`` when that module is available, else fsspec.
    """
    if isinstance(spec, (str, os.PathLike)):
        items = [os.fspath(spec)]
    elif isinstance(spec, (list, tuple)):
        items = [os.fspath(item) for item in spec]
    else:
        raise ValueError(f"shard spec must be a string or a list of strings, got {type(spec).__name__}")
    urls = [
        url
        for item in items
        if item.strip()
        for pattern in braceexpand(item)
        for url in _expand_one(pattern, spec)
    ]
    if not urls:
        raise ValueError(f"shard spec {spec!r} matched no shards")
    return urls


def open_url(url: str) -> IO[bytes]:
    """Open a shard for binary reading: the one place shards are opened.

    Delegates to ``data.storage.open_url`` (local, ``file://``, ``s3://`` with retries) when that module
    is available, else opens local paths directly and anything else through fsspec. Called inside the
    process that reads, so that non-fork-safe clients (s3fs) are created in the DataLoader workers.
    """
    storage = _storage()
    if storage is not None:
        return storage.open_url(url, "rb")
    local = _local_path(url)
    if local is not None:
        return open(local, "rb")
    return fsspec.open(url, "rb").open()


# ---------------------------------------------------------------------------------------------- reading


def _tar_samples(url: str, want=None, limit: int | None = None, opener=open_url) -> Iterator[dict | None]:
    """``data.decode.read_tar`` over the shard ``url``, opened through ``opener`` (``open_url``)."""
    with opener(url) as f:
        yield from read_tar(f, url, want, limit)


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard as dicts ``{"__key__", "__url__", ext: bytes, ...}``.

    Raises RuntimeError when the shard cannot be read (the stream itself skips and counts such shards).
    """
    try:
        yield from _tar_samples(url)
    except _SHARD_ERRORS as exc:
        raise RuntimeError(f"failed to read shard {url}: {exc}") from exc


# ---------------------------------------------------------------------------------------------- ranks


def _rng(*entropy: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (stable across processes and runs)."""
    return np.random.default_rng(list(entropy))


def _rank_shard_indices(num_shards: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards rank ``rank`` reads in epoch ``epoch``, in reading order."""
    return [int(i) for i in _rng(_SHARD_ORDER, seed, epoch).permutation(num_shards)[rank::world_size]]


def rank_shards(urls: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` reads in epoch ``epoch``, in reading order.

    The shard order is shuffled per epoch with the same seed on every rank, then dealt round-robin.
    """
    order = _rank_shard_indices(len(urls), seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    return [urls[i] for i in order]
