"""The one place a recipe's `data` slice becomes a stream of training batches."""

from __future__ import annotations

import os
from pathlib import Path

from nuance.data.config import DataConfig
from nuance.data.stream import ShardStream
from nuance.data.toy import write_toy_shards

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
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
) -> ShardStream:
    """The training stream of one rank. `latent_shape` (C, h, w) makes latent samples of any other
    shape bad data (counted, skipped) instead of a crash deep in the model."""
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
        random_crop=cfg.random_crop,
        bucketing=cfg.bucketing,
        mode=cfg.mode,
        latent_shape=latent_shape,
        require_caption=cfg.require_caption,
        max_bad_fraction=cfg.max_bad_fraction,
        on_missing_shard=cfg.on_missing_shard,
    )


def source_manifest(cfg: DataConfig) -> dict | None:
    """The shards' manifest.json when the source is a folder / prefix that has one."""
    import json

    from nuance.data import storage
    from nuance.data.manifest import manifest_url

    if cfg.source == "toy" or any(ch in cfg.source for ch in "{*?"):
        return None
    url = manifest_url(cfg.source.rstrip("/"))
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def check_source(cfg: DataConfig, vae: str, text_encoder: str, uses_text: bool) -> None:
    """Refuse latent shards made with other encoders than the recipe's (before any worker starts)."""
    from nuance.data.manifest import LATENTS_FORMAT, check_latents_match, encoder_identity

    manifest = source_manifest(cfg)
    if not manifest or manifest.get("format") != LATENTS_FORMAT:
        return
    if vae == "none":
        raise ValueError(f"data.source {cfg.source} holds VAE latents but the recipe has vae: none")
    check_latents_match(
        manifest,
        encoder_identity(vae),
        encoder_identity(text_encoder) if uses_text and "text_encoder" in manifest else None,
    )
