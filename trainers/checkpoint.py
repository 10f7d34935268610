"""Checkpoint layout: everything needed to continue a run exactly, written by every rank.

Each rank writes its own files into its own directory; Ray Train merges the ranks' directories
into one checkpoint on the storage path:

    deepspeed/          the engine's model / optimizer / scheduler state (tag 'state'): DeepSpeed's
                        shards, or trainers.torch_engine's files (meta.json says which engine)
    ema/rank00000.safetensors  EMA tensors, its counters in the header (one file; one per rank under ZeRO-3)
    rng/rank00000.json  torch / numpy / python RNG states of that rank
    data/rank00000.json stream position of that rank
    meta.json           step, world size, ZeRO stage, engine, W&B run id (rank 0)
    recipe.yaml         the resolved recipe (rank 0)

Nothing is read with `weights_only=False`: nuance's own state is JSON and safetensors, the engines'
torch files go through torch's restricted unpickler, and every pickle-based file of a checkpoint is
verified that way before DeepSpeed (which unpickles freely) opens it (`trainers.safe_load`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nuance.trainers import faults
from nuance.trainers.ema import EMA, consolidate
from nuance.trainers.safe_load import torch_load, verify_pickles

FORMAT = "nuance-ckpt-v2"
PICKLED_FORMATS = ("nuance-ckpt-v1",)  # EMA and RNG state as pickles: refused (pre-1.0, no converter)
# Pipeline engine (trainers.pipeline): the whole model and its EMA, gathered from the stages at save time.
PIPELINE_FULL = {"model": "pipeline_full.safetensors", "ema": "pipeline_ema.safetensors"}


def _rank_file(directory: Path, kind: str, rank: int, suffix: str) -> Path:
    path = directory / kind / f"rank{rank:05d}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def rng_state() -> dict:
    """This process's RNG states as plain JSON data (generator states as lists of bytes / words)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached_gaussian],
        "python": [version, list(words), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_ema(state: dict, path: Path) -> None:
    """An `EMA.state_dict()` as safetensors: the shadow tensors, the rest as JSON in the header."""
    rest = {k: v for k, v in state.items() if k != "shadow"}
    save_file(state["shadow"], str(path), metadata={"nuance_ema": json.dumps(rest)})


def load_ema(path: Path) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = json.loads(f.metadata()["nuance_ema"])
        state["shadow"] = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    return state


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
        save_ema(ema.state_dict(), _rank_file(directory, "ema", rank, ".safetensors"))
    _rank_file(directory, "rng", rank, ".json").write_text(json.dumps(rng_state()))
    _rank_file(directory, "data", rank, ".json").write_text(json.dumps(data_state))
    if rank == 0:
        (directory / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        (directory / "recipe.yaml").write_text(recipe_yaml)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a nuance checkpoint (no meta.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") in PICKLED_FORMATS:
        raise ValueError(
            f"{directory}: checkpoint format {meta['format']} stores EMA and RNG state as pickles, which "
            f"nuance no longer loads (they can run code); retrain, or export it with the nuance that wrote it"
        )
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
    verify_pickles(directory)  # DeepSpeed unpickles with weights_only=False: nothing unsafe reaches it
    engine.load(str(directory / "deepspeed"))
    for name, other in (extra_engines or {}).items():
        other.load(str(directory / f"deepspeed_{name}"))
    if ema is not None:
        ema_rank = rank if ema.partitioned else 0
        ema_file = directory / "ema" / f"rank{ema_rank:05d}.safetensors"
        if ema_file.is_file():
            ema.load_state_dict(load_ema(ema_file))
    set_rng_state(json.loads((directory / "rng" / f"rank{rank:05d}.json").read_text()))
    data_state = json.loads((directory / "data" / f"rank{rank:05d}.json").read_text())
    return meta, data_state


def model_state_dict(directory: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) weights of the trained module, for sampling and export.

    With `use_ema` the EMA weights replace the trainable ones when the checkpoint has them.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    ds_dir = directory / "deepspeed"
    if meta.get("engine") == "pipeline":  # the stages' weights, gathered whole when it was saved
        state = load_file(ds_dir / "state" / PIPELINE_FULL["model"])
        ema_file = ds_dir / "state" / PIPELINE_FULL["ema"]
        return {**state, **(load_file(ema_file) if use_ema and ema_file.is_file() else {})}
    if meta["zero_stage"] == 3 and meta.get("engine", "deepspeed") == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_pickles(ds_dir)  # zero_to_fp32 unpickles with weights_only=False
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")
    else:
        state = torch_load(ds_dir / "state" / "mp_rank_00_model_states.pt")["module"]
    state = {k: v.float() for k, v in state.items()}
    ema_files = sorted((directory / "ema").glob("rank*.safetensors"))
    if use_ema and ema_files:
        shards = [load_ema(f) for f in ema_files]
        state.update(consolidate(shards))
    return state
