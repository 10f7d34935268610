"""Fault injection for tests of fault tolerance: kill this worker at a named point, once.

Off unless `NUANCE_FAULT` is set, e.g. `NUANCE_FAULT=save:6:1:/tmp/marker` = SIGKILL rank 1 in the
middle of writing the step-6 checkpoint; the marker file makes it fire only once per run (the
restarted worker finds the marker and carries on). `oom:STEP:RANK:marker` raises CUDA's
out-of-memory error after that optimizer step instead (the CLI's one-line hint, testable on CPU).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _fires(point: str, step: int, rank: int) -> bool:
    spec = os.environ.get("NUANCE_FAULT")
    if not spec:
        return False
    want_point, want_step, want_rank, marker = spec.split(":", 3)
    if (want_point, int(want_step), int(want_rank)) != (point, step, rank):
        return False
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: first one fires
    except FileExistsError:
        return False
    os.close(fd)
    Path(marker).write_text(f"{point} step {step} rank {rank} pid {os.getpid()}\n")
    return True


def maybe_kill(point: str, step: int, rank: int) -> None:
    if _fires(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_out_of_memory(step: int, rank: int) -> None:
    if _fires("oom", step, rank):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by NUANCE_FAULT at step {step})")
