"""The one place a recipe's `data` slice becomes a stream of training batches."""

from __future__ import annotations

import os
from pathlib import Path

from data.stream import ShardStream
from data.toy import write_toy_shards
from orchestration.schema import DataConfig

TOY_SAMPLES_PER_SHARD = 128


def toy_dataset_dir(cfg: DataConfig) -> Path:
    root = Path(os.path.expanduser(cfg.cache_dir))
    return root / f"toy-shapes-{cfg.image_size}px-{cfg.toy_samples}"


def ensure_toy_dataset(cfg: DataConfig) -> list[str]:
    """Write the quickstart's procedural shapes dataset on first use (idempotent, safe to race)."""
    per_shard = min(TOY_SAMPLES_PER_SHARD, max(1, cfg.toy_samples // 8))
    return write_toy_shards(
        toy_dataset_dir(cfg),
        num_samples=cfg.toy_samples,
        image_size=cfg.image_size,
        samples_per_shard=per_shard,
        seed=0,
    )


def build_stream(
    cfg: DataConfig, *, rank: int, world_size: int, seed: int, num_workers: int | None = None
) -> ShardStream:
    urls = ensure_toy_dataset(cfg) if cfg.source == "toy" else cfg.source
    return ShardStream(
        urls,
        rank=rank,
        world_size=world_size,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        seed=seed,
        num_workers=cfg.num_workers if num_workers is None else num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        random_flip=cfg.random_flip,
    )
