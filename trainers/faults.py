"""Fault injection for tests of fault tolerance: kill this worker at a named point, once.

Off unless `NUANCE_FAULT` is set, e.g. `NUANCE_FAULT=save:6:1:/tmp/marker` = SIGKILL rank 1 in the
middle of writing the step-6 checkpoint; the marker file makes it fire only once per run (the
restarted worker finds the marker and carries on).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def maybe_kill(point: str, step: int, rank: int) -> None:
    spec = os.environ.get("NUANCE_FAULT")
    if not spec:
        return
    want_point, want_step, want_rank, marker = spec.split(":", 3)
    if (want_point, int(want_step), int(want_rank)) != (point, step, rank):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: first one fires
    except FileExistsError:
        return
    os.close(fd)
    Path(marker).write_text(f"{point} step {step} rank {rank} pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
