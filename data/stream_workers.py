"""The DataLoader side of a ``ShardStream``: the picklable dataset and what one worker does per epoch.

``_Settings`` are the stream's validated arguments; ``_ShardDataset`` is what the DataLoader iterates
(one epoch per ``iter()``); ``_WorkerEpoch`` reads a worker's shards, skips what a resumed position
says was handed out, shuffles, decodes and batches, and reports bad samples and finished shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from nuance.data.config import DataMode, OnMissingShard
from nuance.data.decode import CORRUPT_SHARD, MISSING_SHARD, BadSample, DecodeSpec, collate, decode_sample
from nuance.data.openahead import _OpenAhead
from nuance.data.position import _Position, _Ranges
from nuance.data.retries import RetriesExhausted, is_transient
from nuance.data.shards import (
    _AUGMENT,
    _RESAMPLE,
    _SAMPLE_SHUFFLE,
    _SHARD_ERRORS,
    _rank_shard_indices,
    _rng,
    _tar_samples,
)

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


def _dtype_kind(name: str) -> str:
    """numpy's kind letter of the dtype called ``name`` ("f" for floats), "" for no dtype at all."""
    try:
        return np.dtype(name).kind
    except TypeError:
        return ""


def unavailable_reason(exc: BaseException) -> str | None:
    """Why a shard could not be fetched at all -- "missing", "forbidden" or "unreachable" -- or None when
    ``exc`` is about its bytes (truncated, not a tar, changed while read): those are corrupt shards."""
    if isinstance(exc, RetriesExhausted) and isinstance(exc.__cause__, (FileNotFoundError, PermissionError)):
        exc = exc.__cause__  # missing or forbidden for as long as retrying it was worth it
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "forbidden"
    return "unreachable" if isinstance(exc, RetriesExhausted) or is_transient(exc) else None


class _ShardUnavailable(Exception):
    """A shard could not be fetched and ``on_missing_shard`` is "fail": ends the worker's epoch."""


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
    on_missing_shard: str = OnMissingShard.fail

    def __post_init__(self) -> None:
        """Raise ValueError for values the stream cannot work with."""
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        for name, low in _MINIMUM.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        modes = tuple(mode.value for mode in DataMode)
        if self.mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {self.mode!r}")
        shape = self.latent_shape
        if shape is not None and (len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"latent_shape must be three positive ints (C, h, w), got {shape!r}")
        if self.latent_dtype is not None and _dtype_kind(self.latent_dtype) != "f":
            raise ValueError(
                f"latent_dtype must be a float dtype such as 'float16', got {self.latent_dtype!r}"
            )
        policies = tuple(policy.value for policy in OnMissingShard)
        if self.on_missing_shard not in policies:
            raise ValueError(f"on_missing_shard must be one of {policies}, got {self.on_missing_shard!r}")
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
        if cfg.mode == DataMode.epoch:
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
                count, error, detail = 0, "", ""
                try:
                    samples = _tar_samples(url, lambda k, d=done: k not in d, size, opener.open_retrying)
                    for sample in samples:
                        if count == 0:  # this shard is open: open the next one to be read
                            later = (u for s, u in sources[i + 1 :] if not self._read_before(s))
                            opener.ahead(next(later, None))
                        yield source, count, sample
                        count += 1
                except _SHARD_ERRORS as exc:
                    error, detail = self._shard_error(url, exc)
                # A shard whose size is known ends quietly at that size; failing before it means it changed.
                if size is None or (error and count < size):
                    self.ends.append([source, count, error, url, detail])
        finally:
            opener.close()

    def _shard_error(self, url: str, exc: BaseException) -> tuple[str, str]:
        """(reason, detail) of a shard that failed: corrupt bytes are skipped; a shard that could not be
        fetched ends the epoch (``_ShardUnavailable``) unless ``on_missing_shard`` is "skip"."""
        reason, detail = unavailable_reason(exc), " ".join(f"{type(exc).__name__}: {exc}".split())
        if reason is None:
            return CORRUPT_SHARD, detail
        if self.cfg.on_missing_shard == OnMissingShard.fail:
            raise _ShardUnavailable(
                f"shard {url} is {reason} ({detail}); data.on_missing_shard=skip trains without such shards"
            )
        return MISSING_SHARD, f"{reason}: {detail}"

    def _read_before(self, source: int) -> bool:
        """Whether every sample of ``source`` was handed out (or found bad) before a resume."""
        size = self.sizes.get(source)
        return size is not None and self.done.get(source, _Ranges()).covers(size)

    def _item(self, parts: list[dict], kind: str, error: str = "") -> dict[str, Any]:
        """One message to the main process, carrying the reports gathered since the last one."""
        meta = {"epoch": self.epoch, "worker": self.worker, "kind": kind, "bad": self.bad, "ends": self.ends}
        meta["error"] = error
        self.bad, self.ends = [], []
        return {"parts": parts, "meta": meta}

    def items(self) -> Iterator[dict[str, Any]]:
        """Markers for the items delivered before a resume, then full batches, then the final item."""
        cfg = self.cfg
        for _ in range(self.skip):
            yield self._item([], "marker")
        shuffle_rng = _rng(_SAMPLE_SHUFFLE, cfg.seed, self.epoch, cfg.rank, self.worker)
        groups: dict[str, list[dict[str, Any]]] = {}
        try:
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
        except _ShardUnavailable as exc:  # the main process raises it, as one line
            yield self._item([], "failed", str(exc))
            return
        # Sorted, so the final item does not depend on which group happened to come first.
        yield self._item([collate(groups[g], g) for g in sorted(groups) if groups[g]], "final")
