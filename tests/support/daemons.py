"""Real ``p2pull daemon`` processes on loopback, for swarm tests.

    with DaemonCluster(tmp_path, 4) as cluster:        # or the ``daemons`` fixture
        cluster.start_all()                             # static peers: all the others
        cluster.wait_for_mesh()                         # each lists the N-1 others
        puller = cluster[0].start_get(ref, tmp_path / "out")
        summary = cluster[0].finish_get(puller)

Each daemon gets its own data directory, a Unix socket in a short temporary directory (a
socket path may not exceed 107 bytes, and pytest's tmp_path can be long), a free port on
127.0.0.1, the cluster's secret file and ``P2PULL_DISCOVERY=static``. Every process a
daemon starts (the daemon and its ``get`` commands) is ended by its pid at teardown:
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.registry import free_port

#: how long a daemon may take to answer on its socket after it is started
START_TIMEOUT = 20.0
#: SIGTERM, then SIGKILL after this many seconds
STOP_GRACE = 5.0
#: how long the daemons may take to connect to each other
MESH_TIMEOUT = 20.0
#: chunks of 1 MiB, so a model of tens of MiB has many chunks to share
CHUNK_SIZE = "1MiB"
CLUSTER = "swarm-test"


def clean_env() -> dict[str, str]:
    """The test's environment without any P2PULL_* setting of the developer's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("P2PULL_")}


def end_process(process: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM ``process`` by its pid, SIGKILL it after ``grace`` seconds; reap it."""
    if process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    except ProcessLookupError:
        process.wait(timeout=grace)


class Daemon:
    """One ``p2pull daemon`` process and the commands run against it."""

    def __init__(self, cluster: "DaemonCluster", name: str, *, port: int,
                 peers: list[str] | None = None, env: dict[str, str] | None = None):
        self.cluster = cluster
        self.name = name
        self.port = port
        #: static peers (host:port); None: all the other daemons of the cluster
        self.peers = peers
        self.extra_env = dict(env or {})
        self.data_dir = cluster.root / name
        self.socket = cluster.socket_dir / f"{name}.sock"
        self.log_path = cluster.root / f"{name}.log"
        self.process: subprocess.Popen | None = None
        self._gets: list[subprocess.Popen] = []
        self.node_id: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        peers = self.peers if self.peers is not None else [
            d.address for d in self.cluster.daemons if d is not self]
        return {**clean_env(), "P2PULL_DATA_DIR": str(self.data_dir),
                "P2PULL_SOCKET": str(self.socket), "P2PULL_LISTEN": self.address,
                "P2PULL_PEERS": ",".join(peers), "P2PULL_DISCOVERY": "static",
                "P2PULL_SECRET_FILE": str(self.cluster.secret_file),
                "P2PULL_CLUSTER": CLUSTER, "P2PULL_CHUNK_SIZE": CHUNK_SIZE,
                **self.extra_env}

    # -- the process --------------------------------------------------------------------

    def start(self) -> "Daemon":
        """Start the daemon; return once its API answers (bounded)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "p2pull", "-v", "daemon"], env=self.env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.process.poll() is None, \
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            try:
                self.node_id = self.status()["node_id"]
                return self
            except (httpx.HTTPError, OSError):
                pass
            assert time.monotonic() < deadline, \
                f"{self.name} did not answer on {self.socket}:\n{self.log_tail()}"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, by pid: no goodbye, no flush."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_GRACE)

    def stop(self) -> None:
        """End the daemon and every get started against it (SIGTERM, then SIGKILL)."""
        for process in self._gets:
            end_process(process)
        if self.process is not None:
            end_process(self.process)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """Everything the daemon logged (at INFO: it runs with -v), over all its starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- the local API ------------------------------------------------------------------

    def api(self, path: str, timeout: float = 5.0):
        """GET ``path`` of the daemon's API in-process (what `p2pull status` asks)."""
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://p2pull",
                          timeout=timeout) as api:
            response = api.get(path)
            response.raise_for_status()
            return response.json()

    def status(self) -> dict:
        return self.api("/status")

    def peer_ids(self) -> set[str]:
        return {peer["node_id"] for peer in self.api("/peers")}

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``p2pull ARGS`` with this daemon's environment."""
        return subprocess.run([sys.executable, "-m", "p2pull", *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 30.0):
        done = self.cli(*args, "--json", timeout=timeout)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    # -- gets through the daemon --------------------------------------------------------

    def start_get(self, ref: str, output: Path) -> subprocess.Popen:
        """``p2pull get REF -o OUTPUT --json`` against this daemon's socket, in the
        background; finish it with ``finish_get``."""
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pull", "get", ref, "-o", str(output), "--json"],
            env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self._gets.append(process)
        return process

    def finish_get(self, process: subprocess.Popen, timeout: float = 60.0) -> dict:
        """Wait (bounded) for a get; its JSON summary. Fails with the get's stderr and
        the daemon's log if it failed."""
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_process(process)
            raise AssertionError(f"get on {self.name} took over {timeout} s:\n"
                                 f"{self.log_tail()}") from None
        assert process.returncode == 0, \
            f"get on {self.name} failed ({process.returncode}): {err}\n{self.log_tail()}"
        return json.loads(out)

    def get(self, ref: str, output: Path, timeout: float = 60.0) -> dict:
        return self.finish_get(self.start_get(ref, output), timeout)


class DaemonCluster:
    """Daemons of one cluster (same name, same secret) under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="p2s-"))
        self.secret_file = self.root / "cluster-secret"
        self.secret_file.write_text(secrets.token_hex(32) + "\n")
        self.daemons: list[Daemon] = []

    @property
    def secret(self) -> bytes:
        """The secret as the daemons read it (load_secret strips it)."""
        return self.secret_file.read_bytes().strip()

    def add(self, count: int = 1, *, peers: list[str] | None = None,
            env: dict[str, str] | None = None) -> list[Daemon]:
        """Define ``count`` daemons (not started). ``peers``: their static peers, None for
        all the other daemons of the cluster (as they are when each starts)."""
        added = []
        for _ in range(count):
            daemon = Daemon(self, f"node{len(self.daemons)}", port=free_port(), peers=peers,
                            env=env)
            self.daemons.append(daemon)
            added.append(daemon)
        return added

    def start_all(self) -> list[Daemon]:
        for daemon in self.daemons:
            daemon.start()
        return self.daemons

    def wait_for_mesh(self, daemons: list[Daemon] | None = None,
                      timeout: float = MESH_TIMEOUT) -> None:
        """Until each of ``daemons`` lists exactly the others as peers (bounded)."""
        daemons = daemons if daemons is not None else self.daemons
        deadline = time.monotonic() + timeout
        for daemon in daemons:
            others = {d.node_id for d in daemons if d is not daemon}
            while True:
                seen = daemon.peer_ids()
                if seen == others:
                    break
                assert time.monotonic() < deadline, \
                    f"{daemon.name} lists {len(seen)} peers, not {len(others)}:\n" \
                    f"{daemon.log_tail()}"
                time.sleep(0.1)

    def __getitem__(self, index: int) -> Daemon:
        return self.daemons[index]

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> "DaemonCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
