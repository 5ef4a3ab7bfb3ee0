"""Listening and accepting, shared by every server: the ingest, subscriber and HTTP
listeners."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskGroup
from anyio.streams.stapled import MultiListener

__all__ = [
    "ACCEPT_RETRY_S",
    "NO_LIMITS",
    "ConnectionGate",
    "ConnectionLimits",
    "ListenError",
    "accept_forever",
    "listen_tcp",
    "naming_listener",
    "peer_address",
]

log = logging.getLogger(__name__)

ACCEPT_RETRY_S = 0.1
"""Pause after a failed accept (e.g. out of file descriptors) before trying again."""


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one listener allows (0: no limit).

    - `max_connections`: connections open at once, from everyone.
    - `max_per_address`: connections open at once from one client address.
    - `idle_timeout_s`: a connection that sends nothing for this long is closed.
    - `frame_timeout_s`: a frame (or line) begun must be complete within this long, or the
        connection is closed (a sender trickling bytes cannot hold a connection forever).
    """

    max_connections: int = 0
    max_per_address: int = 0
    idle_timeout_s: float = 0.0
    frame_timeout_s: float = 0.0


NO_LIMITS = ConnectionLimits()
"""Nothing limited (tests, and listeners whose limits are not configured)."""


class ConnectionGate:
    """Counts a listener's open connections and refuses those over its limits."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self._by_address: collections.Counter[str] = collections.Counter()

    def enter(self, address: str) -> str | None:
        """Let a connection from `address` in (None), or say which limit refuses it
        (`max_connections`, `max_per_address`); a refused one is not counted as open."""
        limits = self.limits
        if limits.max_connections and self.open >= limits.max_connections:
            return "max_connections"
        if limits.max_per_address and self._by_address[address] >= limits.max_per_address:
            return "max_per_address"
        self.open += 1
        self._by_address[address] += 1
        return None

    def leave(self, address: str) -> None:
        """A connection let in by `enter(address)` has closed."""
        self.open -= 1
        self._by_address[address] -= 1
        if not self._by_address[address]:
            del self._by_address[address]


def peer_address(stream: SocketStream) -> str:
    """The client's address (host only) of a connection, or "" when it has none."""
    try:
        remote = stream.extra(SocketAttribute.remote_address)
    except Exception:  # a stream without one (a Unix socket, a closed socket)
        return ""
    return str(remote[0]) if isinstance(remote, tuple) else str(remote)


class ListenError(OSError):
    """A listener could not bind its address (in use, not available, not permitted)."""


@contextlib.contextmanager
def naming_listener(what: str, host: str, port: int) -> Iterator[None]:
    """Turn a failure to bind inside into a `ListenError` that names the listener (`what`,
    e.g. the configuration key `ingest.tcp`) and its address."""
    try:
        yield
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ListenError(e.errno, f"{what} = {host}:{port}: {reason}") from None


async def listen_tcp(what: str, host: str, port: int) -> MultiListener[SocketStream]:
    """A TCP listener on `host:port` (all its addresses); `ListenError` if it cannot bind."""
    with naming_listener(what, host, port):
        return await anyio.create_tcp_listener(local_host=host, local_port=port)


async def accept_forever(
    listener: SocketListener,
    group: TaskGroup,
    handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
    what: str,
    *,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Accept connections on `listener` and serve each with `handle` in `group`, until
    the listener is closed. A failed accept is logged, reported to `on_error` (e.g. to
    count it) and retried after `ACCEPT_RETRY_S`: running out of file descriptors for a
    moment must not stop the server."""
    while True:
        try:
            stream = await listener.accept()
        except anyio.ClosedResourceError:
            return
        except (OSError, anyio.BrokenResourceError) as e:
            log.warning("%s accept failed; retrying", what, exc_info=True)
            if on_error is not None:
                on_error(e)
            await anyio.sleep(ACCEPT_RETRY_S)
            continue
        group.start_soon(handle, stream)
