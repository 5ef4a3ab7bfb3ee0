"""Run the daemon as a real process and talk to it over real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.protocol import Dims, Moment, MomentReader

DIMS = Dims(8, 6, 4, 3)
MODEL = """\
[model]
state_dim = 8
proprio_dim = 6
tactile_dim = 4
motor_dim = 3
retention_depth = 3
protention_horizon = 2
hidden_dim = 8
som_grid = [3, 3]
attention_heads = 2
"""
"""The small model every e2e daemon runs (`DIMS`), as a `[model]` section."""
CONFIG = (
    """\
[ingest]
tcp = "127.0.0.1:0"
udp = "127.0.0.1:0"
[output]
tcp = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[batching]
buckets = [1, 8, 64]
max_wait_ms = 2
"""
    + MODEL
    + """[state]
dir = "{state}"
checkpoint_interval_s = 60
max_streams = 512
[device]
compilation_cache_dir = "{cache}"
[log]
status_interval_s = 0
"""
)


class DaemonProcess:
    """`enactive-stream run --config …` in a subprocess, ready once its ports are known."""

    def __init__(
        self,
        tmp: Path,
        cache_dir: str,
        extra: str = "",
        env: dict | None = None,
        fd_limit: int | None = None,
        args: Sequence[str] = (),
    ):
        self.tmp = tmp
        self.state = tmp / "state"
        self.config = tmp / "daemon.toml"
        self.config.write_text(CONFIG.format(state=self.state, cache=cache_dir) + extra)
        self.ready_file = tmp / "ready.json"
        self.log = tmp / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.fd_limit = fd_limit  # the daemon's soft RLIMIT_NOFILE, when set
        self.args = list(args)  # more `run` options
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self._sockets: list[socket.socket] = []

    def start(self, timeout: float = 120.0, *, all_buckets: bool = True) -> DaemonProcess:
        """Start it and wait until it is ready — and, with `all_buckets`, until every
        bucket is compiled (it serves from its first; tests want the whole set)."""
        self.ready_file.unlink(missing_ok=True)
        self._log = self.log.open("ab")
        argv = [
            sys.executable,
            "-m",
            "stream.cli",
            "run",
            "--config",
            str(self.config),
            "--ready-file",
            str(self.ready_file),
            *self.args,
        ]
        if self.fd_limit is not None:
            # Lowered in a small launcher that then execs the daemon: no fork from this
            # (possibly multithreaded, JAX-using) test process with a preexec hook.
            launcher = (
                "import os, resource, sys; "
                "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({self.fd_limit}, hard)); "
                "os.execv(sys.executable, sys.argv[1:])"
            )
            argv = [sys.executable, "-c", launcher, *argv]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():  # the daemon writes it once /readyz is 200
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon not ready in {timeout} s:\n{self.output()}")
            time.sleep(0.05)
        self.ports = json.loads(self.ready_file.read_text())
        if all_buckets and "metrics" in self.ports:
            wait_for(
                lambda: self.http("/readyz") == (200, "ready\n"),
                f"buckets still compiling after {timeout} s:\n{self.output()}",
                max(deadline - time.monotonic(), 1.0),
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close_clients(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def stop(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.close_clients()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()

    def kill(self) -> None:
        """SIGKILL (if it still runs)."""
        self.close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self._log.close()

    # -- clients ------------------------------------------------------------------------

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.ports['metrics']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        _, text = self.http("/metrics")
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.ports["tcp"]), timeout=10)
        self._sockets.append(sock)
        return sock

    def udp(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sockets.append(sock)
        return sock

    def subscribe(self, glob: str = "*", fmt: str = "binary") -> Subscriber:
        sub = Subscriber(self.ports["output"], glob, fmt)
        self._sockets.append(sub.sock)
        return sub

    def wait_metric(self, name: str, labels: dict, at_least: float, timeout: float = 30.0) -> float:
        """Poll /metrics until a sample reaches a value (a readiness check, not a sleep)."""
        key = (name, tuple(sorted(labels.items())))
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get(key, 0.0)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.05)


class Subscriber:
    """A binary moment subscriber."""

    def __init__(self, port: int, glob: str, fmt: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"SUB {fmt} {glob}\n".encode())
        self.reader = MomentReader()
        self.moments: list[Moment] = []

    def read(self, n: int, timeout: float = 30.0) -> list[Moment]:
        """Receive until `n` moments in all arrived (or raise on timeout)."""
        deadline = time.monotonic() + timeout
        while len(self.moments) < n:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError(f"got {len(self.moments)} of {n} moments") from None
            if not data:
                raise ConnectionError(f"subscriber closed after {len(self.moments)} moments")
            self.moments += self.reader.feed(data)
        return self.moments


def payload(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "sensory": rng.standard_normal(DIMS.sensory).astype(np.float32),
        "proprio": rng.standard_normal(DIMS.proprio).astype(np.float32),
        "tactile": rng.standard_normal(DIMS.tactile).astype(np.float32),
        "motor": rng.standard_normal(DIMS.motor).astype(np.float32),
    }


IN_CI = os.environ.get("CI", "").lower() == "true"


def need(what: str, ok: bool) -> None:
    """Skip when `what` is missing (`ok` false) — fail in CI, which must install it."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{what} is needed (CI=true: CI must install it)")
        pytest.skip(f"{what} is needed")


def free_port() -> int:
    """A loopback TCP port free now (for a server the tests start)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` different loopback TCP ports free now: all bound at once, so none is handed
    out twice (ports taken one at a time can repeat once the first is closed — a NATS
    cluster's route port once equalled another node's monitoring port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `predicate` until it holds (a readiness check, not a sleep); `TimeoutError`
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list to put sockets in; every one is closed at the end."""
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for sock in held:
            sock.close()


def run_without(
    hidden: Sequence[str], modules: Sequence[str], section: str, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """`enactive-stream run` on a config with `section`, in a process where the packages
    `hidden` cannot be imported, after importing the daemon's modules and `modules`."""
    config = tmp / "c.toml"
    config.write_text(f'[state]\ndir = "{tmp}"\n{section}')
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in hidden)  # import -> ImportError
        + "import stream.daemon, stream.pipeline, stream.cli\n"
        + "".join(f"import {module}\n" for module in modules)
        + "sys.exit(stream.cli.main(['run', '--config', sys.argv[1]]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=120
    )
