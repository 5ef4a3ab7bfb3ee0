"""The doorway between sources and the pipeline.

Every source (see `stream.sources.base`) decodes bytes into `Frame`s — or, for a read
of like frames, one `FrameRun` — and hands them to one `Ingest`, which owns the bounded
buffer into the admission stage (bounded in frames: a run weighs its length) and the
counts a source must report. Sources never see metric objects or queues directly.

Overload policies:

- `block`: `await ingest.put(item)` waits while the pipeline is full, so a TCP sender
  is slowed down by TCP's own flow control. Nothing is lost.
- `drop_oldest`: the source keeps its own `WeightedBuffer` ring with overflow
  `drop_oldest` (`Ingest.ring()`), which drops — and counts — the oldest item when full,
  and `Ingest.pump()` moves items from the ring into the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias, TypeVar

import anyio

from .buffers import WeightedBuffer
from .events import PipelineEvents
from .protocol import Dims, Frame, FrameRun

__all__ = ["Ingest", "Item", "frames_in"]

T = TypeVar("T")
Item: TypeAlias = Frame | FrameRun
"""What goes through the ingest buffer: one frame, or a run of frames."""


def frames_in(item: object) -> int:
    """Frames an item stands for: a run's length, else 1 (a frame, or a rejection)."""
    return len(item) if type(item) is FrameRun else 1


class Ingest:
    """What a source hands frames to.

    **Arguments:**

    - `buffer`: the buffer into the admission stage, shared by all sources, bounded in
        frames (`ingest.queue`) with overflow `block`; the pipeline closes it once every
        source has stopped.
    - `dims`: the configured modality sizes, for decoding.
    - `max_frame_bytes`: the configured frame size limit, for decoding.
    - `events`: where `received`, `rejected` and `dropped` are reported. A source
        reports every frame that arrives, whether it then decodes, is rejected or is
        dropped, so that received = processed + rejected + dropped.
    """

    def __init__(
        self,
        buffer: WeightedBuffer[Item],
        *,
        dims: Dims,
        max_frame_bytes: int,
        events: PipelineEvents,
    ) -> None:
        self.buffer = buffer
        self.dims = dims
        self.max_frame_bytes = max_frame_bytes
        self.events = events
        self.stopped = anyio.Event()

    def received(self, source: str, n: int = 1) -> None:
        """Count `n` frames that arrived from `source`."""
        self.events.received(source, n)

    def rejected(self, source: str, reason: str) -> None:
        """Count one frame from `source` rejected for `reason`."""
        self.events.rejected(source, reason)

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count `n` frames dropped for `reason` (e.g. `overload`)."""
        self.events.dropped(reason, n)

    @property
    def accepting(self) -> bool:
        """False once `stop()` was called: sources stop taking new data."""
        return not self.stopped.is_set()

    def stop(self) -> None:
        """Tell every source to stop taking new data (the daemon is shutting down)."""
        self.stopped.set()

    async def put(self, item: Item) -> None:
        """Hand a decoded frame or run to the pipeline, waiting while it is full (`block`)."""
        await self.buffer.put(item, frames_in(item))

    def put_nowait(self, item: Item) -> bool:
        """Hand a frame or run over if there is room now; False (nothing counted) if not."""
        return self.buffer.put_nowait(item, frames_in(item))

    def ring(self, size: int) -> WeightedBuffer[T]:
        """A `drop_oldest` ring of `size` items for a source that cannot be slowed down;
        each item it drops is counted as one `overload` drop."""
        return WeightedBuffer(size, overflow="drop_oldest", on_drop=self._overload)

    def _overload(self, item: object, weight: int) -> None:
        self.events.dropped("overload", weight)

    async def pump(self, ring: WeightedBuffer[T], decode: Callable[[T], Item | None]) -> None:
        """Move items from `ring` into the pipeline until the ring is closed and empty,
        turning each into a frame with `decode` on the way (None: it was rejected and
        counted) — so the items a full ring drops were never decoded: shedding load costs
        almost nothing. Everything that fits is moved at once, without yielding per item
        (a pump that yields per item falls behind a reader that does not, and the ring
        then drops what the pipeline had room for)."""
        while True:
            try:
                item = ring.get_nowait()
            except anyio.WouldBlock:
                await ring.wait_readable()
                continue
            except anyio.EndOfStream:
                return
            frame = decode(item)
            if frame is not None and not self.put_nowait(frame):
                await self.put(frame)  # the pipeline is full: wait for room
