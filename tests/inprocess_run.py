"""A tiny pretraining run in this process (no Ray): the recipe kind's loop with a `RunContext` whose
`report` copies each checkpoint to `<tmp>/ckpts/step_N`, as Ray Train would to the storage path.
One rank, the torch engine (no process group), a 2-layer DiT on the toy data: a few seconds a run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nuance.orchestration.recipe import load_recipe, recipe_to_dict
from nuance.trainers.config import RunConfig, config_from_dict
from nuance.trainers.context import RunContext
from nuance.trainers.entry import _loop

RUN_ID = "inproc-0001"


def run_in_process(tmp_path: Path, toy_cache: Path, *overrides: str, resume_from: Path | None = None) -> dict:
    """Train the tiny recipe (class-conditional `dit_debug`, batch 8, ckpt every 2 steps, decay over 6)
    in this process; returns the loop's last metrics."""
    recipe, _ = load_recipe(
        "quickstart",
        [
            "name=inproc",
            f"cluster.storage_path={tmp_path}",
            f"data.cache_dir={toy_cache}",
            "data.num_workers=0",
            "data.batch_size=8",
            "model.name=dit_debug",
            "model.num_classes=12",
            "sample.classes=[0]",
            "sample.steps=2",
            "sample.num_per_condition=1",
            "sample.every=0",
            "sample.eval_per_condition=0",
            "engine.backend=ddp",
            "cluster.num_workers=1",
            "train.log_every=1",
            "train.ckpt_every=2",
            "optim.decay_steps=6",
            *overrides,
        ],
    )
    config = recipe_to_dict(recipe)

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            shutil.copytree(
                checkpoint_dir, tmp_path / "ckpts" / f"step_{metrics['step']:08d}", dirs_exist_ok=True
            )

    ctx = RunContext(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        run_dir=tmp_path / "run",
        run_id=RUN_ID,
        resume_from=str(resume_from) if resume_from else None,
        report=report,
        recipe=config,
    )
    run_config = config_from_dict(RunConfig, config)
    return _loop(run_config.kind)(run_config, ctx)


def read_jsonl_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
