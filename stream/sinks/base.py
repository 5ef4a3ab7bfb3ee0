"""What every sink shares: the `Sink` interface, drop reasons and the encoding cache."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Literal, Protocol

from anyio.abc import TaskStatus

from ..protocol import Moment, encode_moment, moment_to_json

__all__ = [
    "DISCONNECTED",
    "SLOW_SINK",
    "SLOW_SUBSCRIBER",
    "WRITE_ERROR",
    "EncodingCache",
    "Format",
    "OnDropped",
    "OnEmitted",
    "Sink",
]

SLOW_SUBSCRIBER = "slow_subscriber"
"""A subscriber's buffer was full; the moment was not queued for it."""
DISCONNECTED = "disconnected"
"""A subscriber was cut off (stalled too long, or its socket failed); counted once."""
SLOW_SINK = "slow_sink"
"""A file sink's buffer was full; the moment was not queued."""
WRITE_ERROR = "error"
"""A file sink's write failed; the moments of that batch are lost."""

Format = Literal["binary", "json"]
OnEmitted = Callable[[str], None]
"""`on_emitted(sink_name)`: one moment delivered."""
OnDropped = Callable[[str, str], None]
"""`on_dropped(sink_name, reason)`: one moment not delivered."""


class Sink(Protocol):
    """Where integrated moments go.

    `offer()` is called on the event loop for every moment and never blocks or awaits:
    a sink whose buffer is full drops the moment and counts it. `run()` does the I/O until
    cancelled, calling `task_status.started(...)` once ready, and on cancellation flushes
    what it holds (shielded, bounded in time).
    """

    name: str

    def offer(self, moment: Moment) -> None: ...

    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...


_ENCODERS: dict[str, Callable[[Moment], bytes]] = {
    "binary": encode_moment,
    "json": moment_to_json,
}


class EncodingCache:
    """The encodings of the last few moments, so each is encoded at most once per format.

    Sinks given the same cache share encodings: the fan-out offers one moment to every
    sink in turn, so a handful of entries suffice. Entries hold the moment itself, so an
    `id()` is never mistaken for a later moment's.

    **Arguments:**

    - `size`: moments remembered.
    """

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._entries: collections.OrderedDict[int, tuple[Moment, dict[str, bytes]]] = (
            collections.OrderedDict()
        )

    def get(self, moment: Moment, fmt: Format) -> bytes:
        """`moment` as a binary record (`"binary"`) or a JSON line (`"json"`)."""
        key = id(moment)
        entry = self._entries.get(key)
        if entry is None or entry[0] is not moment:
            entry = (moment, {})
            self._entries[key] = entry
            self._entries.move_to_end(key)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        encoded = entry[1].get(fmt)
        if encoded is None:
            encoded = entry[1][fmt] = _ENCODERS[fmt](moment)
        return encoded
