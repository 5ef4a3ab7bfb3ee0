"""Accepting TCP connections robustly, shared by the ingest and subscriber servers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup

__all__ = ["ACCEPT_RETRY_S", "accept_forever"]

log = logging.getLogger(__name__)

ACCEPT_RETRY_S = 0.1
"""Pause after a failed accept (e.g. out of file descriptors) before trying again."""


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
