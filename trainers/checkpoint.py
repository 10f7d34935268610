"""Checkpoint layout: everything needed to continue a run exactly, written by every rank.

Each rank writes its own files into its own directory; Ray Train merges the ranks' directories
into one checkpoint on the storage path:

    deepspeed/          the engine's model / optimizer / scheduler state (tag 'state'): DeepSpeed's
                        shards, or trainers.torch_engine's files (meta.json says which engine)
    ema/rank00000.pt    EMA (one file; one per rank under ZeRO-3)
    rng/rank00000.pt    torch / numpy / python RNG states of that rank
    data/rank00000.json stream position of that rank
    meta.json           step, world size, ZeRO stage, engine, W&B run id (rank 0)
    recipe.yaml         the resolved recipe (rank 0)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from nuance.trainers import faults
from nuance.trainers.ema import EMA, consolidate

FORMAT = "nuance-ckpt-v1"


def _rank_file(directory: Path, kind: str, rank: int, suffix: str) -> Path:
    path = directory / kind / f"rank{rank:05d}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    directory: str | Path,
    *,
    engine,
    extra_engines: dict | None = None,
    ema: EMA | None,
    data_state: dict,
    meta: dict,
    recipe_yaml: str,
    rank: int,
) -> None:
    """Write this rank's part of a checkpoint into `directory`."""
    directory = Path(directory)
    engine.save(str(directory / "deepspeed"))
    for name, other in (extra_engines or {}).items():  # e.g. a GAN discriminator: its own DeepSpeed state
        other.save(str(directory / f"deepspeed_{name}"))
    faults.maybe_kill("save", meta["step"], rank)  # tests: a worker dies halfway through a save
    if ema is not None and (ema.partitioned or rank == 0):
        torch.save(ema.state_dict(), _rank_file(directory, "ema", rank, ".pt"))
    torch.save(rng_state(), _rank_file(directory, "rng", rank, ".pt"))
    _rank_file(directory, "data", rank, ".json").write_text(json.dumps(data_state))
    if rank == 0:
        (directory / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        (directory / "recipe.yaml").write_text(recipe_yaml)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a nuance checkpoint (no meta.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load(
    directory: str | Path,
    *,
    engine,
    ema: EMA | None,
    rank: int,
    world_size: int,
    extra_engines: dict | None = None,
) -> tuple[dict, dict]:
    """Restore this rank's state; returns (meta, data_state)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {directory} was written by {meta['world_size']} workers; this run has "
            f"{world_size}: set cluster.num_workers={meta['world_size']} to resume it"
        )
    written_by = meta.get("engine", "deepspeed")
    if written_by != engine.backend:
        raise ValueError(
            f"checkpoint {directory} was written by the {written_by} engine and this run uses "
            f"{engine.backend}: set engine.backend={written_by} to resume it"
        )
    engine.load(str(directory / "deepspeed"))
    for name, other in (extra_engines or {}).items():
        other.load(str(directory / f"deepspeed_{name}"))
    if ema is not None:
        ema_rank = rank if ema.partitioned else 0
        ema_file = directory / "ema" / f"rank{ema_rank:05d}.pt"
        if ema_file.is_file():
            ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=False))
    set_rng_state(torch.load(directory / "rng" / f"rank{rank:05d}.pt", weights_only=False))
    data_state = json.loads((directory / "data" / f"rank{rank:05d}.json").read_text())
    return meta, data_state


def model_state_dict(directory: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) weights of the trained module, for sampling and export.

    With `use_ema` the EMA weights replace the trainable ones when the checkpoint has them.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    ds_dir = directory / "deepspeed"
    if meta["zero_stage"] == 3 and meta.get("engine", "deepspeed") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")
    else:
        state = torch.load(
            ds_dir / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
    state = {k: v.float() for k, v in state.items()}
    ema_files = sorted((directory / "ema").glob("rank*.pt"))
    if use_ema and ema_files:
        shards = [torch.load(f, map_location="cpu", weights_only=False) for f in ema_files]
        state.update(consolidate(shards))
    return state
