"""What every Ray worker gets: the forwarded environment, and the one way nuance starts or joins Ray.

Used by ``nuance train`` (``launch.train``: Ray Train workers), ``nuance submit`` (``jobs.runtime_env``:
the job's runtime env) and ``nuance data precompute`` (``precompute``: the encoding actors).
"""

from __future__ import annotations

import os
import socket
import sys

from nuance.orchestration.schema import Recipe

# Forwarded from the driver's (or submitter's) environment when set: S3 endpoint and region, nuance
# settings, W&B settings, offline flags. Secrets among them (`is_secret`: WANDB_API_KEY, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ...) are left out: Ray writes a runtime env to its logs
# (`runtime_env_agent.log`) and the Jobs API returns it to anyone who can list jobs. Workers of an embedded
# cluster inherit them from the driver (Ray's raylet, and so every worker, inherits the environment of
# the process that starts it); a cluster's nodes provide their own (a Kubernetes Secret, the node's
# environment), unless the user asks for them to be shipped (`NUANCE_FORWARD_SECRETS=1`, `nuance submit
# --forward-secrets`).
FORWARDED_ENV_PREFIXES = ("AWS_", "NUANCE_")
FORWARDED_ENV = (
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_MODE",
    "WANDB_ENTITY",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
FORWARD_SECRETS_ENV = "NUANCE_FORWARD_SECRETS"


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached; reported to the user as one line."""


def is_secret(name: str) -> bool:
    """Whether an environment variable holds a credential (its name says KEY, SECRET, TOKEN, ...)."""
    return any(word in name.upper() for word in SECRET_WORDS)


def _forwarded(name: str) -> bool:
    return name in FORWARDED_ENV or name.startswith(FORWARDED_ENV_PREFIXES)


def secrets_in_env() -> list[str]:
    """Names of the forwardable credentials set in this process' environment."""
    return sorted(k for k, v in os.environ.items() if v and _forwarded(k) and is_secret(k))


def forward_secrets_requested() -> bool:
    return os.environ.get(FORWARD_SECRETS_ENV, "").strip().lower() in ("1", "true", "yes")


def worker_env(recipe: Recipe | None = None, *, secrets: bool = False) -> dict[str, str]:
    """Environment for Ray workers: extension cache, the forwarded variables and, for a recipe that
    trains on CPUs, the DeepSpeed accelerator choice. Credentials only with ``secrets=True``."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/nuance/torch_extensions")
        )
    }
    if recipe is not None and not recipe.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update({k: v for k, v in os.environ.items() if _forwarded(k) and (secrets or not is_secret(k))})
    return env


def joined_worker_secrets() -> bool:
    """Whether workers get the credentials in their runtime env: only when the user asked for it, and
    only on a cluster joined through ``RAY_ADDRESS`` or inside a job (an embedded one inherits them)."""
    joined = bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    return joined and forward_secrets_requested()


def warn_secrets(where: str) -> None:
    """One line on stderr when credentials are about to be shipped to ``where``."""
    names = secrets_in_env()
    if names:
        print(
            f"nuance: warning: shipping {', '.join(names)} in the runtime env of {where}: Ray writes it to "
            "its logs and the Jobs API shows it to anyone who can list jobs",
            file=sys.stderr,
            flush=True,
        )


def note_unshipped_secrets(where: str) -> None:
    """One line on stderr when credentials set here stay here: the cluster must provide its own."""
    names = secrets_in_env()
    if names:
        print(
            f"nuance: note: {', '.join(names)} stay on this machine; the nodes of {where} must provide "
            f"their own (Kubernetes Secret, node environment) or set {FORWARD_SECRETS_ENV}=1 to ship them",
            file=sys.stderr,
            flush=True,
        )


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a Ray address (``ray.init`` would retry
    for minutes, printing GCS warnings). ``auto`` / ``local`` are left to Ray."""
    target = address.split("://", 1)[-1].rstrip("/")
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ClusterError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {reason}") from None


def check_ray_address() -> None:
    """``check_reachable`` for ``RAY_ADDRESS`` when it is set (and this is not a job's own driver)."""
    address = os.environ.get("RAY_ADDRESS")
    if address and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        check_reachable(address)


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
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ship = joined_worker_secrets()
        if ship:
            warn_secrets(f"the jobs on {address}")
        else:
            note_unshipped_secrets(f"the cluster at {address}")
        runtime_env = {"env_vars": worker_env(recipe, secrets=ship)}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # An embedded cluster: its raylet and workers inherit this process' environment, credentials included.
    runtime_env = {"env_vars": worker_env(recipe)}
    if recipe is None:
        ray.init(runtime_env=runtime_env, log_to_driver=True)  # Ray counts the machine's CPUs itself
        return
    cluster = recipe.cluster
    needed = int(round(cluster.num_workers * cluster.cpus_per_worker + 0.49))
    # An embedded cluster advertises at least the CPUs the recipe asks for: Ray CPUs are a scheduling
    # unit, and a 2-worker run must start on a 1- or 2-core laptop.
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), runtime_env=runtime_env, log_to_driver=True)
