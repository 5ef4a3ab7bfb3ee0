"""Noticing that the daemon has stopped accepting new data."""

from __future__ import annotations

import anyio

from ..ingest import Ingest

POLL_S = 0.05
"""How often `ingest.accepting` is looked at, in seconds."""


async def wait_not_accepting(ingest: Ingest) -> None:
    """Return once `ingest.accepting` is false (the daemon is shutting down)."""
    # `Ingest.accepting` is a plain flag set by the daemon, so it is polled.
    while ingest.accepting:  # noqa: ASYNC110
        await anyio.sleep(POLL_S)
