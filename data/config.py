"""The data layer's slice of the recipe (`data:`), and the error type every config section raises.

Each layer owns its config dataclasses (this file, `nuance.trainers.config`); `nuance.orchestration.schema`
composes them into the recipe. A section checks its own values in `__post_init__` and raises
`ConfigError` with the key relative to the section; the recipe loader prefixes the section's name and the
file. Choices are `StrEnum`s: OmegaConf refuses any other value at load time and names the choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ConfigError(ValueError):
    """A bad value in one config section: `key` is relative to the section (e.g. 'batch_size')."""

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key, self.message = key, message


def check(ok: bool, key: str, message: str) -> None:
    """Raise `ConfigError(key, message)` unless `ok`."""
    if not ok:
        raise ConfigError(key, message)


class DataMode(StrEnum):
    epoch = "epoch"
    """Every sample once per epoch, in a seeded order; exact resume."""
    resampled = "resampled"
    """Shards drawn with replacement, seeded per worker."""


class OnMissingShard(StrEnum):
    fail = "fail"
    """Stop the run with one line naming the shard's URL and why it could not be read."""
    skip = "skip"
    """Skip the shard; its samples (from the manifest) count as bad data, with a warning per shard."""


@dataclass
class DataConfig:
    source: str = "toy"
    """'toy' (procedural shapes made on first run) or shards: dir, brace pattern, glob or s3:// prefix.
    Image shards (jpg/png/webp + txt/cls) or latent shards from `nuance data precompute`."""
    image_size: int = 32
    batch_size: int = 16
    """Micro batch per worker."""
    num_workers: int = 1
    """DataLoader worker processes per training worker."""
    shuffle_buffer: int = 256
    random_flip: bool = True
    random_crop: bool = True
    """Random (else center) crop after resizing the shorter side."""
    bucketing: bool = False
    """Aspect-ratio buckets of area ~image_size^2 (SDXL-style); a batch holds one bucket."""
    mode: DataMode = DataMode.epoch
    """epoch (every sample once per epoch, exact resume) | resampled (shards drawn with replacement)."""
    require_caption: bool = False
    """Count samples without a caption as bad data instead of training on an empty caption."""
    max_bad_fraction: float = 0.05
    """Fail the run when more than this fraction of samples is bad (corrupt, undecodable, wrong shape,
    in skipped shards); counted in samples, a lost shard by its manifest's sample count."""
    on_missing_shard: OnMissingShard = OnMissingShard.fail
    """A shard that is missing, forbidden (403) or unreachable once NUANCE_S3_RETRY_SECONDS are spent:
    fail (stop the run, naming the URL and the reason) | skip (count its samples as bad, warn)."""
    toy_samples: int = 2048
    cache_dir: str = "~/.cache/nuance"
    """Where the toy dataset is written."""
    log_keys: bool = False
    """Write the sample keys of every step to run_dir/keys/rankN.jsonl (audits of exactly-once data)."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(
            self.image_size >= 8 and self.image_size % 8 == 0,
            "image_size",
            "must be a multiple of 8 and >= 8",
        )
        check(self.toy_samples >= 1, "toy_samples", "must be >= 1")
        check(0 <= self.max_bad_fraction <= 1, "max_bad_fraction", "must be in [0, 1]")
