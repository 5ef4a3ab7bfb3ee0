"""Moment subscribers of a real daemon process that misbehave: too many of them, and ones
that never read. A reading subscriber must not notice them.

Loopback only; every loop is bounded in count and time; the test prints its figures."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream.protocol import encode_frame, encode_moment

from .daemon import DaemonProcess, payload, sockets, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.reliability]

LIMITED = "enactive_connections_limited_total"
DROPPED = "enactive_moments_dropped_total"
PENDING_BYTES = 64 << 10
LIMITS = {
    "ENACTIVE_OUTPUT_MAX_SUBSCRIBERS": "6",
    "ENACTIVE_OUTPUT_MAX_SUBSCRIBERS_PER_ADDRESS": "4",
    "ENACTIVE_OUTPUT_SUBSCRIBER_MAX_PENDING_BYTES": str(PENDING_BYTES),
    "ENACTIVE_OUTPUT_SUBSCRIBER_SOCKET_BUFFER_BYTES": str(16 << 10),
}


@pytest.fixture
def daemon(tmp_path: Path, compilation_cache: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, compilation_cache, env=LIMITS).start()
    yield d
    d.kill()


def subscriber(d: DaemonProcess, source: str, held: list[socket.socket]) -> socket.socket:
    """A `SUB binary *` connection from `source` (a loopback address) with a small receive
    buffer, that the test does not read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", d.ports["output"]))
    sock.sendall(b"SUB binary *\n")
    return sock


def answer(sock: socket.socket) -> bytes:
    """What the daemon sends until it closes (at most 4 KiB)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while len(data) < 4096 and (more := sock.recv(4096)):
            data += more
    return data


def count(d: DaemonProcess, name: str, **labels: str) -> float:
    return d.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def test_too_many_and_unread_subscribers_do_not_hurt_a_reader(daemon: DaemonProcess) -> None:
    d = daemon
    reader = d.subscribe("*")
    assert d.wait_metric("enactive_subscribers", {}, 1) == 1
    with sockets() as held:
        idle = [subscriber(d, "127.0.0.1", held) for _ in range(3)]  # 4 from 127.0.0.1
        assert answer(subscriber(d, "127.0.0.1", held)) == b"ERR too many subscribers\n"
        idle += [subscriber(d, "127.0.0.2", held) for _ in range(2)]  # 6 in all
        assert d.wait_metric("enactive_subscribers", {}, 6) == 6
        assert answer(subscriber(d, "127.0.0.3", held)) == b"ERR too many subscribers\n"
        assert count(d, LIMITED, listener="output.tcp", reason="max_per_address") == 1
        assert count(d, LIMITED, listener="output.tcp", reason="max_connections") == 1

        # 3,000 moments (~0.5 MB for each subscriber): the five that never read go over
        # their byte budget and are cut off; the reader gets every moment, in order.
        streams = [f"s-{i:03d}" for i in range(300)]
        rng = np.random.default_rng(0)
        conn = d.connect()
        started = time.perf_counter()
        for seq in range(1, 11):  # the reader keeps up: it reads each round as it comes
            conn.sendall(
                b"".join(encode_frame(s, seq, seq * 0.01, **payload(rng)) for s in streams)
            )
            moments = reader.read(300 * seq)
        elapsed = time.perf_counter() - started
        assert [m.seq for m in moments if m.stream_id == "s-007"] == list(range(1, 11))
        assert len({(m.stream_id, m.seq) for m in moments}) == 3000
        total = sum(len(encode_moment(m)) for m in moments)  # bytes for each subscriber
        disconnected = d.wait_metric(DROPPED, {"sink": "tcp", "reason": "disconnected"}, 5)
        assert disconnected == 5
        wait_for(lambda: count(d, "enactive_subscribers") == 1, "the five cut off")
        for sock in idle:  # reset, after no more than the kernels held for it
            assert len(answer(sock)) < total // 2

        # Their places are free again.
        again = subscriber(d, "127.0.0.3", held)
        assert d.wait_metric("enactive_subscribers", {}, 2) == 2
        again.close()
        metrics = d.metrics()
        assert metrics[("enactive_frames_processed_total", ())] == 3000
        slow = metrics[(DROPPED, (("reason", "slow_subscriber"), ("sink", "tcp")))]
    print(
        f"reader got 3000 moments ({total} B) in {elapsed:.2f} s beside 5 unread subscribers; "
        f"{int(disconnected)} cut off over {PENDING_BYTES} B, {int(slow)} moments lost by them; "
        f"refused: 1 max_per_address, 1 max_connections"
    )
