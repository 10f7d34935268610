"""What a training loop knows about where it runs: rank, device, run directory, how to report."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class RunContext:
    rank: int
    world_size: int
    device: torch.device
    run_dir: Path
    """Local directory for samples, metrics.jsonl and the W&B run folder (rank 0 writes)."""
    run_id: str
    """Stable id of the run across restarts (the W&B run id)."""
    storage_url: str = ""
    """Where checkpoints go (`storage_path/name`, local or s3://): referenced in W&B."""
    resume_from: str | None = None
    """A local checkpoint directory to continue from."""
    report: Callable[[dict, str | None], None] = field(default=lambda metrics, ckpt_dir: None)
    """report(metrics, checkpoint_dir or None): every rank calls it at the same points."""
    recipe: dict = field(default_factory=dict)
    """The whole recipe as submitted (cluster section included), for the W&B run's config."""

    def open_rank_file(self, kind: str, suffix: str):
        """Append-mode file `run_dir/<kind>/rank<N>.<suffix>` of this rank (the caller closes it)."""
        path = self.run_dir / kind / f"rank{self.rank:05d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a")  # noqa: SIM115

    def log(self, message: str) -> None:
        """A progress line on rank 0. Written to the real stdout: Ray Train's print patch would log it
        a second time whenever W&B has wrapped sys.stdout."""
        if self.rank == 0:
            sys.__stdout__.write(f"[nuance] {message}\n")
            sys.__stdout__.flush()


def seed_everything(seed: int, rank: int) -> None:
    """Different noise per rank (else data-parallel ranks would draw identical noise), same weights init."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def reseed_for_rank(seed: int, rank: int) -> None:
    torch.manual_seed(seed * 1000 + rank + 1)
