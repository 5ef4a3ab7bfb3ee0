"""What every sink shares: the `Sink` interface, drop reasons, the encoding cache and the
`Chunk` its buffers hold."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from anyio.abc import TaskStatus

from ..buffers import WeightedBuffer
from ..protocol import MomentBatch

__all__ = [
    "DISCONNECTED",
    "SLOW_SINK",
    "SLOW_SUBSCRIBER",
    "WRITE_ERROR",
    "Chunk",
    "EncodingCache",
    "Format",
    "ReliableSink",
    "Sink",
]

SLOW_SUBSCRIBER = "slow_subscriber"
"""A subscriber's buffer was full; the moments were not queued for it."""
DISCONNECTED = "disconnected"
"""A subscriber was cut off (stalled too long, over its byte budget, or its socket
failed); counted once."""
SLOW_SINK = "slow_sink"
"""A file sink's buffer was full; the moments were not queued."""
WRITE_ERROR = "error"
"""A file sink's write failed; the moments of that write are lost."""

Format = Literal["binary", "json"]


class Sink(Protocol):
    """Where integrated moments go: the contract between the integrator and every sink.

    - **`offer(batch)`** is called on the event loop, once per batch of moments, in the
      order the batches were integrated. It never blocks, awaits, does I/O or raises: it
      encodes what it keeps (through the shared `EncodingCache`) and puts it into a
      bounded `WeightedBuffer` (weight = moments, overflow `drop_newest`). What does not
      fit is dropped there and then and counted (a batch larger than the whole buffer is
      taken only into an empty one).
    - **`run(task_status=...)`** does the I/O until cancelled: it opens or binds its
      output, then calls `task_status.started(...)` once (`started(port)` for the
      subscriber server, `started()` otherwise: "ready and bound"), then drains its
      buffer(s). A failure to open or bind raises before `started`, so `tg.start()`
      fails loudly.
    - **Cancellation** is the only way `run` ends. It then flushes what it holds
      (shielded, bounded: what a buffer holds, and at most `FLUSH_S` per subscriber),
      closes what it opened and re-raises the cancellation.
    - **Counting**, through `PipelineEvents`: `emitted(name, n)` once `n` moments were
      written; `sink_dropped(name, reason, n)` for `n` moments that never will be:
      `slow_subscriber` / `slow_sink` (the buffer was full when offered),
      `error` (a file write failed), `disconnected` (a subscriber was cut off; counted
      once per subscriber, n = 1; the moments it still held are not counted, nor are
      those of a subscriber that hangs up, nor those offered after it was cut off).
    - **At most once.** A moment dropped by a slow sink is counted and gone: no retry,
      no back-pressure on the pipeline, and one slow sink or subscriber never delays
      another.
    - **Ordering.** A subscriber (and a file) receives each stream's moments in `seq`
      order, possibly with gaps where moments were dropped; moments of different streams
      interleave in integration order.
    - **`queued`**: moments held now (summed over subscribers), read at scrape time as the
      sink's queue depth; **`buffers`**: each buffer now (one per subscriber for the
      server), for its `statistics()`.
    """

    name: str

    @property
    def queued(self) -> int: ...

    @property
    def buffers(self) -> tuple[WeightedBuffer[Chunk], ...]: ...

    def offer(self, batch: MomentBatch) -> None: ...

    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...


@runtime_checkable
class ReliableSink(Protocol):
    """A sink that never drops (the NATS moments sink): the exceptions to `Sink`'s
    at-most-once rules.

    - **`wait_room(n)`**: the integrator awaits it before offering a batch of `n`
      moments, so a slow or absent destination slows the pipeline (back-pressure) and
      `offer` always has room.
    - **`published(k)`**: returns once every moment of the first `k` batches offered is
      stored at the destination; the executor writes a checkpoint covering `k` batches
      only after it, so an effect on state is never saved without its moment.
    """

    name: str

    async def wait_room(self, n: int) -> None: ...

    async def published(self, batches: int) -> None: ...


class Chunk:
    """Encoded moments in a sink's buffer. The buffer takes (or drops) an empty chunk;
    `data` is filled in only once it was taken, so a dropped batch is never encoded."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""


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
