"""What every Ray worker gets: the forwarded environment, and the one way nuance starts or joins Ray.

Used by ``nuance train`` (``launch.train``: Ray Train workers), ``nuance submit`` (``jobs.runtime_env``:
the job's runtime env) and ``nuance data precompute`` (``precompute``: the encoding actors).
"""

from __future__ import annotations

import os

from nuance.orchestration.schema import Recipe

# Forwarded from the driver's (or submitter's) environment when set: S3 endpoint and credentials, nuance
# settings, W&B settings (secrets travel as environment variables, never in the recipe), offline flags.
FORWARDED_ENV_PREFIXES = ("AWS_", "NUANCE_")
FORWARDED_ENV = (
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_MODE",
    "WANDB_ENTITY",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


def worker_env(recipe: Recipe | None = None) -> dict[str, str]:
    """Environment for Ray workers: extension cache, the forwarded variables and, for a recipe that
    trains on CPUs, the DeepSpeed accelerator choice."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/nuance/torch_extensions")
        )
    }
    if recipe is not None and not recipe.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(
        {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_ENV_PREFIXES)}
    )
    return env


def init_ray(recipe: Recipe | None = None) -> None:
    """Join the cluster of ``RAY_ADDRESS`` or start an embedded Ray, unless Ray is already initialised.

    Inside a Ray job (``nuance submit``) a plain ``ray.init()``: the job's runtime env already has
    everything. Otherwise the workers get ``worker_env(recipe)``; an embedded cluster started for a recipe
    advertises at least the CPUs the recipe asks for (without one, the CPUs Ray detects).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        ray.init()  # inside a Ray job (nuance submit): the job's runtime env already has everything
        return
    runtime_env = {"env_vars": worker_env(recipe)}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    if recipe is None:
        ray.init(runtime_env=runtime_env, log_to_driver=True)  # Ray counts the machine's CPUs itself
        return
    cluster = recipe.cluster
    needed = int(round(cluster.num_workers * cluster.cpus_per_worker + 0.49))
    # An embedded cluster advertises at least the CPUs the recipe asks for: Ray CPUs are a scheduling
    # unit, and a 2-worker run must start on a 1- or 2-core laptop.
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), runtime_env=runtime_env, log_to_driver=True)
