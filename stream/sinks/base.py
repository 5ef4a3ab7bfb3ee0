"""What every sink shares: the `Sink` interface, drop reasons and the encoding cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol

from anyio.abc import TaskStatus

from ..protocol import MomentBatch

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
"""A subscriber's buffer was full; the moments were not queued for it."""
DISCONNECTED = "disconnected"
"""A subscriber was cut off (stalled too long, or its socket failed); counted once."""
SLOW_SINK = "slow_sink"
"""A file sink's buffer was full; the moments were not queued."""
WRITE_ERROR = "error"
"""A file sink's write failed; the moments of that write are lost."""

Format = Literal["binary", "json"]
OnEmitted = Callable[[str, int], None]
"""`on_emitted(sink_name, n)`: `n` moments delivered."""
OnDropped = Callable[[str, str, int], None]
"""`on_dropped(sink_name, reason, n)`: `n` moments not delivered."""


class Sink(Protocol):
    """Where integrated moments go.

    `offer()` is called on the event loop for every batch of moments and never blocks or
    awaits: a sink whose buffer is full drops them and counts them. `run()` does the I/O
    until cancelled, calling `task_status.started(...)` once ready, and on cancellation
    flushes what it holds (shielded, bounded in time).
    """

    name: str

    def offer(self, batch: MomentBatch) -> None: ...

    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...


class EncodingCache:
    """The whole-batch encodings of the latest batch, so sinks that share this cache encode
    a batch at most once per format (subsets of a batch are encoded by whoever wants them).
    """

    def __init__(self) -> None:
        self._batch: MomentBatch | None = None
        self._encoded: dict[str, bytes] = {}

    def get(self, batch: MomentBatch, fmt: Format) -> bytes:
        """All of `batch` as binary records (`"binary"`) or JSON lines (`"json"`)."""
        if batch is not self._batch:
            self._batch, self._encoded = batch, {}
        encoded = self._encoded.get(fmt)
        if encoded is None:
            encoded = self._encoded[fmt] = encode(batch, fmt)
        return encoded


def encode(batch: MomentBatch, fmt: Format, rows: list[int] | None = None) -> bytes:
    """`rows` of `batch` (default all) in format `fmt`."""
    return batch.encode_binary(rows) if fmt == "binary" else batch.encode_json(rows)
