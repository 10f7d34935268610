"""A 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`), jobs submitted with
`nuance submit`, and fault tolerance: a worker killed mid-run, and a worker killed in the middle of
writing a checkpoint. Every Ray process is started by the tests (one cluster, `two_node_cluster` in
conftest.py) and ended by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray_local_cluster import LocalRayCluster

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "nuance.orchestration.cli"]


@pytest.fixture
def cluster(two_node_cluster) -> LocalRayCluster:
    """The session's 2-node cluster (tests/conftest.py), shared with test_secrets' canary search."""
    return two_node_cluster


def job_args(tmp_path: Path, toy_cache: Path, name: str, *extra: str) -> list[str]:
    return [
        "quickstart",
        f"name={name}",
        f"cluster.storage_path={tmp_path}",
        f"data.cache_dir={toy_cache}",
        "model.name=dit_debug",
        "model.num_classes=12",
        "data.image_size=32",  # steps slow enough for the fault tests to act mid-run
        "sample.classes=[0,9]",
        "sample.steps=2",
        "sample.num_per_condition=1",
        "data.batch_size=8",
        "train.log_every=1",
        "data.log_keys=true",
        "cluster.placement_strategy=SPREAD",
        "sample.eval_per_condition=0",  # cluster behaviour; sample quality is tested in test_train_e2e
        # The shared cluster's nodes hold a canary W&B key (test_secrets): `auto` would mean online.
        "tracking.mode=offline",
        *extra,
    ]


def run_cli(cluster: LocalRayCluster, *args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        [*CLI, *args], env={**cluster.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(what)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def effective_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """Keys of each step of the surviving trajectory (a replayed step's later entry wins)."""
    steps: dict[int, list[str]] = {}
    for line in (run_dir / "keys" / f"rank{rank:05d}.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps[row["step"]] = row["keys"]
    return steps


def registered(run_dir: Path, checkpoint: str) -> bool:
    """Whether Ray Train's controller has registered `checkpoint` (only those are restored after a
    failure); it records them in its snapshot file in the run folder."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and f'"{checkpoint}"' in snapshot.read_text()


def workers(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / "workers" / f"rank{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_exactly_once(run_dir: Path, max_steps: int) -> None:
    for rank in (0, 1):
        steps = effective_keys(run_dir, rank)
        assert sorted(steps) == list(range(1, max_steps + 1))
        keys = [k for s in sorted(steps) for k in steps[s]]
        assert len(keys) == len(set(keys)), "a sample was trained on twice within the epoch"


def test_submit_spreads_two_workers_over_two_nodes(cluster, tmp_path, toy_cache):
    proc = run_cli(
        cluster,
        "submit",
        *job_args(tmp_path, toy_cache, "spread", "train.max_steps=4"),
        "--address",
        cluster.dashboard_url,
        "--follow",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "SUCCEEDED" in proc.stdout and "step 4/4" in proc.stdout
    job_id = proc.stdout.splitlines()[0].strip()
    listed = run_cli(cluster, "jobs", "list", "--address", cluster.dashboard_url)
    assert job_id in listed.stdout and "spread" in listed.stdout
    status = run_cli(cluster, "jobs", "status", job_id, "--address", cluster.dashboard_url)
    assert status.stdout.strip().endswith("SUCCEEDED")
    nodes = {workers(tmp_path / "spread", r)[0]["node_id"] for r in (0, 1)}
    assert len(nodes) == 2, "the two workers should run on different nodes (SPREAD)"
    assert (tmp_path / "spread" / "step_00000004" / "meta.json").is_file()


def test_jobs_errors_are_one_line(cluster):
    proc = run_cli(cluster, "jobs", "status", "no-such-job", "--address", cluster.dashboard_url)
    assert proc.returncode == 1 and proc.stderr.startswith("nuance: error:") and "no-such-job" in proc.stderr
    proc = run_cli(cluster, "jobs", "list", "--address", "http://127.0.0.1:9")
    assert proc.returncode == 1 and "cannot reach the Ray cluster" in proc.stderr
    proc = run_cli(cluster, "submit", "quickstart", "model.nmae=x", "--address", cluster.dashboard_url)
    assert proc.returncode == 2 and "model.nmae" in proc.stderr


def test_killed_worker_restarts_and_finishes_exactly(cluster, tmp_path, toy_cache):
    name, max_steps = "killed", 40
    args = job_args(
        tmp_path,
        toy_cache,
        name,
        f"train.max_steps={max_steps}",
        "train.ckpt_every=4",
        "cluster.max_failures=2",
    )
    proc = run_cli(cluster, "submit", *args, "--address", cluster.dashboard_url)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    run_dir = tmp_path / name
    wait_for(
        lambda: last_step(run_dir) >= 6 and registered(run_dir, "step_00000004"),
        300,
        "training never reached step 6 with the step-4 checkpoint registered",
    )
    assert last_step(run_dir) < max_steps, "the run ended before the kill: raise max_steps"
    victim = workers(run_dir, 1)[-1]["pid"]
    os.kill(victim, signal.SIGKILL)  # a worker process this test's cluster started
    final = wait_for(
        lambda: (
            (
                s := run_cli(
                    cluster, "jobs", "status", job_id, "--address", cluster.dashboard_url
                ).stdout.strip()
            ).endswith(("SUCCEEDED", "FAILED"))
            and s
        ),
        480,
        "job did not end",
    )
    assert final.endswith("SUCCEEDED"), run_cli(
        cluster, "jobs", "logs", job_id, "--address", cluster.dashboard_url
    ).stdout[-4000:]
    assert last_step(run_dir) == max_steps
    restarts = workers(run_dir, 1)
    assert len(restarts) == 2 and restarts[1]["resume_from"], "rank 1 should have restarted from a checkpoint"
    assert_exactly_once(run_dir, max_steps)
    # The restarted attempt continues the same W&B run: one run id (from run.json) for both attempts.
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and {p.name.split("-", 3)[3] for p in attempts} == {run_id}


def test_kill_during_save_resumes_from_previous_checkpoint(cluster, tmp_path, toy_cache):
    name, max_steps = "torn", 12
    marker = tmp_path / "fault-fired"
    args = job_args(
        tmp_path,
        toy_cache,
        name,
        f"train.max_steps={max_steps}",
        "train.ckpt_every=4",
        "cluster.max_failures=2",
        "train.keep_checkpoints=3",
    )
    proc = run_cli(
        cluster,
        "submit",
        *args,
        "--address",
        cluster.dashboard_url,
        "--follow",
        env={"NUANCE_FAULT": f"save:12:1:{marker}"},  # 8 steps after the first checkpoint: registered
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert marker.is_file(), "the fault did not fire"
    run_dir = tmp_path / name
    restarted = workers(run_dir, 0)[-1]
    resumed = re.search(r"resumed from \S+ at step (\d+)", proc.stdout)
    # From a checkpoint before the torn one (4, or 8 if Ray registered it before the kill), not from scratch.
    assert restarted["resume_from"] and resumed and int(resumed.group(1)) in (4, 8), proc.stdout[-4000:]
    meta = json.loads((run_dir / f"step_{max_steps:08d}" / "meta.json").read_text())
    assert meta["step"] == max_steps
    assert_exactly_once(run_dir, max_steps)
