"""Submit recipes to a running Ray cluster through Ray's Jobs API, and manage the jobs.

The job ships the resolved recipe, the submitter's non-secret settings (S3 endpoint, nuance and W&B
settings: ``ray_env.worker_env``) and nuance's own packages, so the cluster runs exactly the code version
that was submitted. Credentials stay on the submitter's machine: Ray logs a job's runtime env and the
Jobs API returns it to anyone who can list jobs, so the cluster's nodes provide them (a Kubernetes
Secret, the node's environment); ``forward_secrets=True`` (``--forward-secrets``) ships them anyway,
with a warning. The cluster must have nuance's dependencies installed (the image
of `k8s/` does); `--pip` adds packages to the job's runtime environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nuance.orchestration.recipe import recipe_to_yaml
from nuance.orchestration.schema import Recipe

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """A cluster or job problem, reported to the user as one line."""


def client(address: str | None):
    """A JobSubmissionClient for `address` (or RAY_ADDRESS / the dashboard at 127.0.0.1:8265)."""
    from ray.job_submission import JobSubmissionClient

    address = (
        address
        or os.environ.get("RAY_JOBS_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or "http://127.0.0.1:8265"
    )
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, ValueError(bad scheme), ... from Ray
        raise JobsError(f"cannot reach the Ray cluster at {address}: {str(err).splitlines()[0]}") from err


def ship_package(dest: Path) -> str:
    """Copy nuance's import package (its four layer folders) to `dest/nuance` for `py_modules`.

    The repo keeps the folders at its top level and the install maps them under `nuance`, so no folder
    named `nuance` exists on disk to ship: this builds one, the same tree a wheel holds."""
    import nuance.data
    import nuance.orchestration
    import nuance.recipes
    import nuance.trainers

    root = dest / "nuance"
    for package in (nuance.orchestration, nuance.trainers, nuance.data, nuance.recipes):
        source = Path(list(package.__path__)[0])
        shutil.copytree(
            source,
            root / package.__name__.split(".")[-1],
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return str(root)


def runtime_env(recipe: Recipe, recipe_dir: str, pip: list[str], forward_secrets: bool = False) -> dict:
    """Job runtime env: the recipe folder as working dir, nuance's package, the submitter's environment
    that workers get (``ray_env.worker_env``: endpoints, nuance and W&B settings; credentials only with
    ``forward_secrets``)."""
    from nuance.orchestration.ray_env import (
        FORWARD_SECRETS_ENV,
        note_unshipped_secrets,
        warn_secrets,
        worker_env,
    )

    env_vars = worker_env(recipe, secrets=forward_secrets)
    if forward_secrets:
        warn_secrets("the job")
        env_vars[FORWARD_SECRETS_ENV] = "1"  # the job's own `nuance train` ships them on to its workers
    else:
        note_unshipped_secrets("the cluster")
    package = ship_package(Path(recipe_dir).parent / "package")  # beside the working dir, not in it
    env = {"working_dir": recipe_dir, "py_modules": [package], "env_vars": env_vars}
    if pip:
        env["pip"] = list(pip)
    return env


def submit(
    recipe: Recipe,
    *,
    address: str | None,
    pip: list[str] = (),
    job_id: str | None = None,
    forward_secrets: bool = False,
) -> str:
    """Submit the resolved recipe as a Ray job; returns the job id."""
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="nuance-submit-") as tmp:
        job_dir = Path(tmp, "job")
        job_dir.mkdir()
        (job_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        try:
            return jobs.submit_job(
                entrypoint="python -m nuance.orchestration.cli train recipe.yaml",
                runtime_env=runtime_env(recipe, str(job_dir), list(pip), forward_secrets),
                submission_id=job_id,
                metadata={"nuance_recipe": recipe.name},
            )
        except Exception as err:
            raise JobsError(f"submission to {jobs.get_address()} failed: {str(err).splitlines()[0]}") from err


def _call(jobs, method: str, job_id: str | None = None):
    try:
        return getattr(jobs, method)(job_id) if job_id is not None else getattr(jobs, method)()
    except Exception as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if job_id is not None and ("does not exist" in text or "404" in text or "not found" in text.lower()):
            raise JobsError(f"no job '{job_id}' on {jobs.get_address()}") from err
        raise JobsError(f"{method} failed on {jobs.get_address()}: {text}") from err


def list_jobs(address: str | None) -> list:
    return _call(client(address), "list_jobs")


def status(address: str | None, job_id: str) -> str:
    return str(_call(client(address), "get_job_status", job_id))


def stop(address: str | None, job_id: str) -> bool:
    return bool(_call(client(address), "stop_job", job_id))


def logs(address: str | None, job_id: str) -> str:
    return _call(client(address), "get_job_logs", job_id)


def follow(address: str | None, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
    """Yield new log text until the job ends (polling: works through any HTTP proxy)."""
    jobs = client(address)
    seen = 0
    while True:
        state = str(_call(jobs, "get_job_status", job_id))
        text = _call(jobs, "get_job_logs", job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if state.split(".")[-1] in TERMINAL:
            return
        time.sleep(poll_s)
