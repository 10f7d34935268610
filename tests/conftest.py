"""Shared fixtures. Heavy things (Ray clusters, DeepSpeed process groups) are started once per session."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.s3_fixtures",
    "tests.distill_fixtures",
]  # one SeaweedFS and one moto S3 server per session (each started on first use)

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed picks its accelerator at import time; these tests run on CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/nuance/torch_extensions"))
os.environ.pop("WANDB_API_KEY", None)


def tiny_vae(path: Path, sample_size: int = 32) -> Path:
    """A tiny random diffusers AutoencoderKL (4 latent channels, downsampling 2) saved to `path`."""
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    ).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def nuance_cli() -> list[str]:
    """The installed console script, run as a subprocess like a user would."""
    return [sys.executable, "-m", "nuance.orchestration.cli"]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    """One toy-dataset cache for the whole session (several runs share it)."""
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One in-process local Ray cluster for the session (ended with ray.shutdown(), never `ray stop`).
    Started after the S3 server: its workers inherit this process' environment, credentials included
    (nuance never ships them in a runtime env), so they must be set before Ray starts."""
    import ray

    ray.init(num_cpus=4)  # with the dashboard: Ray Train's controller queries the state API
    yield
    ray.shutdown()


# ------------------------------------------------- one 2-node `ray start` cluster, shared and short-lived

TWO_NODES = "two_node_cluster"
TWO_NODES_LAST = "two_node_cluster_last_use"  # its tests stop the cluster, so they run after the others
_live_clusters: list = []


@pytest.fixture(scope="session")
def two_node_cluster(s3_server, tmp_path_factory):
    """One real 2-node token-auth cluster (tests/ray_local_cluster.py) for test_cluster's jobs and faults
    and test_secrets' canary search: one start and stop instead of two. Its nodes hold canary credentials
    in their environment, as a k8s Secret would: the S3 server's keys and a random W&B key nothing else
    knows (`.canaries`), with HOME a fresh folder (`.home`; the run folders of s3:// runs are
    ~/.cache/nuance/runs/<name>). The tests using it run one after another (pytest_collection_modifyitems)
    and it is stopped after the last one (pytest_runtest_teardown), not left idle for the rest of the session.
    """
    from tests.ray_local_cluster import LocalRayCluster

    cluster = LocalRayCluster(num_nodes=2, cpus_per_node=1)
    cluster.home = tmp_path_factory.mktemp("home")
    cluster.canaries = {
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "WANDB_API_KEY": "canary" + secrets.token_hex(18),
    }
    cluster.env.update({**cluster.canaries, "HOME": str(cluster.home)})
    _live_clusters.append(cluster)
    cluster.start()
    yield cluster
    _release_clusters()


@pytest.fixture
def two_node_cluster_last_use(two_node_cluster):
    """The shared 2-node cluster, for a test that stops it (the test then runs after every other user)."""
    return two_node_cluster


def _release_clusters() -> None:
    while _live_clusters:
        cluster = _live_clusters.pop()
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(config, items):
    """The tests of the shared 2-node cluster run together, where the first of them was collected (those
    that stop it last), so that it is up only while they run."""
    users = [item for item in items if TWO_NODES in getattr(item, "fixturenames", ())]
    if not users:
        return
    first = items.index(users[0])
    users.sort(key=lambda item: TWO_NODES_LAST in item.fixturenames)  # stable
    chosen = set(map(id, users))
    rest = [item for item in items if id(item) not in chosen]
    items[:] = rest[:first] + users + rest[first:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    if _live_clusters and TWO_NODES in getattr(item, "fixturenames", ()):
        later = item.session.items[item.session.items.index(item) + 1 :]
        if not any(TWO_NODES in getattr(other, "fixturenames", ()) for other in later):
            _release_clusters()  # its last test is done: stop it now, not at the end of the session
    return result
