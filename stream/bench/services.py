"""The measured services and the client, each in its own process.

`ServiceProcess` starts a service (the daemon or the baseline) that writes a ready file
with its ports, times the start, reads its `/metrics` and RSS, and stops it with SIGTERM.
`launch_client` runs one `stream.bench.client` (or `stream.bench.fleet`) measurement in a
fresh process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from .client import ClientSpec
from .fleet import FleetSpec
from .procfs import status_kib

__all__ = [
    "BenchError",
    "ServiceProcess",
    "launch_client",
    "peak_rss_bytes",
    "rss_bytes",
]

CLIENT_ARGV = (
    sys.executable,
    "-c",
    "import sys; from stream.bench.client import main; sys.exit(main(sys.argv[1:]))",
)
"""How the client process starts (`-m stream.bench.client` would import the module twice:
the package imports it first)."""
FLEET_ARGV = (
    sys.executable,
    "-c",
    "import sys; from stream.bench.fleet import main; sys.exit(main(sys.argv[1:]))",
)
"""How the fleet load generator's process starts (`stream.bench.fleet`)."""
POLL_S = 0.005
"""How often a start-up or a metric is polled (a readiness check, also the start time's
resolution)."""


class BenchError(RuntimeError):
    """A benchmark step failed: a service did not start, a client failed, a check timed out."""


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (`VmRSS` in `/proc/<pid>/status`), in bytes."""
    return _status_bytes(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of process `pid` (`VmHWM`), in bytes."""
    return _status_bytes(pid, "VmHWM")


def _status_bytes(pid: int, field: str) -> int:
    kib = status_kib(pid, field)
    if kib is None:
        raise BenchError(f"no {field} for pid {pid}")
    return kib * 1024


def _clean_env() -> dict[str, str]:
    # The benchmark's configuration is the TOML it writes: no ENACTIVE_* override applies.
    return {k: v for k, v in os.environ.items() if not k.startswith("ENACTIVE_")}


class ServiceProcess:
    """A service in a subprocess that writes `{port name: port, "pid": pid}` to a ready file.

    **Arguments:**

    - `name`: for messages and the log file name.
    - `argv`: the command; it must contain `ready_file` where the service expects it.
    - `ready_file`: the path the service writes once ready.
    - `log_dir`: where its stdout/stderr go (`<name>.log`).
    """

    def __init__(self, name: str, argv: Sequence[str], ready_file: Path, log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_file = ready_file
        self.log_path = log_dir / f"{name}.log"
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 300.0) -> float:
        """Start the process and wait for its ready file.

        **Returns:** seconds from spawning the process to the ready file's appearance.

        **Raises:** `BenchError` when the process exits or is not ready within `timeout`.
        """
        self.ready_file.unlink(missing_ok=True)
        self._log = self.log_path.open("ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=_clean_env()
        )
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                self._close_log()
                raise BenchError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
            if time.perf_counter() - t0 > timeout:
                self.kill()
                raise BenchError(f"{self.name} not ready in {timeout} s:\n{self.output()}")
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - t0
        self.ports = json.loads(self.ready_file.read_text())
        return elapsed

    def output(self, tail: int = 4000) -> str:
        """The last `tail` characters of the service's log."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of `/metrics` as `(name, labels, value)`."""
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            value
            for n, ls, value in self.samples()
            if n == name and all(ls.get(k) == v for k, v in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """`{label value: sample value}` for the samples called `name`."""
        return {ls[label]: v for n, ls, v in self.samples() if n == name and label in ls}

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll `check` until true (a readiness check); `BenchError` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {what} not reached within {timeout} s")
            time.sleep(POLL_S * 4)

    def rss(self) -> int:
        """The service's resident set size now, in bytes."""
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; kill after `timeout` s. Returns the exit status."""
        assert self.proc is not None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.name} did not stop in {timeout} s") from None
        finally:
            self._close_log()

    def kill(self) -> None:
        """Kill the process if it still runs (cleanup after a failure)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def launch_client(
    spec: ClientSpec | FleetSpec,
    workdir: Path,
    *,
    timeout: float = 600.0,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 0.1,
) -> dict[str, Any]:
    """Run one client measurement in a new process (`stream.bench.client.main`, or
    `stream.bench.fleet.main` for a `FleetSpec`).

    **Arguments:**

    - `spec`: the run.
    - `workdir`: where the spec and the client's output go.
    - `timeout`: the longest the client may take, in seconds.
    - `on_poll`: called every `poll_s` seconds while the client runs (e.g. to sample RSS).

    **Returns:** the client's result dict (see `run_client`).

    **Raises:** `BenchError` when the client fails or takes too long.
    """
    spec_path = workdir / "client-spec.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    out_path, err_path = workdir / "client-out.json", workdir / "client-err.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [*(FLEET_ARGV if isinstance(spec, FleetSpec) else CLIENT_ARGV), str(spec_path)],
            stdout=out,
            stderr=err,
            env=_clean_env(),
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    rc = proc.wait(poll_s if on_poll else max(deadline - time.monotonic(), 0.01))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise BenchError(f"client ({spec.mode}) took over {timeout} s") from None
                    if on_poll is not None:
                        on_poll()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        raise BenchError(
            f"client ({spec.mode}) exited {rc}: {err_path.read_text(errors='replace')[-2000:]}"
        )
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result
