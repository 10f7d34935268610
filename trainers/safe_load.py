"""Reading checkpoint files without ever running code from them.

A pickle can name any importable callable and call it while loading (`os.system`, ...), so a
checkpoint fetched from shared storage is as dangerous as a script. nuance writes what it owns without
pickles (tensors as safetensors, everything else as JSON) and reads every torch file with torch's
restricted unpickler (`weights_only=True`): tensors, containers, numbers, strings and a short allowlist.

DeepSpeed's own `load_checkpoint` and `zero_to_fp32` unpickle with `weights_only=False`. Before
DeepSpeed touches a checkpoint folder, `verify_pickles` opens each pickle-based file in it with the
restricted unpickler (storages memory-mapped, not read); the allowlist is the four small DeepSpeed
classes its optimizer states hold (found by saving ZeRO 0-3 checkpoints and asking
`torch.serialization.get_unsafe_globals_in_checkpoint`). Anything else is refused with one line naming
the file, and nothing of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
NOT_PICKLES = (".json", ".yaml", ".yml", ".safetensors", ".txt", ".py", ".png", ".jsonl")
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip format; a raw pickle (protocol >= 2)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects beyond tensors and plain data: it is not loaded."""


def _deepspeed_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its optimizer states (plain attribute holders / enums)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # pragma: no cover - deepspeed is a dependency; without it nothing needs them
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:  # torch puts the useful line after a paragraph of advice
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use")[0].strip()
    return lines[0] if lines else type(err).__name__


REFUSED = (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError)


def torch_load(path: str | Path, map_location="cpu", *, mmap: bool = False):
    """`torch.load` with the restricted unpickler; a refused file raises `UnsafeCheckpointError`.
    DeepSpeed (slow to import) is imported only for a file that names one of its classes."""
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            if "GLOBAL deepspeed." not in str(err):
                raise
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except REFUSED as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {_reason(err)} (checkpoint files may hold only tensors and plain "
            f"data; nuance never unpickles code)"
        ) from None


def is_pickle_based(path: Path) -> bool:
    """Every `.pt`/`.pth`/`.bin` file (what DeepSpeed's loaders open, whatever their content) and any
    other file that starts like a torch zip or a binary pickle."""
    if not path.is_file():
        return False
    if path.suffix.lower() in TORCH_SUFFIXES:
        return True
    return path.suffix.lower() not in NOT_PICKLES and any(_head(path).startswith(m) for m in PICKLE_MAGIC)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def verify_pickles(directory: str | Path) -> None:
    """Open every pickle-based file under `directory` with the restricted unpickler (tensors
    memory-mapped, so no weights are read); raise `UnsafeCheckpointError` naming the first bad one."""
    for path in sorted(Path(directory).rglob("*")):
        if is_pickle_based(path):
            torch_load(path, mmap=_head(path) == PICKLE_MAGIC[0])  # mmap needs the zip format
