"""Streaming WebDataset pipeline consumed by the trainer: shards -> shuffled, decoded, batched samples.

Order of one epoch ``e`` on rank ``r`` (everything seeded, so a run is reproducible given
``(seed, rank, world_size, num_workers)``):

1. all shards are shuffled with a seed derived from ``(seed, e)`` -- identical on every rank;
2. the shard at position ``i`` of that order goes to rank ``i % world_size`` (ranks are disjoint);
3. within a rank, its ``j``-th shard goes to DataLoader worker ``j % num_workers``;
4. each worker streams its shards, shuffles samples in a buffer seeded by ``(seed, e, rank, worker)``,
   decodes them (optional seeded horizontal flip) and emits full batches, dropping its last partial one;
5. the DataLoader interleaves the workers' batches round-robin (``in_order=True``).

The stream is infinite; epochs follow one another. Workers are persistent: each worker's copy of the
dataset counts the epochs it has started, which is how the epoch number reaches it without respawning;
every batch carries that epoch back and the main process checks it.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

# Distinct first entries keep the RNG streams of different purposes independent.
_SHARD_ORDER, _SAMPLE_SHUFFLE, _FLIP = 0, 1, 2
# WebDataset convention: the key is the member path up to the first dot of its basename.
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
# Smallest allowed value of each integer setting (rank and world_size are checked separately).
_MINIMUM = {"batch_size": 1, "image_size": 1, "seed": 0, "num_workers": 0, "shuffle_buffer": 0}
# Fields of state_dict() that decide the order of batches; a mismatch on resume breaks exact continuation.
_ORDER_FIELDS = ("seed", "rank", "world_size", "num_workers", "batch_size", "num_shards")


def _local_path(url: str) -> str | None:
    """The local filesystem path behind ``url`` (plain path or ``file://`` URL), else None."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else url


def _expand_one(url: str, spec: Any) -> list[str]:
    """Expand one brace-free item: a local directory -> its ``*.tar`` (sorted); a local file is checked."""
    local = _local_path(url)
    if local is None:  # remote URL: it can only be checked by opening it, which happens in the workers
        return [url]
    if os.path.isdir(local):
        prefix = url[: len(url) - len(local)]  # keep "file://" when the directory was given as a URL
        names = sorted(n for n in os.listdir(local) if n.endswith(".tar"))
        return [prefix + os.path.join(local, n) for n in names]
    if not os.path.isfile(local):
        raise ValueError(f"shard {url!r} from spec {spec!r} does not exist")
    return [url]


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    ``spec`` is a brace pattern (``data/shard-{000000..000009}.tar``), a local directory (its ``*.tar``
    files, sorted by name), an fsspec URL (``file:///...``, ``s3://...``) or a list of any of these.
    Local shards must exist; remote ones are checked when opened.
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
    """Open a shard for binary reading: a local path, or any URL fsspec understands.

    Every shard is opened here, inside the process that reads it, so that non-fork-safe filesystem
    clients (s3fs) are created in the DataLoader workers.
    """
    local = _local_path(url)
    if local is not None:
        return open(local, "rb")
    return fsspec.open(url, "rb").open()


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard as dicts ``{"__key__", "__url__", ext: bytes, ...}``.

    Members of one sample must be consecutive (as WebDataset writers produce them).
    """
    sample: dict[str, Any] | None = None
    try:
        with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                match = _MEMBER_RE.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise ValueError(f"duplicate member {member.name!r} in shard {url}")
                sample[ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as exc:
        raise RuntimeError(f"failed to read shard {url}: {exc}") from exc
    if sample is not None:
        yield sample


def _rng(*entropy: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative ints (stable across processes and runs)."""
    return np.random.default_rng(list(entropy))


def rank_shards(urls: Sequence[str], *, seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` reads in epoch ``epoch``, in reading order.

    The shard order is shuffled per epoch with the same seed on every rank, then dealt round-robin.
    """
    order = _rng(_SHARD_ORDER, seed, epoch).permutation(len(urls))
    return [urls[i] for i in order[rank::world_size]]


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


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Decode image bytes to RGB uint8 (H, W, 3), resized (shorter side) and center-cropped to square."""
    with Image.open(io.BytesIO(data)) as img:
        image = img.convert("RGB")
    width, height = image.size
    if (width, height) != (image_size, image_size):
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


def _decode_sample(sample: dict[str, Any], image_size: int, flip: bool) -> dict[str, Any]:
    """Raw tar sample -> ``{"pixels": (3,H,W) float32 in [-1,1], "caption", "class_label", "key"}``."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(
            f"sample {sample['__key__']!r} in {sample['__url__']} has no image (fields {fields})"
        )
    pixels = decode_image(sample[ext], image_size)
    if flip:
        pixels = pixels[:, ::-1]
    pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0
    caption = sample["txt"].decode("utf-8").strip() if "txt" in sample else ""
    label = int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else -1
    return {"pixels": pixels, "caption": caption, "class_label": label, "key": sample["__key__"]}


def _collate(samples: list[dict[str, Any]], epoch: int) -> dict[str, Any]:
    """Stack decoded samples into one batch; ``epoch`` rides along for the main process's check."""
    return {
        "pixels": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
        "caption": [s["caption"] for s in samples],
        "class_label": torch.tensor([s["class_label"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "epoch": epoch,
    }


@dataclass(frozen=True)
class _Settings:
    """The arguments that fix one rank's batch order; small and picklable, validated on creation."""

    rank: int
    world_size: int
    batch_size: int
    image_size: int
    seed: int
    num_workers: int
    shuffle_buffer: int
    random_flip: bool

    def __post_init__(self) -> None:
        """Raise ValueError for values the stream cannot work with."""
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        for name, low in _MINIMUM.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


class _ShardDataset(IterableDataset):
    """One rank's batches, one epoch per ``iter()`` call, starting at ``start_epoch``.

    Holds only URLs and ints, so it pickles cheaply into workers; files are opened while iterating.
    """

    def __init__(self, urls: list[str], settings: _Settings, start_epoch: int) -> None:
        self.urls, self.settings, self.start_epoch = urls, settings, start_epoch
        self._epochs_started = 0  # per process: each (persistent) worker counts its own iter() calls

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Start the next epoch (not a generator function, so the counter moves on ``iter()``)."""
        epoch = self.start_epoch + self._epochs_started
        self._epochs_started += 1
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._epoch_batches(epoch, worker, num_workers)

    def _epoch_batches(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """The batches worker ``worker`` produces in ``epoch``; its last partial batch is dropped."""
        cfg = self.settings
        shards = rank_shards(self.urls, seed=cfg.seed, epoch=epoch, rank=cfg.rank, world_size=cfg.world_size)
        samples = (sample for url in shards[worker::num_workers] for sample in iter_tar_samples(url))
        shuffle_rng = _rng(_SAMPLE_SHUFFLE, cfg.seed, epoch, cfg.rank, worker)
        flip_rng = _rng(_FLIP, cfg.seed, epoch, cfg.rank, worker)
        batch: list[dict[str, Any]] = []
        for sample in _buffer_shuffle(samples, cfg.shuffle_buffer, shuffle_rng):
            flip = cfg.random_flip and bool(flip_rng.integers(2))
            batch.append(_decode_sample(sample, cfg.image_size, flip))
            if len(batch) == cfg.batch_size:
                yield _collate(batch, epoch)
                batch = []


class ShardStream:
    """Infinite, reproducible, resumable stream of training batches for one rank.

    Each batch is ``{"pixels": (B,3,H,W) float32 in [-1,1], "caption": list[str],
    "class_label": LongTensor (B,) (-1 when missing), "key": list[str]}``.

    ``state_dict()`` records the position in batches actually handed out; a fresh stream given it via
    ``load_state_dict()`` yields exactly the batches the original would have yielded next (it re-reads
    the current epoch up to that point). Only the most recent ``iter()`` of a stream is valid.
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
    ) -> None:
        self.settings = _Settings(
            rank, world_size, batch_size, image_size, seed, num_workers, shuffle_buffer, random_flip
        )
        self.urls = expand_urls(urls)
        if len(self.urls) < world_size:
            raise ValueError(f"need at least world_size shards: got {len(self.urls)} for {world_size=}")
        shards_per_rank = len(range(rank, len(self.urls), world_size))
        if num_workers > shards_per_rank:
            warnings.warn(
                f"num_workers={num_workers} > {shards_per_rank} shard(s) per rank: "
                f"{num_workers - shards_per_rank} worker(s) will idle",
                stacklevel=2,
            )
        self._epoch = 0
        self._batches_in_epoch = 0
        self._samples_seen = 0
        self._generation = 0  # bumped by iter()/load_state_dict(); older iterators then refuse to continue

    @property
    def epoch(self) -> int:
        """Epoch of the most recently handed-out batch (0-based)."""
        return self._epoch

    @property
    def samples_seen(self) -> int:
        """Samples handed to the trainer so far, over all epochs (including before a resume)."""
        return self._samples_seen

    def state_dict(self) -> dict[str, int]:
        """Position in the stream: the batches handed out so far, plus the settings that fix their order."""
        return {
            "epoch": self._epoch,
            "batches_in_epoch": self._batches_in_epoch,
            "samples_seen": self._samples_seen,
            **{name: getattr(self.settings, name) for name in _ORDER_FIELDS if name != "num_shards"},
            "num_shards": len(self.urls),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (from ``state_dict()``) at the next ``iter()``.

        Settings that differ from the saved ones are allowed (e.g. resuming on another cluster size) but
        warned about, since the continuation is then no longer exact.
        """
        for name in ("epoch", "batches_in_epoch"):
            if not isinstance(state.get(name), int) or state[name] < 0:
                raise ValueError(f"stream state needs a non-negative int {name!r}, got {state.get(name)!r}")
        mine = self.state_dict()
        changed = [
            f"{k}: {state[k]} -> {mine[k]}" for k in _ORDER_FIELDS if k in state and state[k] != mine[k]
        ]
        if changed:
            warnings.warn(
                f"resuming the data stream with changed settings ({', '.join(changed)}); "
                "the batch order will not continue exactly",
                stacklevel=2,
            )
        self._epoch = state["epoch"]
        self._batches_in_epoch = state["batches_in_epoch"]
        self._samples_seen = int(state.get("samples_seen", 0))
        self._generation += 1

    def _loader(self, start_epoch: int) -> DataLoader:
        """A DataLoader whose k-th ``iter()`` yields the batches of epoch ``start_epoch + k``."""
        dataset = _ShardDataset(self.urls, self.settings, start_epoch)
        workers = self.settings.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            in_order=True,
            # DataLoader draws its workers' base seed from this generator; without one it would draw
            # from the global torch RNG, shifting the trainer's noise stream after a resume.
            generator=torch.Generator().manual_seed(self.settings.seed),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield batches forever, starting at the current position."""
        self._generation += 1
        return self._batches(self._generation)

    def _batches(self, generation: int) -> Iterator[dict[str, Any]]:
        """The generator behind ``__iter__``; skips the batches of the current epoch already handed out."""
        loader = self._loader(self._epoch)
        skip = self._batches_in_epoch
        while True:
            produced = 0
            for batch in loader:
                if generation != self._generation:
                    raise RuntimeError(
                        "this ShardStream was re-iterated or re-loaded; the old iterator is stale"
                    )
                if batch.pop("epoch") != self._epoch:
                    raise RuntimeError(f"internal error: worker epoch does not match epoch {self._epoch}")
                produced += 1
                if produced <= skip:
                    continue
                self._batches_in_epoch += 1
                self._samples_seen += len(batch["key"])
                yield batch
            if produced == 0:
                raise ValueError(
                    f"epoch {self._epoch} produced no batch on rank {self.settings.rank}: each DataLoader "
                    f"worker needs at least batch_size={self.settings.batch_size} samples per epoch"
                )
            if skip > produced:
                warnings.warn(
                    f"resume position {skip} is past the end of epoch {self._epoch} "
                    f"({produced} batches); continuing with the next epoch",
                    stacklevel=2,
                )
            skip = 0
            self._epoch += 1
            self._batches_in_epoch = 0
