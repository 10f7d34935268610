"""`train_func(config)`: the only thing a Ray Train worker runs, and the only Ray boundary.

`config` is plain data: {"recipe": <resolved recipe dict>, "run": {"run_id", "run_dir", "storage_url",
"use_gpu"}}. The worker reads its `RunConfig` slice of the recipe; the Ray section stays with the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from nuance.trainers.config import RunConfig, config_from_dict
from nuance.trainers.context import RunContext
from nuance.trainers.engine import ensure_deepspeed_accelerator


def _loop(kind: str):
    """The loop module of a recipe kind (imported lazily: each pulls in only what it needs)."""
    import importlib

    module = {
        "pretrain": "pretrain",
        "progressive_distill": "progressive",
        "adversarial_distill": "adversarial",
        "lora": "lora",
    }[kind]
    return importlib.import_module(f"nuance.trainers.loops.{module}").run


OOM_PREFIX = "out of GPU memory"


def out_of_memory_hint(recipe: RunConfig) -> str:
    """One line for a CUDA out-of-memory error: what ran out, and the three knobs that fix it."""
    return (
        f"{OOM_PREFIX} at data.batch_size={recipe.data.batch_size} per GPU (model.name={recipe.model.name}, "
        f"engine.precision={recipe.engine.precision}): lower data.batch_size (engine.micro_batches keeps the "
        f"global batch), set model.gradient_checkpointing=true, or shard with engine.backend=deepspeed "
        f"engine.zero_stage=3 over several GPUs"
    )


def train_func(config: dict) -> None:
    ensure_deepspeed_accelerator()
    import ray.train

    recipe = config_from_dict(RunConfig, config["recipe"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if torch.cuda.is_available() and config["run"].get("use_gpu", False):
        device = torch.device("cuda", context.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"step_{metrics['step']:08d}" if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    restored = ray.train.get_checkpoint()
    local_copy = None
    resume_from = None
    if restored is not None:  # a restart after failure, or a resubmission of the same run
        local_copy = tempfile.mkdtemp(prefix="nuance-resume-")
        resume_from = restored.to_directory(local_copy)
    elif recipe.train.resume not in ("auto", "never"):
        resume_from = recipe.train.resume
    ctx = RunContext(
        rank=rank,
        world_size=world_size,
        device=device,
        run_dir=Path(config["run"]["run_dir"]),
        run_id=config["run"]["run_id"],
        storage_url=config["run"].get("storage_url", ""),
        resume_from=resume_from,
        report=report,
        recipe=config["recipe"],
    )
    with ctx.open_rank_file("workers", "jsonl") as f:  # who ran where: debugging and placement tests
        f.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "node_id": ray.get_runtime_context().get_node_id(),
                    "host": socket.gethostname(),
                    "resume_from": resume_from,
                    "time": time.time(),
                }
            )
            + "\n"
        )
    try:
        _loop(recipe.kind)(recipe, ctx)
    except torch.OutOfMemoryError as err:
        raise RuntimeError(out_of_memory_hint(recipe)) from err
    finally:
        if local_copy:
            shutil.rmtree(local_copy, ignore_errors=True)
