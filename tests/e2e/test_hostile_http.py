"""The metrics/health endpoint of a real daemon process under attack: out of file
descriptors, and hundreds of "slowloris" connections trickling their request heads.

Loopback only; every loop is bounded in count and time; each test prints its figures."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stream.protocol import encode_frame

from .daemon import DaemonProcess, payload, sockets, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.reliability]

FD_LIMIT = 256
LIMITED = "enactive_connections_limited_total"


def limited(d: DaemonProcess, reason: str, listener: str = "metrics.listen") -> float:
    labels = (("listener", listener), ("reason", reason))
    return d.metrics().get((LIMITED, labels), 0.0)


def timed_get(d: DaemonProcess, path: str) -> tuple[int, float]:
    started = time.perf_counter()
    status, _ = d.http(path)
    return status, time.perf_counter() - started


def send_frames(d: DaemonProcess, n: int) -> None:
    """A few frames, so that the daemon has a stream to checkpoint at SIGTERM."""
    conn = d.connect()
    rng = np.random.default_rng(0)
    for seq in range(1, n + 1):
        conn.sendall(encode_frame("hostile", seq, 0.0, **payload(rng)))
    d.wait_metric("enactive_frames_processed_total", {}, n)


def test_out_of_file_descriptors_the_daemon_survives_and_answers_again(
    tmp_path: Path, compilation_cache: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache, fd_limit=FD_LIMIT).start()
    try:
        send_frames(d, 3)
        assert d.proc is not None
        with sockets() as flood, sockets() as probe:
            # Idle connections to the sensor port until the daemon runs out of descriptors
            # (the kernel completes the handshakes of those it cannot accept).
            for _ in range(FD_LIMIT + 100):
                flood.append(socket.create_connection(("127.0.0.1", d.ports["tcp"]), 2))
            wait_for(lambda: "TCP accept failed" in d.output(), "the daemon never hit EMFILE")
            # A scrape now waits in the backlog while the HTTP accept fails and is counted.
            probe.append(socket.create_connection(("127.0.0.1", d.ports["metrics"]), 2))
            probe[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(1.0)  # (the state under test: one second out of descriptors)
            assert d.proc.poll() is None, d.output()[-3000:]
            for s in flood:
                s.close()
            flood.clear()
            started = time.perf_counter()
            probe[0].settimeout(10)
            assert probe[0].recv(4096).startswith(b"HTTP/1.1 200 ")
            recovered = time.perf_counter() - started
        status, took = timed_get(d, "/metrics")
        assert status == 200
        assert d.http("/healthz") == (200, "ok\n")
        errors = limited(d, "accept_error")
        assert errors >= 1
        sensor_errors = limited(d, "accept_error", "ingest.tcp")
        assert sensor_errors >= 1  # the sensor port ran out first, and counted it too
        print(
            f"fd limit {FD_LIMIT}, {FD_LIMIT + 100} idle sensor connections: HTTP accept "
            f"failed {errors:.0f} times, the sensor port's {sensor_errors:.0f} "
            f"(counted), the waiting healthz answered "
            f"{recovered * 1e3:.0f} ms after the flood closed, metrics in {took * 1e3:.0f} ms"
        )
        assert d.stop() == 0, d.output()[-3000:]
    finally:
        d.kill()
    assert (d.state / "checkpoint.npz").exists()


class Slowloris:
    """`n` connections that each send a request head one byte per `interval`; a
    connection the server cuts (closed or answered) is reopened, until `stop()`."""

    HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200

    def __init__(self, port: int, n: int, interval: float = 1.0) -> None:
        self.port, self.n, self.interval = port, n, interval
        self.cuts = 0
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Slowloris:
        self._thread.start()
        assert self.connected.wait(30), "the attackers could not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self) -> tuple[socket.socket, int]:
        s = socket.create_connection(("127.0.0.1", self.port), 2)
        s.setblocking(False)
        return s, 0

    def _cut(self, s: socket.socket) -> bool:
        try:
            s.recv(4096)  # an answer (503) or the end (b"")
            return True
        except BlockingIOError:
            return False  # still open, nothing said
        except OSError:
            return True

    def _run(self) -> None:
        conns = [self._open() for _ in range(self.n)]
        self.connected.set()
        try:
            for _ in range(600):  # ticks; bounded
                if self._stop.wait(self.interval):
                    return
                for i, (s, sent) in enumerate(conns):
                    if not self._cut(s):
                        try:
                            s.send(self.HEAD[sent % len(self.HEAD) : sent % len(self.HEAD) + 1])
                            conns[i] = (s, sent + 1)
                            continue
                        except OSError:
                            pass
                    s.close()
                    self.cuts += 1
                    conns[i] = self._open()
        finally:
            for s, _ in conns:
                s.close()


def test_probes_and_scrapes_answered_while_hundreds_of_slow_connections_trickle(
    tmp_path: Path, compilation_cache: str
) -> None:
    n, attack_s = 300, 12.0  # the attack outlasts two header deadlines (5 s)
    d = DaemonProcess(tmp_path, compilation_cache).start()
    try:
        send_frames(d, 3)
        took: dict[str, list[float]] = {"/healthz": [], "/metrics": []}
        with Slowloris(d.ports["metrics"], n) as attack:
            deadline = time.monotonic() + attack_s
            while time.monotonic() < deadline:
                for path, times in took.items():
                    status, seconds = timed_get(d, path)
                    assert status == 200, (path, status)
                    assert seconds < 2.0, (path, seconds)
                    times.append(seconds)
                time.sleep(0.5)
            cuts = attack.cuts
        displaced = limited(d, "max_connections")
        assert displaced >= n - 64 - 8
        worst = {path: max(times) * 1e3 for path, times in took.items()}
        print(
            f"{n} slow connections open for {attack_s:.0f} s: healthz answered "
            f"{len(took['/healthz'])}/{len(took['/healthz'])}, worst {worst['/healthz']:.0f} "
            f"ms; metrics {len(took['/metrics'])}/{len(took['/metrics'])}, worst "
            f"{worst['/metrics']:.0f} ms; {displaced:.0f} displaced (max_connections), "
            f"{cuts} reconnects by the attacker"
        )

        # Fewer than the cap: each is cut at the header deadline and counted.
        before = limited(d, "header_timeout")
        with Slowloris(d.ports["metrics"], 20) as attack:
            started = time.monotonic()
            wait_for(lambda: attack.cuts >= 20, "slow heads not cut", timeout=15)
            cut_after = time.monotonic() - started
        assert 4.0 < cut_after < 8.0, cut_after
        timeouts = limited(d, "header_timeout") - before
        assert timeouts >= 20
        print(f"20 slow heads cut {cut_after:.1f} s after connecting (header deadline 5 s)")
        assert d.stop() == 0, d.output()[-3000:]
    finally:
        d.kill()
    assert (d.state / "checkpoint.npz").exists()
