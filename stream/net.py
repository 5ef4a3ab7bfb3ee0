"""Listening and accepting, shared by every server: the ingest, subscriber and HTTP
listeners."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup
from anyio.streams.stapled import MultiListener

__all__ = ["ACCEPT_RETRY_S", "ListenError", "accept_forever", "listen_tcp", "naming_listener"]

log = logging.getLogger(__name__)

ACCEPT_RETRY_S = 0.1
"""Pause after a failed accept (e.g. out of file descriptors) before trying again."""


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
) -> None:
    """Accept connections on `listener` and serve each with `handle` in `group`, until
    the listener is closed. A failed accept is logged and retried: running out of file
    descriptors for a moment must not stop the server."""
    while True:
        try:
            stream = await listener.accept()
        except anyio.ClosedResourceError:
            return
        except (OSError, anyio.BrokenResourceError):
            log.warning("%s accept failed; retrying", what, exc_info=True)
            await anyio.sleep(ACCEPT_RETRY_S)
            continue
        group.start_soon(handle, stream)
