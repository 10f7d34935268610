"""Start (or join) Ray and run a recipe as a Ray Train TorchTrainer whose workers call `train_func`."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from nuance.orchestration.ray_env import init_ray, joined_worker_secrets, worker_env
from nuance.orchestration.recipe import RecipeError, recipe_to_dict, with_absolute_paths
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


class StorageUnreachable(ConnectionError):
    """Nothing answers at the S3 endpoint; reported to the user as one line."""


def check_s3_endpoint(timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at ``AWS_ENDPOINT_URL`` (S3 calls would retry
    for ``NUANCE_S3_RETRY_SECONDS``, default 120 s, and end in a long error)."""
    import socket
    from urllib.parse import urlsplit

    variable = next((v for v in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(v)), None)
    if variable is None:
        return  # AWS itself: reachability shows with the first request
    endpoint = os.environ[variable]
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise StorageUnreachable(f"cannot reach the S3 endpoint {endpoint} ({variable}): {reason}") from None


def check_data_source(recipe: Recipe, source: str) -> None:
    """The shards of ``data.source`` exist (local files, or the objects / prefix on S3)."""
    from nuance.data import storage
    from nuance.data.shards import expand_urls

    spec = recipe.data.source
    try:
        urls = expand_urls(spec)
    except ValueError as err:
        raise RecipeError(f"{source}: 'data.source' is '{spec}': {err}") from None
    remote = [u for u in urls if is_remote(u)] if recipe.data.on_missing_shard == "fail" else []
    for url in dict.fromkeys(remote[:1] + remote[-1:]):  # listed prefixes exist; named objects may not
        if not storage.exists(url):
            raise RecipeError(f"{source}: 'data.source' is '{spec}': shard {url} does not exist")


def check_run(recipe: Recipe, source: str = "recipe") -> Recipe:
    """Everything the driver can check before Ray starts: the Ray address answers, S3 answers, the data
    source exists and fits the recipe, a run with resume=never is new. Returns the recipe with absolute
    local paths (what the workers get)."""
    from nuance.orchestration.ray_env import check_ray_address

    # Cheapest first: these need no torch import, so a wrong address or endpoint is reported at once.
    check_ray_address()
    recipe = with_absolute_paths(recipe)
    if any(is_remote(p) for p in (recipe.data.source, recipe.cluster.storage_path)):
        check_s3_endpoint()
    url = storage_url(recipe)
    if recipe.train.resume == "never" and has_checkpoints(url):
        raise ValueError(
            f"run '{recipe.name}' already has checkpoints in {url}; set train.resume=auto to "
            f"continue it, or name=<new name> for a new run"
        )
    from nuance.data.builder import check_source, ensure_toy_dataset
    from nuance.trainers.models.presets import preset_conditioning

    if recipe.data.source == "toy":
        ensure_toy_dataset(recipe.data)  # once here, so the workers find it ready
    else:
        check_data_source(recipe, source)
    check_source(
        recipe.data, recipe.vae, recipe.text_encoder.path, preset_conditioning(recipe.model.name) == "text"
    )
    return recipe


def train(recipe: Recipe, *, checked: bool = False):
    """Run the recipe to completion; returns the Ray Train `Result`. ``checked``: ``check_run`` has
    already run (``recipe`` is its result)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if not checked:
        recipe = check_run(recipe)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from nuance.data import storage
    from nuance.trainers.entry import train_func

    run_dir, url = run_dir_for(recipe), storage_url(recipe)
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
            worker_runtime_env={"env_vars": worker_env(recipe, secrets=joined_worker_secrets())},
        ),
    )
    return trainer.fit()
