"""The recipe: the trainers' `RunConfig` (model, objective, data, engine, ...) plus `cluster:`.

Every YAML recipe is merged onto these dataclasses (OmegaConf structured config), so unknown keys, wrong
types and values outside a choice fail at load time. Each layer owns its sections
(`nuance.data.config`, `nuance.trainers.config`); this module owns only the Ray section and the
composition. Components receive only their own slice (`recipe.model`, `recipe.engine`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from nuance.data.config import check
from nuance.trainers.config import RunConfig


class PlacementStrategy(StrEnum):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    storage_path: str = "./outputs"
    """Where checkpoints, samples and logs of every run go (local path or s3://; run dir = storage/name)."""
    max_failures: int = 0
    """Worker-group restarts Ray may do before the run fails (each resumes from the last checkpoint)."""
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK
    """Ray placement of workers: PACK | SPREAD (one per node if possible) | STRICT_PACK | STRICT_SPREAD."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        check(
            not self.use_gpu or self.gpus_per_worker > 0,
            "gpus_per_worker",
            "must be > 0 when cluster.use_gpu=true",
        )


@dataclass
class Recipe(RunConfig):
    """One complete run: what the workers train (`RunConfig`) and where Ray runs them (`cluster`)."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
