"""A real multi-node Ray cluster on one machine: `ray start --head` + `ray start --address` nodes.

Every process is started in the foreground (`--block`) in its own process group and ended by PID
(never `ray stop`, which would kill every Ray process on the machine, other users' included).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

RAY_ENV = {
    # Ray would replace 127.0.0.1 by the machine's address otherwise (see the design notes).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    # Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s
    # by default); a worker killed before that restarts from the checkpoint before. The tiny test runs
    # take ~0.1 s per step, so the fault tests poll often and wait for the registration they rely on.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}


class LocalRayCluster:
    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 1):
        self.num_nodes, self.cpus_per_node = num_nodes, cpus_per_node
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # AF_UNIX paths must stay short
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        # `ray start` clusters use token authentication (Ray's default): every client (ray.init, the
        # Jobs API, nuance submit) needs the token; a per-cluster token keeps ~/.ray untouched.
        self.env = {
            **os.environ,
            **RAY_ENV,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
        }

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        args = []
        for flag in (
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-grpc-port",
            "--dashboard-agent-listen-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
        ):
            args += [flag, str(free_port())]
        return args

    def _start(self, args: list[str], log: str) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        out = open(Path(self.temp_dir) / log, "w")  # noqa: SIM115 - kept open for the process' life
        cmd = [
            ray,
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(self.cpus_per_node),
            "--disable-usage-stats",
            *self._node_ports(),
            *args,
        ]
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def start(self, timeout_s: float = 120) -> LocalRayCluster:
        try:
            return self._start_all(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_all(self, timeout_s: float) -> LocalRayCluster:
        self._start(
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--include-dashboard",
                "true",
                "--ray-client-server-port",
                str(free_port()),
                "--temp-dir",
                self.temp_dir,
            ],
            "head.log",
        )
        self._wait_nodes(1, timeout_s)
        for i in range(1, self.num_nodes):
            self._start(["--address", self.gcs_address], f"node{i}.log")
        self._wait_nodes(self.num_nodes, timeout_s)
        self._wait_dashboard(timeout_s)
        return self

    def alive_nodes(self) -> int:
        code = (
            f"import ray; ray.init(address='{self.gcs_address}', _node_ip_address='127.0.0.1', "
            "logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60
        )
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a ray node exited early; logs in {self.temp_dir}")
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes not up after {timeout_s} s; logs in {self.temp_dir}")

    def _wait_dashboard(self, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # it answers (401 without the token is fine)
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray dashboard not up at {self.dashboard_url}")

    def stop(self) -> None:
        """Ends every node; a second call does nothing (its process groups are never signalled again)."""
        procs, self.procs = self.procs, []
        for proc in reversed(procs):  # workers first, then the head
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        # `ray start --block` forwards SIGTERM; what lingers after 5 s (all nodes together) gets SIGKILL.
        deadline = time.monotonic() + 5  # a graceful stop takes up to ~15 s; the tests need none
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
