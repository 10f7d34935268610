"""Streaming WebDataset pipeline consumed by the trainer: shards -> shuffled, decoded, batched samples.

Samples are image samples (``pixels``) or precomputed latents (``latent_mean`` / ``latent_logvar``); see
``data.decode`` for the formats and ``ShardStream`` for the batch keys.

**Order.** In ``mode="epoch"``, epoch ``e`` on rank ``r`` (all seeded, so a run is reproducible given
``(seed, rank, world_size, num_workers)`` and the other settings):

1. all shards are shuffled with a seed derived from ``(seed, e)`` -- identical on every rank;
2. the shard at position ``i`` of that order goes to rank ``i % world_size`` (ranks are disjoint);
3. within a rank, its ``j``-th shard goes to DataLoader worker ``j % num_workers``;
4. each worker streams its shards, shuffles samples in a buffer seeded by ``(seed, e, rank, worker)``,
   decodes them (crop offset and flip seeded by ``(seed, e, shard, sample index)``) and groups them into
   batches of one group (image size, i.e. bucket; or latent shapes); at its end it sends its partial
   batches, which the main process merges into full ones;
5. the DataLoader interleaves the workers' batches round-robin (``in_order=True``).

At most ``batch_size - 1`` samples per group are left over at the end of an epoch; they are dropped (like
``drop_last``). In ``mode="resampled"`` each worker instead draws its shards with replacement, seeded by
``(seed, rank, worker, round)``; a "round" (reported as ``epoch``) is one draw of about as many shards
per worker as an epoch would give it. Both modes are infinite.

**Resume.** ``state_dict()`` records, for the current epoch, which samples (shard, index within the shard)
were handed to the trainer, which were found bad, how many samples each finished shard holds, and how many
batches each worker had delivered. After ``load_state_dict()`` the workers skip (without decoding, and
without even opening fully consumed shards) what was handed out. Guarantees in ``mode="epoch"``:

- same settings (any ``num_workers``; 0 and 1 are the same layout): the batches continue exactly as an
  uninterrupted run would have produced them;
- ``num_workers`` or ``batch_size`` changed, same ``seed``, ``world_size``, ``rank`` and shards: every
  sample of the epoch still reaches the trainer exactly once (the ones left over at the end, at most
  ``batch_size - 1`` per group, excepted), in another order;
- other changes: warned about; no guarantee for the current epoch, later epochs are as usual.

In ``mode="resampled"`` the same settings continue exactly; after a change of ``num_workers`` the current
round starts over with fresh draws (there is nothing to cover exactly when drawing with replacement).

**Bad data** never stops the stream: unreadable or truncated shards (the rest of the shard is skipped),
undecodable images or arrays, missing captions (with ``require_caption``), missing image/latent, wrong
latent shape or dtype, bad metadata -- each skipped and counted per reason (``data.decode.BAD_REASONS``).
Workers report each bad sample with the next batch they send; counts are kept in the state, so they
survive a resume without counting anything twice. ``max_bad_fraction`` turns too much bad data into a
``BadDataError``.
"""

from __future__ import annotations

import bisect
import glob
import math
import os
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nuance.data.buckets import make_buckets
from nuance.data.decode import (
    CORRUPT_SHARD,
    IMAGE_EXTENSIONS,
    BadSample,
    DecodeSpec,
    collate,
    concat_batches,
    decode_sample,
    read_tar,
    split_batch,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MODES",
    "BadDataError",
    "ShardStream",
    "expand_urls",
    "iter_tar_samples",
    "open_url",
    "rank_shards",
]

MODES = ("epoch", "resampled")
STATE_FORMAT = "nuance-stream-v2"
# Distinct first entries keep the RNG streams of different purposes independent.
_SHARD_ORDER, _SAMPLE_SHUFFLE, _AUGMENT, _RESAMPLE = 0, 1, 2, 3
_GLOB_CHARS = "*?["
# What reading a damaged or vanished shard raises (tarfile, the gzip layer, the file system).
_SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, ValueError)
# Smallest allowed value of each integer setting (rank and world_size are checked separately).
_MINIMUM = {
    "batch_size": 1,
    "image_size": 1,
    "seed": 0,
    "num_workers": 0,
    "shuffle_buffer": 0,
    "bucket_step": 1,
    "min_samples_for_bad_check": 0,
}
# Fields of state_dict() that decide the order of batches; a change on resume changes the order.
_ORDER_FIELDS = (
    "seed",
    "rank",
    "world_size",
    "num_workers",
    "batch_size",
    "num_shards",
    "mode",
    "shuffle_buffer",
    "bucketing",
)
# Of those, the ones that decide which samples a rank reads in an epoch: a change voids the position.
_COVERAGE_FIELDS = ("seed", "rank", "world_size", "num_shards", "mode")
_PREFETCH_FACTOR = 2


class BadDataError(ValueError):
    """More bad samples than ``max_bad_fraction`` allows (raised by the stream, in the main process)."""


# --------------------------------------------------------------------------------------------- shard URLs


def _storage() -> Any:
    """``data.storage`` when it is there (it adds S3 retries and listing), else None."""
    try:
        from nuance.data import storage
    except ModuleNotFoundError as exc:
        if exc.name != "data.storage":
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
        return _list_remote(url) if url.endswith("/") or any(c in url for c in _GLOB_CHARS) else [url]
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
    files, sorted by name), a glob (``data/*.tar``, ``s3://b/shards/*.tar``), a remote prefix ending in
    ``/`` (``s3://b/shards/``: its ``*.tar``), a URL (``file:///...``, ``s3://...``) or a list of any of
    these. Local shards must exist; single remote ones are checked when opened. Remote listing goes
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


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard as dicts ``{"__key__", "__url__", ext: bytes, ...}``.

    Raises RuntimeError when the shard cannot be read (the stream itself skips and counts such shards).
    """
    try:
        yield from _tar_samples(url)
    except _SHARD_ERRORS as exc:
        raise RuntimeError(f"failed to read shard {url}: {exc}") from exc


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


def _buffer_shuffle(samples: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream with a reservoir of ``size`` items (``size <= 1``: keep the order)."""
    if size <= 1:
        yield from samples
        return
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        buffer[i], sample = sample, buffer[i]
        yield sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


# ------------------------------------------------------------------------------------ position records


class _Ranges:
    """A set of sample indices as sorted, disjoint half-open ranges ``[[a, b), ...]``.

    Samples handed out from a shard form a prefix with a few holes (those still in a shuffle buffer) and
    a few stragglers beyond; both stay short as ranges, bounded by the buffers, not by the shard size.
    """

    __slots__ = ("starts", "ends")

    def __init__(self, pairs: Iterable[Sequence[int]] = ()) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for a, b in pairs:
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b):
                raise ValueError(f"index range must be [start, end) with 0 <= start < end, got {[a, b]}")
            if self.ends and a <= self.ends[-1]:  # touching ranges are stored merged
                raise ValueError(f"index ranges must be sorted and apart, got {[a, b]} after {self.ends[-1]}")
            self.starts.append(a)
            self.ends.append(b)

    def __contains__(self, index: int) -> bool:
        """Whether ``index`` is in the set (binary search over the range starts)."""
        j = bisect.bisect_right(self.starts, index) - 1
        return j >= 0 and index < self.ends[j]

    def __len__(self) -> int:
        """Number of indices in the set."""
        return sum(b - a for a, b in zip(self.starts, self.ends))

    def add(self, index: int) -> None:
        """Insert ``index``, merging it with neighbouring ranges."""
        j = bisect.bisect_right(self.starts, index) - 1
        if j >= 0 and index < self.ends[j]:
            return
        left = j >= 0 and self.ends[j] == index
        right = j + 1 < len(self.starts) and self.starts[j + 1] == index + 1
        if left and right:
            self.ends[j] = self.ends.pop(j + 1)
            del self.starts[j + 1]
        elif left:
            self.ends[j] = index + 1
        elif right:
            self.starts[j + 1] = index
        else:
            self.starts.insert(j + 1, index)
            self.ends.insert(j + 1, index + 1)

    def covers(self, n: int) -> bool:
        """Whether every index in ``[0, n)`` is in the set."""
        return n == 0 or (bool(self.starts) and self.starts[0] == 0 and self.ends[0] >= n)

    def to_list(self) -> list[list[int]]:
        """``[[start, end), ...]`` for JSON."""
        return [[a, b] for a, b in zip(self.starts, self.ends)]

    @classmethod
    def union(cls, *sets: _Ranges) -> _Ranges:
        """The indices in any of ``sets``."""
        pairs = sorted(p for s in sets for p in zip(s.starts, s.ends))
        merged: list[list[int]] = []
        for a, b in pairs:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return cls(merged)


@dataclass(frozen=True)
class _Position:
    """What the workers of a resumed epoch must skip (picklable, built by the main process)."""

    epoch: int
    done: dict[int, list[list[int]]]  # source -> ranges of samples handed out or found bad
    sizes: dict[int, int]  # source -> its number of samples, for sources read to their end
    skip_items: tuple[int, ...]  # per worker: leading items already delivered (same layout only)


@dataclass
class _EpochRecord:
    """The main process's account of the current epoch, saved in ``state_dict()["position"]``."""

    num_workers: int
    consumed: dict[int, _Ranges] = field(default_factory=dict)  # source -> samples handed out
    bad: dict[int, _Ranges] = field(default_factory=dict)  # source -> samples found bad (counted)
    sizes: dict[int, int] = field(default_factory=dict)  # source -> samples in it (read to the end)
    items: list[int] = field(default_factory=list)  # per worker: leading items fully handed out
    pending: dict[int, int] = field(default_factory=dict)  # worker -> samples of its final item not out yet

    def __post_init__(self) -> None:
        """Start every worker's item count at zero unless given."""
        self.items = self.items or [0] * self.num_workers

    def hand_out(self, source: int, index: int) -> None:
        """Record that sample ``index`` of ``source`` went to the trainer."""
        self.consumed.setdefault(source, _Ranges()).add(index)

    def final_sample_out(self, worker: int) -> None:
        """One more sample of ``worker``'s final item went out; the item counts once all have."""
        self.pending[worker] -= 1
        if self.pending[worker] == 0:
            del self.pending[worker]
            self.items[worker] += 1

    def to_state(self) -> dict[str, list]:
        """``{"sources": [[source, size or -1, handed-out ranges, bad ranges], ...], "worker_items"}``."""
        sources = sorted(set(self.consumed) | set(self.bad) | set(self.sizes))
        return {
            "sources": [
                [
                    s,
                    self.sizes.get(s, -1),
                    self.consumed.get(s, _Ranges()).to_list(),
                    self.bad.get(s, _Ranges()).to_list(),
                ]
                for s in sources
            ],
            "worker_items": list(self.items),
        }

    @classmethod
    def from_state(cls, position: dict, num_workers: int, same_layout: bool) -> _EpochRecord:
        """Rebuild from ``to_state()``; worker item counts only carry over to the same worker layout."""
        record = cls(num_workers)
        try:
            for source, size, consumed, bad in position["sources"]:
                if size >= 0:
                    record.sizes[int(source)] = int(size)
                if consumed:
                    record.consumed[int(source)] = _Ranges(consumed)
                if bad:
                    record.bad[int(source)] = _Ranges(bad)
            items = [int(n) for n in position["worker_items"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stream state has a malformed 'position': {exc}") from exc
        if same_layout and len(items) == num_workers:
            record.items = items
        return record

    def position(self, epoch: int) -> _Position:
        """What the workers must skip in ``epoch``: handed-out and bad samples alike."""
        done = {
            s: _Ranges.union(self.consumed.get(s, _Ranges()), self.bad.get(s, _Ranges())).to_list()
            for s in set(self.consumed) | set(self.bad)
        }
        return _Position(epoch, done, dict(self.sizes), tuple(self.items))


# ------------------------------------------------------------------------------------------------ workers


def _dtype_kind(name: str) -> str:
    """numpy's kind letter of the dtype called ``name`` ("f" for floats), "" for no dtype at all."""
    try:
        return np.dtype(name).kind
    except TypeError:
        return ""


@dataclass(frozen=True)
class _Settings:
    """The arguments that fix one rank's batches; small and picklable, validated on creation."""

    rank: int
    world_size: int
    batch_size: int
    image_size: int
    seed: int
    num_workers: int
    shuffle_buffer: int
    random_flip: bool
    random_crop: bool
    bucketing: bool
    bucket_step: int
    mode: str
    latent_shape: tuple[int, int, int] | None
    latent_dtype: str | None
    require_caption: bool
    max_bad_fraction: float | None
    min_samples_for_bad_check: int

    def __post_init__(self) -> None:
        """Raise ValueError for values the stream cannot work with."""
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        for name, low in _MINIMUM.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        shape = self.latent_shape
        if shape is not None and (len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"latent_shape must be three positive ints (C, h, w), got {shape!r}")
        if self.latent_dtype is not None and _dtype_kind(self.latent_dtype) != "f":
            raise ValueError(
                f"latent_dtype must be a float dtype such as 'float16', got {self.latent_dtype!r}"
            )
        if self.max_bad_fraction is not None and not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1] or None, got {self.max_bad_fraction}")

    @property
    def workers(self) -> int:
        """Worker streams per rank: num_workers=0 reads in the main process as one stream, like 1."""
        return max(1, self.num_workers)


class _ShardDataset(IterableDataset):
    """One rank's items, one epoch per ``iter()`` call, starting at ``start_epoch``.

    Holds only URLs, settings and the resume position, so it pickles cheaply into workers; files are
    opened while iterating. Each item is ``{"parts": [batch, ...], "meta": {...}}``: a full batch, a
    worker's final partial batches, or a marker standing in for a batch delivered before a resume (so the
    round-robin order of the workers stays the same).
    """

    def __init__(
        self, urls: list[str], settings: _Settings, spec: DecodeSpec, start_epoch: int, position: _Position
    ) -> None:
        self.urls, self.settings, self.spec = urls, settings, spec
        self.start_epoch, self.position = start_epoch, position
        self._epochs_started = 0  # per process: each (persistent) worker counts its own iter() calls

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Start the next epoch (not a generator function, so the counter moves on ``iter()``)."""
        epoch = self.start_epoch + self._epochs_started
        self._epochs_started += 1
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        position = self.position if self.position.epoch == epoch else None
        return _WorkerEpoch(self, epoch, worker, num_workers, position).items()


class _WorkerEpoch:
    """What one worker does in one epoch: read its shards, shuffle, decode, batch, report."""

    def __init__(
        self, ds: _ShardDataset, epoch: int, worker: int, num_workers: int, position: _Position | None
    ):
        self.ds, self.cfg = ds, ds.settings
        self.epoch, self.worker, self.num_workers = epoch, worker, num_workers
        self.done = {s: _Ranges(r) for s, r in position.done.items()} if position else {}
        self.sizes = dict(position.sizes) if position else {}
        self.skip = position.skip_items[worker] if position and worker < len(position.skip_items) else 0
        self.bad: list[list] = []  # [source, index, reason] not yet reported
        self.ends: list[list] = []  # [source, samples, error reason or ""] not yet reported

    def _sources(self) -> list[tuple[int, str]]:
        """(source id, url) pairs this worker reads, in order; ids are shard indices in epoch mode and
        draw slots in resampled mode (one shard may be drawn twice)."""
        cfg, urls = self.cfg, self.ds.urls
        if cfg.mode == "epoch":
            order = _rank_shard_indices(
                len(urls), seed=cfg.seed, epoch=self.epoch, rank=cfg.rank, world_size=cfg.world_size
            )
            return [(i, urls[i]) for i in order[self.worker :: self.num_workers]]
        draws = math.ceil(len(urls) / (cfg.world_size * self.num_workers))
        picks = _rng(_RESAMPLE, cfg.seed, cfg.rank, self.worker, self.epoch).integers(len(urls), size=draws)
        return [(self.worker * draws + j, urls[int(i)]) for j, i in enumerate(picks)]

    def _read(self) -> Iterator[tuple[int, int, dict | None]]:
        """(source, index, sample) for every sample of this worker's shards; sample is None for those
        already handed out or found bad before a resume (kept so the shuffle draws stay the same)."""
        sources = self._sources()
        opener = _OpenAhead()
        try:
            for i, (source, url) in enumerate(sources):
                done, size = self.done.get(source, _Ranges()), self.sizes.get(source)
                if self._read_before(source):  # nothing left in it: do not even open it
                    yield from ((source, k, None) for k in range(size))
                    continue
                count, error = 0, ""
                try:
                    samples = _tar_samples(url, lambda k, d=done: k not in d, size, opener.open)
                    for sample in samples:
                        if count == 0:  # this shard is open: open the next one to be read
                            later = (u for s, u in sources[i + 1 :] if not self._read_before(s))
                            opener.ahead(next(later, None))
                        yield source, count, sample
                        count += 1
                except _SHARD_ERRORS:
                    error = CORRUPT_SHARD
                # A shard whose size is known ends quietly at that size; failing before it means it changed.
                if size is None or (error and count < size):
                    self.ends.append([source, count, error])
        finally:
            opener.close()

    def _read_before(self, source: int) -> bool:
        """Whether every sample of ``source`` was handed out (or found bad) before a resume."""
        size = self.sizes.get(source)
        return size is not None and self.done.get(source, _Ranges()).covers(size)

    def _item(self, parts: list[dict], kind: str) -> dict[str, Any]:
        """One message to the main process, carrying the reports gathered since the last one."""
        meta = {"epoch": self.epoch, "worker": self.worker, "kind": kind, "bad": self.bad, "ends": self.ends}
        self.bad, self.ends = [], []
        return {"parts": parts, "meta": meta}

    def items(self) -> Iterator[dict[str, Any]]:
        """Markers for the items delivered before a resume, then full batches, then the final item."""
        cfg = self.cfg
        for _ in range(self.skip):
            yield self._item([], "marker")
        shuffle_rng = _rng(_SAMPLE_SHUFFLE, cfg.seed, self.epoch, cfg.rank, self.worker)
        groups: dict[str, list[dict[str, Any]]] = {}
        for source, index, sample in _buffer_shuffle(self._read(), cfg.shuffle_buffer, shuffle_rng):
            if sample is None:
                continue
            try:
                group, fields = decode_sample(
                    sample, self.ds.spec, [_AUGMENT, cfg.seed, self.epoch, source, index]
                )
            except BadSample as exc:
                self.bad.append([source, index, exc.reason])
                continue
            fields["_src"] = (source, index, self.worker)
            buffer = groups.setdefault(group, [])
            buffer.append(fields)
            if len(buffer) == cfg.batch_size:
                yield self._item([collate(buffer, group)], "batch")
                groups[group] = []
        # Sorted, so the final item does not depend on which group happened to come first.
        yield self._item([collate(groups[g], g) for g in sorted(groups) if groups[g]], "final")


class ShardStream:
    """Infinite, reproducible, resumable stream of training batches for one rank.

    Image batches::

        {"pixels": (B, 3, H, W) float32 in [-1, 1], "caption": list[str],
         "class_label": (B,) long (-1 when missing), "key": list[str],
         "original_size": (B, 2) long (h, w) before resizing, "crop_coords": (B, 2) long (top, left),
         "target_size": (B, 2) long (H, W)}

    ``H = W = image_size``, or with ``bucketing=True`` the bucket of the batch (``self.buckets``).

    Latent batches (shards of ``latent_mean.npy`` + ``latent_logvar.npy`` or ``latent.npy``)::

        {"latent_mean": (B, C, h, w) float32, "latent_logvar": (B, C, h, w) float32 (-inf for latent.npy),
         "encoder_hidden_states": (B, T, D) float32, "encoder_attention_mask": (B, T) long  [with text.npy],
         "pooled": (B, D) float32  [with pooled.npy],
         "caption", "class_label", "key", "original_size", "crop_coords"  (as above)}

    The stream never samples latents: the trainer draws from mean / logvar with its own RNG. Every batch
    holds samples of one group only (same image size, or same latent / text / pooled shapes).

    See the module docstring for the order, the resume guarantees and bad-data handling. Only the most
    recent ``iter()`` of a stream is valid.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        image_size: int,
        seed: int,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        random_flip: bool = True,
        random_crop: bool = True,
        bucketing: bool = False,
        bucket_step: int = 32,
        mode: str = "epoch",
        latent_shape: Sequence[int] | None = None,
        latent_dtype: str | None = "float16",
        require_caption: bool = False,
        max_bad_fraction: float | None = None,
        min_samples_for_bad_check: int = 200,
    ) -> None:
        self.settings = _Settings(
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            image_size=image_size,
            seed=seed,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            random_flip=random_flip,
            random_crop=random_crop,
            bucketing=bucketing,
            bucket_step=bucket_step,
            mode=mode,
            latent_shape=None if latent_shape is None else tuple(latent_shape),
            latent_dtype=latent_dtype,
            require_caption=require_caption,
            max_bad_fraction=max_bad_fraction,
            min_samples_for_bad_check=min_samples_for_bad_check,
        )
        self.buckets: list[tuple[int, int]] | None = (
            make_buckets(image_size, bucket_step) if bucketing else None
        )
        self.spec = DecodeSpec(
            image_size=image_size,
            buckets=None if self.buckets is None else tuple(self.buckets),
            random_crop=random_crop,
            random_flip=random_flip,
            latent_shape=self.settings.latent_shape,
            latent_dtype=latent_dtype,
            require_caption=require_caption,
        )
        self.urls = expand_urls(urls)
        if mode == "epoch":
            self._check_shard_count()
        self._epoch = 0
        self._batches_in_epoch = 0
        self._samples_seen = 0
        self._bad_counts: Counter[str] = Counter()
        self._record = _EpochRecord(self.settings.workers)
        self._legacy_skip = 0  # batches to drop after loading a state of the old format (no position)
        self._generation = 0  # bumped by iter()/load_state_dict(); older iterators then refuse to continue

    def _check_shard_count(self) -> None:
        """Epoch mode deals shards to ranks: every rank needs one; warn about workers left without any."""
        cfg = self.settings
        if len(self.urls) < cfg.world_size:
            raise ValueError(
                f"need at least world_size shards: got {len(self.urls)} for world_size={cfg.world_size}"
            )
        shards_per_rank = len(range(cfg.rank, len(self.urls), cfg.world_size))
        if cfg.num_workers > shards_per_rank:
            warnings.warn(
                f"num_workers={cfg.num_workers} > {shards_per_rank} shard(s) per rank: "
                f"{cfg.num_workers - shards_per_rank} worker(s) will idle",
                stacklevel=3,
            )

    # ---------------------------------------------------------------------------------------- counters

    @property
    def epoch(self) -> int:
        """Epoch (resampled mode: round) of the most recently handed-out batch (0-based)."""
        return self._epoch

    @property
    def samples_seen(self) -> int:
        """Samples handed to the trainer so far, over all epochs (including before a resume)."""
        return self._samples_seen

    @property
    def bad_counts(self) -> dict[str, int]:
        """Skipped samples per reason (``corrupt_shard`` counts shards), including before a resume."""
        return {reason: n for reason, n in sorted(self._bad_counts.items()) if n}

    @property
    def bad_fraction(self) -> float:
        """bad / (good + bad), where good = samples handed out; 0.0 before anything was read."""
        bad = sum(self._bad_counts.values())
        return bad / (bad + self._samples_seen) if bad else 0.0

    # -------------------------------------------------------------------------------------------- state

    def _order_values(self) -> dict[str, Any]:
        """The settings that fix the batch order, as saved in ``state_dict()``."""
        cfg = self.settings
        values = {name: getattr(cfg, name) for name in _ORDER_FIELDS if hasattr(cfg, name)}
        return {**values, "num_shards": len(self.urls)}

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream (JSON-serialisable: ints, lists, a few strings).

        ``{"format", "epoch", "batches_in_epoch", "samples_seen", <settings that fix the order>,
        "bad_counts": {reason: n}, "position": {"sources": [[source, size (-1: unknown), handed-out
        ranges, bad ranges], ...], "worker_items": [n per worker]}}`` -- ``position`` covers the current
        epoch only; ranges are ``[start, end)`` pairs of sample indices within the shard.
        """
        return {
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "samples_seen": self._samples_seen,
            **self._order_values(),
            "bad_counts": self.bad_counts,
            "position": self._record.to_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict()``) at the next ``iter()``.

        Settings that differ from the saved ones are allowed (e.g. another ``num_workers``) and warned
        about with what still holds (module docstring, "Resume").
        """
        for name in ("epoch", "batches_in_epoch"):
            if not isinstance(state.get(name), int) or state[name] < 0:
                raise ValueError(f"stream state needs a non-negative int {name!r}, got {state.get(name)!r}")
        counts = state.get("bad_counts", {})
        if not isinstance(counts, dict) or not all(isinstance(n, int) and n >= 0 for n in counts.values()):
            raise ValueError(f"stream state 'bad_counts' must map reasons to counts, got {counts!r}")
        mine = self._order_values()
        same_workers = max(1, int(state.get("num_workers", 0))) == self.settings.workers
        changed = [
            f"{k}: {state[k]} -> {mine[k]}"
            for k in _ORDER_FIELDS
            if k in state and state[k] != mine[k] and not (k == "num_workers" and same_workers)
        ]
        lost = [k for k in _COVERAGE_FIELDS if k in state and state[k] != mine[k]]
        if self.settings.mode == "resampled" and not same_workers:
            lost.append("num_workers")
        self._epoch, self._batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._samples_seen = int(state.get("samples_seen", 0))
        self._bad_counts = Counter(counts)
        self._record = _EpochRecord(self.settings.workers)
        self._legacy_skip = 0
        if "position" not in state:
            self._legacy_skip = self._batches_in_epoch
            consequence = "old state format: skipping as many batches as were handed out (not the same ones)"
        elif lost:
            consequence = f"the position within epoch {self._epoch} is dropped ({', '.join(lost)} changed)"
        else:
            self._record = _EpochRecord.from_state(state["position"], self.settings.workers, not changed)
            consequence = f"the order changes; each remaining sample of epoch {self._epoch} still comes once"
        if changed or "position" not in state:
            settings = ", ".join(changed) or "none"
            warnings.warn(
                f"resuming the data stream with changed settings ({settings}); {consequence}",
                stacklevel=2,
            )
        self._generation += 1

    # ------------------------------------------------------------------------------------------- batches

    def _loader(self, start_epoch: int) -> DataLoader:
        """A DataLoader whose k-th ``iter()`` yields the items of epoch ``start_epoch + k``."""
        position = self._record.position(start_epoch)
        dataset = _ShardDataset(self.urls, self.settings, self.spec, start_epoch, position)
        workers = self.settings.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=_PREFETCH_FACTOR if workers > 0 else None,
            in_order=True,
            # DataLoader draws its workers' base seed from this generator; without one it would draw
            # from the global torch RNG, shifting the trainer's noise stream after a resume.
            generator=torch.Generator().manual_seed(self.settings.seed),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield batches forever, starting at the current position."""
        self._generation += 1
        return self._batches(self._generation)

    def _check_fresh(self, generation: int) -> None:
        """Refuse to go on in an iterator that a newer ``iter()`` or ``load_state_dict()`` replaced."""
        if generation != self._generation:
            raise RuntimeError("this ShardStream was re-iterated or re-loaded; the old iterator is stale")

    def _batches(self, generation: int) -> Iterator[dict[str, Any]]:
        """The generator behind ``__iter__``: items -> batches, recording what is handed out."""
        loader = self._loader(self._epoch)
        while True:
            carry: dict[str, dict[str, Any]] = {}  # group -> samples of final items waiting for a full batch
            for item in loader:
                self._check_fresh(generation)
                for batch, from_final in self._receive(item, carry):
                    self._check_fresh(generation)
                    counted = self._legacy_skip == 0
                    self._hand_out(batch, from_final, counted)
                    if counted:
                        yield batch
                    else:
                        self._legacy_skip -= 1
            self._end_epoch()

    def _receive(self, item: dict[str, Any], carry: dict[str, dict[str, Any]]) -> list[tuple[dict, bool]]:
        """Account for one worker item; returns the batches it completes, each with "from a final item"."""
        meta = item["meta"]
        if meta["epoch"] != self._epoch:
            raise RuntimeError(
                f"internal error: worker epoch {meta['epoch']} does not match epoch {self._epoch}"
            )
        self._note_reports(meta)
        self._check_bad_fraction()
        worker, parts = meta["worker"], item["parts"]
        if meta["kind"] == "marker":  # delivered before the resume: already in the record
            return []
        if meta["kind"] == "batch":
            self._record.items[worker] += 1
            return [(parts[0], False)]
        total = sum(len(part["key"]) for part in parts)
        if total:
            self._record.pending[worker] = total
        else:
            self._record.items[worker] += 1
        ready = []
        size = self.settings.batch_size
        for part in parts:
            group = part["_group"]
            merged = concat_batches(carry.pop(group), part) if group in carry else part
            while len(merged["key"]) >= size:
                head, merged = split_batch(merged, size)
                ready.append((head, True))
            if merged["key"]:
                carry[group] = merged
        return ready

    def _note_reports(self, meta: dict[str, Any]) -> None:
        """Count the bad samples and finished shards a worker reports (each only once per epoch)."""
        for source, index, reason in meta["bad"]:
            seen = self._record.bad.setdefault(source, _Ranges())
            if index not in seen:
                seen.add(index)
                self._bad_counts[reason] += 1
        for source, count, error in meta["ends"]:
            # A shard failing short of its known size was damaged since it was read: a new failure.
            new_failure = source not in self._record.sizes or count < self._record.sizes[source]
            self._record.sizes.setdefault(source, count)
            if error and new_failure:
                self._bad_counts[error] += 1

    def _hand_out(self, batch: dict[str, Any], from_final: bool, counted: bool) -> None:
        """Record ``batch`` as handed to the trainer and strip the fields only the stream uses."""
        batch.pop("_group")
        for source, index, worker in batch.pop("_src").tolist():
            self._record.hand_out(source, index)
            if from_final:
                self._record.final_sample_out(worker)
        if counted:
            self._batches_in_epoch += 1
            self._samples_seen += len(batch["key"])

    def _reasons(self) -> str:
        """Bad counts as ``reason=n, ...`` for messages."""
        return ", ".join(f"{reason}={n}" for reason, n in self.bad_counts.items()) or "none"

    def _check_bad_fraction(self) -> None:
        """Raise BadDataError once enough samples were read and too many of them were bad."""
        cfg = self.settings
        bad = sum(self._bad_counts.values())
        total = bad + self._samples_seen
        if cfg.max_bad_fraction is None or total < max(1, cfg.min_samples_for_bad_check):
            return
        if bad / total > cfg.max_bad_fraction:
            raise BadDataError(
                f"rank {cfg.rank}: {bad} of {total} samples were bad ({100 * bad / total:.1f}%: "
                f"{self._reasons()}), more than data.max_bad_fraction={cfg.max_bad_fraction}; "
                "fix or remove the bad shards, or raise data.max_bad_fraction"
            )

    def _end_epoch(self) -> None:
        """Move on to the next epoch, after checking that this one produced something."""
        if self._batches_in_epoch == 0:
            raise ValueError(
                f"epoch {self._epoch} produced no batch on rank {self.settings.rank}: it needs at least "
                f"batch_size={self.settings.batch_size} good samples of one group per epoch "
                f"(bad so far: {self._reasons()})"
            )
        self._epoch += 1
        self._batches_in_epoch = 0
        self._record = _EpochRecord(self.settings.workers)
        self._legacy_skip = 0
