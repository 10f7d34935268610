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
latent shape or dtype, bad metadata -- each skipped and counted per reason (``data.decode.BAD_REASONS``),
in samples: a shard cut short counts the samples it did not deliver, by the count its folder's
``manifest.json`` records (without one: the mean size of the shards known so far, at least 1).
Workers report each bad sample with the next batch they send; counts are kept in the state, so they
survive a resume without counting anything twice. ``max_bad_fraction`` turns too much bad data into a
``BadDataError``.

**Lost shards** are not bad data: a shard that is missing, forbidden or unreachable (after the retries of
``data.storage``, and after retrying a missing or forbidden one for ``NUANCE_S3_RETRY_SECONDS``) raises
``ShardUnavailableError``, one line naming the URL and the reason -- unless ``on_missing_shard="skip"``:
then its samples count as ``missing_shard`` bad data and each such shard is logged as a warning.

**Modules.** ``data.shards`` (shard URLs, opening and reading a shard, dealing shards to ranks),
``data.openahead`` (the next S3 shard opened early), ``data.position`` (the resume record) and
``data.stream_workers`` (what runs in the DataLoader workers); this module holds ``ShardStream``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from nuance.data.buckets import make_buckets
from nuance.data.config import DataMode, OnMissingShard
from nuance.data.decode import IMAGE_EXTENSIONS, MISSING_SHARD, DecodeSpec, concat_batches, split_batch
from nuance.data.manifest import shard_sample_counts
from nuance.data.position import _EpochRecord, _Ranges
from nuance.data.shards import expand_urls, iter_tar_samples, open_url, rank_shards
from nuance.data.stream_workers import _Settings, _ShardDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadDataError",
    "ShardStream",
    "ShardUnavailableError",
    "expand_urls",
    "iter_tar_samples",
    "open_url",
    "rank_shards",
]

STATE_FORMAT = "nuance-stream-v2"
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
logger = logging.getLogger(__name__)


class BadDataError(ValueError):
    """More bad samples than ``max_bad_fraction`` allows (raised by the stream, in the main process)."""


class ShardUnavailableError(RuntimeError):
    """A shard is missing, forbidden or unreachable and ``on_missing_shard`` is "fail" (one-line message
    naming the URL and the reason; raised by the stream, in the main process)."""


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
        on_missing_shard: str = OnMissingShard.fail,
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
            on_missing_shard=str(on_missing_shard),
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
        if mode == DataMode.epoch:
            self._check_shard_count()
        self._epoch = 0
        self._batches_in_epoch = 0
        self._samples_seen = 0
        self._bad_counts: Counter[str] = Counter()
        self._bad_shards: Counter[str] = Counter()
        self._shard_samples: dict[str, int] | None = None  # from the manifests, read at the first lost shard
        self._finished = [0, 0]  # samples in, and number of, shards read to their end: their typical size
        self._record = _EpochRecord(self.settings.workers)
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
        """Skipped samples per reason, including before a resume (``corrupt_shard`` / ``missing_shard``:
        the samples those shards did not deliver)."""
        return {reason: n for reason, n in sorted(self._bad_counts.items()) if n}

    @property
    def bad_shards(self) -> dict[str, int]:
        """Shards cut short (``corrupt_shard``) or skipped (``missing_shard``), including before a resume."""
        return {reason: n for reason, n in sorted(self._bad_shards.items()) if n}

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
            "bad_shards": self.bad_shards,
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
        if "position" not in state:
            raise ValueError("stream state needs a 'position' (as written by state_dict())")
        mine = self._order_values()
        same_workers = max(1, int(state.get("num_workers", 0))) == self.settings.workers
        changed = [
            f"{k}: {state[k]} -> {mine[k]}"
            for k in _ORDER_FIELDS
            if k in state and state[k] != mine[k] and not (k == "num_workers" and same_workers)
        ]
        lost = [k for k in _COVERAGE_FIELDS if k in state and state[k] != mine[k]]
        if self.settings.mode == DataMode.resampled and not same_workers:
            lost.append("num_workers")
        self._epoch, self._batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self._samples_seen = int(state.get("samples_seen", 0))
        self._bad_counts = Counter(counts)
        self._bad_shards = Counter(state.get("bad_shards", {}))
        self._record = _EpochRecord(self.settings.workers)
        if lost:
            consequence = f"the position within epoch {self._epoch} is dropped ({', '.join(lost)} changed)"
        else:
            self._record = _EpochRecord.from_state(state["position"], self.settings.workers, not changed)
            consequence = f"the order changes; each remaining sample of epoch {self._epoch} still comes once"
        if changed:
            settings = ", ".join(changed)
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
        try:
            while True:
                carry: dict[str, dict[str, Any]] = {}  # group -> samples of final items not yet batched
                for item in loader:
                    self._check_fresh(generation)
                    for batch, from_final in self._receive(item, carry):
                        self._check_fresh(generation)
                        self._hand_out(batch, from_final)
                        yield batch
                self._end_epoch()
        finally:
            # Stop the DataLoader workers now (error, or generator closed): left to the garbage collector,
            # their shutdown can run inside an import and wait out its timeouts (5 s per worker).
            del loader

    def _receive(self, item: dict[str, Any], carry: dict[str, dict[str, Any]]) -> list[tuple[dict, bool]]:
        """Account for one worker item; returns the batches it completes, each with "from a final item"."""
        meta = item["meta"]
        if meta["epoch"] != self._epoch:
            raise RuntimeError(
                f"internal error: worker epoch {meta['epoch']} does not match epoch {self._epoch}"
            )
        self._note_reports(meta)
        if meta["kind"] == "failed":
            raise ShardUnavailableError(f"rank {self.settings.rank}: {meta['error']}")
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
        for source, count, error, url, detail in meta["ends"]:
            # A shard failing short of its known size was damaged since it was read: a new failure.
            new_failure = source not in self._record.sizes or count < self._record.sizes[source]
            if error and new_failure:
                self._count_lost(url, count, error, detail)
            elif not error:
                self._finished = [self._finished[0] + count, self._finished[1] + 1]
            self._record.sizes.setdefault(source, count)

    def _count_lost(self, url: str, delivered: int, reason: str, detail: str) -> None:
        """Count the samples a failed shard did not deliver as bad (``reason``); warn for a skipped one."""
        if self._shard_samples is None:
            self._shard_samples = shard_sample_counts(self.urls)
        total = self._shard_samples.get(url)
        if total is None:  # no manifest: the shards in one, or else those read to their end, tell the size
            known = list(self._shard_samples.values())
            samples, shards = (sum(known), len(known)) if known else self._finished
            total = round(samples / shards) if shards else 0
        lost = max(1, total - delivered)
        self._bad_counts[reason] += lost
        self._bad_shards[reason] += 1
        if reason == MISSING_SHARD:
            logger.warning(
                "rank %d: skipped shard %s (%s): %d sample(s) counted as bad (data.on_missing_shard=skip)",
                self.settings.rank,
                url,
                detail,
                lost,
            )

    def _hand_out(self, batch: dict[str, Any], from_final: bool) -> None:
        """Record ``batch`` as handed to the trainer and strip the fields only the stream uses."""
        batch.pop("_group")
        for source, index, worker in batch.pop("_src").tolist():
            self._record.hand_out(source, index)
            if from_final:
                self._record.final_sample_out(worker)
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
