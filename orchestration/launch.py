"""Start (or join) Ray and run a recipe as a Ray Train TorchTrainer whose workers call `train_func`."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from nuance.orchestration.ray_env import init_ray, worker_env
from nuance.orchestration.recipe import recipe_to_dict, with_absolute_paths
from nuance.orchestration.schema import Recipe


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_url(recipe: Recipe) -> str:
    """Where the run's checkpoints go: `storage_path/name` (a local path or s3://)."""
    base = recipe.cluster.storage_path
    if is_remote(base):
        return f"{base.rstrip('/')}/{recipe.name}"
    return str(Path(os.path.expanduser(base)).resolve() / recipe.name)


def run_dir_for(recipe: Recipe) -> Path:
    """The local run directory (samples, metrics.jsonl, W&B files): the storage folder itself when it is
    local, else a local cache folder, since those files are written continuously."""
    if is_remote(recipe.cluster.storage_path):
        return Path(os.path.expanduser("~/.cache/nuance/runs")) / recipe.name
    return Path(storage_url(recipe))


def has_checkpoints(url: str) -> bool:
    from nuance.data import storage

    return bool(storage.list_urls(f"{url}/step_*/meta.json"))


def run_identity(recipe: Recipe, url: str) -> str:
    """The run's stable id (also its W&B id), created once and kept in run.json beside the checkpoints."""
    from nuance.data import storage

    path = f"{url}/run.json"
    if storage.exists(path):
        return json.loads(storage.read_bytes(path))["run_id"]
    run_id = f"{recipe.name}-{uuid.uuid4().hex[:8]}"
    storage.makedirs(url)
    storage.atomic_write_bytes(path, json.dumps({"run_id": run_id, "name": recipe.name}).encode())
    return run_id


def train(recipe: Recipe):
    """Run the recipe to completion; returns the Ray Train `Result`."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from nuance.data import storage
    from nuance.data.builder import check_source, ensure_toy_dataset
    from nuance.trainers.entry import train_func
    from nuance.trainers.models.presets import preset_conditioning

    recipe = with_absolute_paths(recipe)
    run_dir, url = run_dir_for(recipe), storage_url(recipe)
    if recipe.train.resume == "never" and has_checkpoints(url):
        raise ValueError(
            f"run '{recipe.name}' already has checkpoints in {url}; set train.resume=auto to "
            f"continue it, or name=<new name> for a new run"
        )
    if recipe.data.source == "toy":
        ensure_toy_dataset(recipe.data)  # once here, so the workers find it ready
    check_source(
        recipe.data, recipe.vae, recipe.text_encoder.path, preset_conditioning(recipe.model.name) == "text"
    )
    run_id = run_identity(recipe, url)
    filesystem, storage_root = storage.arrow_filesystem(url.rsplit("/", 1)[0])
    init_ray(recipe)
    cluster = recipe.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "recipe": recipe_to_dict(recipe),
            "run": {
                "run_id": run_id,
                "run_dir": str(run_dir),
                "storage_url": url,
                "use_gpu": cluster.use_gpu,
            },
        },
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cluster.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        run_config=RunConfig(
            name=recipe.name,
            storage_path=storage_root,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(recipe)},
        ),
    )
    return trainer.fit()
