"""Shared fixtures. Heavy things (Ray clusters, DeepSpeed process groups) are started once per session."""

from __future__ import annotations

import os
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
