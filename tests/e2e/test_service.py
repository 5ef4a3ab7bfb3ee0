"""The daemon under a service manager: SIGHUP, sd_notify, `/readyz` progress, JSON logs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from stream.config import load_config
from stream.daemon import Daemon
from stream.notify import Notifier
from stream.protocol import encode_frame

from .daemon import CONFIG, DaemonProcess, payload, wait_for

pytestmark = pytest.mark.timeout(300)

JAX_NOISE = ("Unable to initialize backend", "Resetting cache at")


def send_frames(conn: socket.socket, seqs: range) -> None:
    rng = np.random.default_rng(seqs.start)
    for seq in seqs:
        conn.sendall(encode_frame("hup", seq, 0.0, **payload(rng)))


def test_sighup_is_logged_and_ignored_while_serving_and_draining(
    tmp_path: Path, compilation_cache: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache, env={"ENACTIVE_LOG_FORMAT": "json"}).start()
    try:
        sub = d.subscribe("hup")
        assert d.wait_metric("enactive_subscribers", {}, 1) == 1
        conn = d.connect()
        send_frames(conn, range(1, 4))
        assert [m.seq for m in sub.read(3)] == [1, 2, 3]

        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: ignored" in d.output(), "no SIGHUP line in the log")
        assert d.proc.poll() is None
        assert d.http("/readyz") == (200, "ready\n")
        send_frames(conn, range(4, 7))  # still processing
        assert [m.seq for m in sub.read(6)][3:] == [4, 5, 6]

        # A SIGHUP right behind the SIGTERM, during the drain, does not end it either.
        d.close_clients()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.send_signal(signal.SIGHUP)
        assert d.proc.wait(30) == 0
    finally:
        d.kill()
        d._log.close()  # (stop() would close it; the signals were sent by hand)
    assert (d.state / "checkpoint.npz").exists()

    records = [json.loads(line) for line in d.output().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    hup = [r for r in records if r["message"].startswith("SIGHUP: ignored")]
    assert hup and all(r["level"] == "INFO" for r in hup)
    assert "restart" in hup[0]["message"]
    assert any(m.startswith("stopped: 6 frames processed") for m in messages), messages
    assert not [m for m in messages if m.startswith(JAX_NOISE)]


class Manager:
    """A stand-in for systemd: collects what arrives on a NOTIFY_SOCKET, with arrival times."""

    def __init__(self, name: str) -> None:
        self.address = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name[1:])  # the abstract namespace, as `@name` says
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def index(self, assignment: str, timeout: float = 30.0) -> int:
        """Wait for a datagram holding `assignment`; its position among all received."""

        def found() -> bool:
            return any(assignment in m.split("\n") for m in list(self.messages))

        wait_for(found, f"no {assignment} among {self.messages}", timeout)
        return next(i for i, m in enumerate(self.messages) if assignment in m.split("\n"))

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(f"@enactive-test-notify-{os.getpid()}-{tmp_path.name}")
    yield m
    m.close()


def test_sd_notify_status_then_ready_then_stopping(
    tmp_path: Path, compilation_cache: str, manager: Manager
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache, env={"NOTIFY_SOCKET": manager.address})
    d.start()
    try:
        ready = manager.index("READY=1")
        assert d.http("/readyz") == (200, "ready\n")
        before = manager.messages[:ready]
        assert all(m.startswith("STATUS=") for m in before), before
        assert before[0].startswith("STATUS=starting: initialising JAX")
        assert any(m.startswith("STATUS=compiling 3 buckets (1, 8, 64)") for m in before)
        # Ready once the first bucket (the largest) is compiled; the others follow.
        wait_for(
            lambda: any(m.startswith("STATUS=all 3 buckets compiled") for m in manager.messages),
            f"not every bucket compiled: {manager.messages}",
        )
        compiled = [
            re.fullmatch(r"STATUS=compiled bucket +(\d+) \((\d)/3\) in [\d.]+ s", m)
            for m in manager.messages
            if m.startswith("STATUS=compiled bucket")
        ]
        assert [c and (c[1], c[2]) for c in compiled] == [("64", "1"), ("1", "2"), ("8", "3")]
        assert any(re.match(r"STATUS=compiled bucket +64 \(1/3\)", m) for m in before), before
        assert manager.messages[ready].split("\n")[1].startswith("STATUS=ready in ")
        assert d.stop() == 0
    finally:
        d.kill()
    stopping = manager.index("STOPPING=1")
    assert stopping > ready
    assert any(m.startswith("STATUS=stopped: ") for m in manager.messages[stopping:])


# -- in the test's process: /readyz while the buckets compile ----------------------------


@pytest.fixture
def sighup_restored() -> Iterator[None]:
    """`Daemon` ignores SIGHUP for the rest of the process; give the test run its own back."""
    before = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, before)


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


async def test_readyz_reports_compile_progress_then_ready_then_draining(
    tmp_path: Path, compilation_cache: str, sighup_restored: None
) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state", cache=compilation_cache))
    config = load_config(path)
    seen: list[tuple[bool, str]] = []

    def status(line: str) -> None:  # on the event loop, as each bucket becomes usable
        if line.startswith("compiled bucket"):
            seen.append((daemon.ready, daemon.progress()))

    daemon = Daemon(config, status=status, notifier=Notifier(None))
    assert daemon.progress() == "starting"
    async with anyio.create_task_group() as tg:
        ports = await tg.start(daemon.run)
        url = f"http://127.0.0.1:{ports['metrics']}/readyz"
        status_code, body = await anyio.to_thread.run_sync(fetch, url)
        assert status_code == 200 and body.startswith("ready")  # from the first bucket
        for _ in range(1200):  # until the other buckets are compiled too
            if await anyio.to_thread.run_sync(fetch, url) == (200, "ready\n"):
                break
            await anyio.sleep(0.05)
        else:
            raise TimeoutError("buckets still compiling")
        daemon.request_stop()
        assert daemon.progress() == "draining"
    assert len(seen) == 3
    # The daemon is not ready before its first bucket is compiled.
    assert not seen[0][0] and re.fullmatch(r"compiling: 1/3 buckets(, .+)?", seen[0][1])
    for i, (ready, progress) in enumerate(seen, 1):
        if not ready:
            assert progress.startswith(f"compiling: {i}/3 buckets"), seen
        elif i < 3:
            assert progress == f"ready: {i}/3 buckets compiled, compiling the rest", seen
        else:
            assert progress == "ready", seen
