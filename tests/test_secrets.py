"""Credentials never reach a file or an API answer that nuance or Ray produces.

Canary credentials (the session S3 server's own random keys, and a random W&B key) are set for
`nuance train` (embedded Ray), `nuance submit` to a 2-node token-auth cluster whose nodes hold them in
their environment (the session's `two_node_cluster`, conftest.py: this test runs after test_cluster's jobs
on it and stops it), and `nuance data precompute` on that cluster. All three read and write S3 from Ray
workers, so the keys do reach the workers (inherited from the driver, or from the node); then every file
under both Ray temp dirs, the run folders (W&B files included) and the Jobs API's answers is searched
for each canary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "nuance.orchestration.cli"]
SECRET_NAMES = ("WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


# ----------------------------------------------------------------------------------- fast: the rule


def test_worker_env_leaves_credentials_out_unless_asked(monkeypatch, capsys, tmp_path):
    from nuance.orchestration import ray_env
    from nuance.orchestration.jobs import runtime_env
    from nuance.orchestration.recipe import load_recipe

    for name in (*SECRET_NAMES, "AWS_SESSION_TOKEN", "NUANCE_DB_PASSWORD"):
        monkeypatch.setenv(name, f"canary-{name}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example:9000")
    monkeypatch.setenv("WANDB_MODE", "offline")
    env = ray_env.worker_env()
    assert not any(v.startswith("canary-") for v in env.values()), env
    assert env["AWS_ENDPOINT_URL"] == "http://s3.example:9000" and env["WANDB_MODE"] == "offline"
    assert ray_env.worker_env(secrets=True)["AWS_SECRET_ACCESS_KEY"] == "canary-AWS_SECRET_ACCESS_KEY"
    # Embedded or joined: only a joined cluster with NUANCE_FORWARD_SECRETS=1 gets them.
    monkeypatch.setenv("NUANCE_FORWARD_SECRETS", "1")
    assert not ray_env.joined_worker_secrets()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert ray_env.joined_worker_secrets()
    monkeypatch.delenv("NUANCE_FORWARD_SECRETS")
    assert not ray_env.joined_worker_secrets()

    recipe, _ = load_recipe("quickstart")
    for name in ("plain", "forwarded"):
        (tmp_path / name / "job").mkdir(parents=True)
    shipped = runtime_env(recipe, str(tmp_path / "plain" / "job"), [])["env_vars"]
    assert not any(v.startswith("canary-") for v in shipped.values()), shipped
    note = capsys.readouterr().err
    assert note.startswith("nuance: note: AWS_ACCESS_KEY_ID") and "NUANCE_FORWARD_SECRETS=1" in note
    assert "canary-" not in note
    forwarded = runtime_env(recipe, str(tmp_path / "forwarded" / "job"), [], forward_secrets=True)["env_vars"]
    assert forwarded["WANDB_API_KEY"] == "canary-WANDB_API_KEY"
    warning = capsys.readouterr().err
    assert warning.startswith("nuance: warning: shipping") and "AWS_SECRET_ACCESS_KEY" in warning
    assert "canary-" not in warning  # names, never values


# --------------------------------------------------------------------------- slow: the canary search


# Prints the Jobs API's answers as one JSON object {label: text}.
JOBS_API_DUMP = """
import json, sys
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
jobs = client.list_jobs()
out = {"jobs list": json.dumps([job.model_dump() for job in jobs], default=str)}
for job in jobs:
    if job.submission_id:  # drivers that joined through RAY_ADDRESS are listed without one
        info = client.get_job_info(job.submission_id).model_dump()
        out["job " + job.submission_id] = json.dumps(info, default=str)
        out["logs " + job.submission_id] = client.get_job_logs(job.submission_id)
print(json.dumps(out))
"""


def _files(*roots: Path):
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    yield path


def _leaks(canaries: dict[str, str], roots: list[Path], texts: dict[str, str]) -> list[str]:
    """Where any canary appears: file paths under ``roots`` (contents and names), named texts."""
    found, encoded = [], {name: value.encode() for name, value in canaries.items()}
    searched = 0
    for path in _files(*roots):
        searched += 1
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [
            f"{name} in {path}" for name, value in encoded.items() if value in data or value in bytes(path)
        ]
    for label, text in texts.items():
        found += [f"{name} in {label}" for name, value in canaries.items() if value in text]
    assert searched > 50, f"only {searched} files searched: wrong folders?"
    return found


def _image_shards(url: str, folder: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    from nuance.data.sharding import shard_dataset

    folder.mkdir()
    for i in range(4):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
        (folder / f"{i}.txt").write_text(f"image {i}")
    shard_dataset(str(folder), url, samples_per_shard=2, progress=False)


def _tiny_vae(folder: Path) -> str:
    from tests.conftest import tiny_vae

    return str(tiny_vae(folder))


def _train_args(name: str, storage: str, toy_cache: Path) -> list[str]:
    return [
        "quickstart",
        f"name={name}",
        f"cluster.storage_path={storage}",
        f"data.cache_dir={toy_cache}",
        "cluster.num_workers=1",
        "train.max_steps=2",
        "train.ckpt_every=2",
        "train.log_every=1",
        "sample.every=0",
        "sample.eval_per_condition=0",
        "engine.backend=ddp",
        "tracking.mode=offline",
    ]


@pytest.mark.slow
def test_no_canary_in_ray_files_run_folders_or_jobs_api(
    two_node_cluster_last_use, s3_bucket, toy_cache, tmp_path, request
):
    from nuance.data import storage

    # The nodes hold the canaries (the session S3 server's keys, so S3 works with them, and a W&B key
    # nothing else knows) and HOME (the run folders of s3:// runs are ~/.cache/nuance/runs/<name>).
    cluster = two_node_cluster_last_use
    canaries, home = cluster.canaries, cluster.home
    assert canaries["WANDB_API_KEY"].startswith("canary")
    assert all(cluster.env[name] == value for name, value in canaries.items()), "nodes without the keys"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: AF_UNIX paths
    outputs: dict[str, str] = {}
    env = {**os.environ, **canaries, "HOME": str(home), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    start = time.perf_counter()
    try:
        # 1. and 2. run at once (independent commands: on 2 cores their start-ups overlap).
        # 1. Embedded Ray: its workers inherit the keys from the driver and write checkpoints to S3.
        # 2. nuance submit to the 2-node cluster: the keys come from the nodes' environment.
        job_env = {**cluster.env, **canaries, "HOME": str(home)}
        with ThreadPoolExecutor(2) as pool:
            embedded = pool.submit(
                subprocess.run, [*CLI, "train", *_train_args("embedded", f"{s3_bucket}runs", toy_cache)],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            submitted = pool.submit(
                subprocess.run, [*CLI, "submit", *_train_args("submitted", f"{s3_bucket}runs", toy_cache),
                                 "--address", cluster.dashboard_url, "--follow"],
                env=job_env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            proc = embedded.result()
            outputs["train output"] = proc.stdout + proc.stderr
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert storage.exists(f"{s3_bucket}runs/embedded/step_00000002/meta.json")
            print(f"embedded train: {time.perf_counter() - start:.0f}s")
            proc = submitted.result()
        outputs["submit output"] = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "SUCCEEDED" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
        assert storage.exists(f"{s3_bucket}runs/submitted/step_00000002/meta.json")

        print(f"submit: {time.perf_counter() - start:.0f}s")
        # 3. nuance data precompute on the cluster: its actors read and write S3 with the nodes' keys.
        _image_shards(f"{s3_bucket}images", tmp_path / "images")
        vae = _tiny_vae(tmp_path / "vae")
        proc = subprocess.run(
            [*CLI, "data", "precompute", f"{s3_bucket}images", f"{s3_bucket}latents", "--vae", vae,
             "--image-size", "16", "--batch-size", "2", "--quiet"],
            env={**job_env, "RAY_ADDRESS": cluster.gcs_address}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        outputs["precompute output"] = proc.stdout + proc.stderr
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert storage.exists(f"{s3_bucket}latents/manifest.json")

        print(f"precompute: {time.perf_counter() - start:.0f}s")
        # The Jobs API's answers, as anyone with the cluster's token gets them: list, details, logs.
        proc = subprocess.run(
            [sys.executable, "-c", JOBS_API_DUMP, cluster.dashboard_url],
            env=cluster.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers = json.loads(proc.stdout)
        outputs.update(answers)
        assert (
            len(answers) >= 3
            and '"runtime_env"' in answers["jobs list"]
            and "step 2/2" in "".join(answers.values())
        )
        # Every object the three commands wrote to S3 (checkpoints, run.json, shards, latents, manifests).
        fs = storage.filesystem(s3_bucket)
        objects = fs.find(s3_bucket.removeprefix("s3://"))
        assert len(objects) > 10, objects
        for key in objects:
            outputs[f"s3://{key}"] = fs.cat_file(key).decode("latin1")
    finally:
        cluster.stop()  # the cluster's last test: every Ray process has ended before the search
    roots = [ray_tmp, Path(cluster.temp_dir), home, tmp_path]
    for ray_dir in roots[:2]:  # the Ray sessions wrote here (the log that would hold a runtime env)
        assert list(ray_dir.rglob("runtime_env_agent.log")), f"no Ray session under {ray_dir}"
    assert list(home.rglob("offline-run-*")), "no W&B files in the run folders"
    leaks = _leaks(canaries, roots, outputs)
    assert not leaks, "\n".join(leaks[:40])
