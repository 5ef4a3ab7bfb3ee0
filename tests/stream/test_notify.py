"""sd_notify: datagrams to `NOTIFY_SOCKET`, nothing without it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.notify import Notifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for systemd: a datagram socket in the abstract namespace."""
    name = f"@enactive-test-{os.getpid()}-{tmp_path.name}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(5)
    yield sock, name
    sock.close()


def test_ready_status_stopping_arrive_as_datagrams(manager: tuple[socket.socket, str]) -> None:
    sock, name = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": name})
    assert notifier.enabled
    notifier.status("compiled bucket     8 (2/3)\nin 0.1 s")
    notifier.ready("ready in 1.0 s")
    notifier.stopping()
    notifier.close()
    got = [sock.recv(4096).decode() for _ in range(3)]
    assert got == [
        "STATUS=compiled bucket 8 (2/3) in 0.1 s",
        "READY=1\nSTATUS=ready in 1.0 s",
        "STOPPING=1",
    ]
    assert not notifier.send("STATUS=closed")


def test_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path))
        assert notifier.send("READY=1")
        assert sock.recv(64) == b"READY=1"
        notifier.close()


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/path"])
def test_without_a_usable_socket_nothing_is_sent(value: str | None) -> None:
    notifier = Notifier(value)
    assert not notifier.enabled
    assert not notifier.send("READY=1")
    notifier.ready()
    notifier.close()


def test_a_manager_that_went_away_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert not notifier.send("READY=1")  # ENOENT: dropped, not raised
    notifier.close()
