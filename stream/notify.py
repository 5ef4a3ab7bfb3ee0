"""The service manager's notification protocol (systemd's `sd_notify`), in a few lines.

systemd (`Type=notify`) passes the path of a datagram socket in `NOTIFY_SOCKET`; the
service sends newline-separated `KEY=value` assignments to it, one datagram each:
`READY=1` once it serves, `STATUS=…` for `systemctl status`, `STOPPING=1` when it begins
to stop. A path that starts with `@` is in Linux's abstract namespace. Without
`NOTIFY_SOCKET` (not under systemd, or `Type=exec`) every call does nothing.

Sending never blocks and never raises: the socket is non-blocking, and a datagram the
manager cannot take at once is dropped (logged at DEBUG) — a status line is not worth a
stall of the event loop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager, when there is one.

    **Arguments:**

    - `address`: the notification socket, as in `NOTIFY_SOCKET` (an absolute path, or
        `@name` for the abstract namespace); `None` or `""` sends nothing.
    """

    def __init__(self, address: str | None) -> None:
        self.address = _socket_address(address or "")
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        elif address:
            log.debug("NOTIFY_SOCKET=%r: not a Unix socket path; not notifying", address)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier for `NOTIFY_SOCKET` (one that sends nothing when it is unset)."""
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self._sock is not None

    def ready(self, status: str = "") -> None:
        """`READY=1` (and `STATUS=status`): start-up is complete, the service serves."""
        self.send("READY=1", *_statuses(status))

    def status(self, text: str) -> None:
        """`STATUS=text`: one line shown by `systemctl status`."""
        self.send(_status(text))

    def stopping(self, status: str = "") -> None:
        """`STOPPING=1` (and `STATUS=status`): the service has begun to stop."""
        self.send("STOPPING=1", *_statuses(status))

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram; true if it was sent."""
        if self._sock is None or self.address is None or not assignments:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:  # full (BlockingIOError), manager gone, no permission
            log.debug("sd_notify to %r failed: %s", self.address, e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a kind of address this module does not speak (vsock:…)


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())  # one line: a newline would start a new key


def _statuses(text: str) -> tuple[str, ...]:
    return (_status(text),) if text else ()
