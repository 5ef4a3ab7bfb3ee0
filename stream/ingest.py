"""The doorway between sources and the pipeline.

Every source (see `stream.sources.base`) decodes bytes into `Frame`s — or, for a read
of like frames, one `FrameRun` — and hands them to one `Ingest`, which admits them (the
per-stream sequence check, `Admission`), returns the rejections to the source so it can
answer its sender, and puts what was admitted into the bounded buffer before the batcher
(bounded in frames: a run weighs its length). It also takes the counts a source must
report. Sources never see metric objects or queues directly.

Overload policies:

- `block`: `await ingest.put(item)` waits while the pipeline is full, so a TCP sender
  is slowed down by TCP's own flow control. Nothing is lost.
- `drop_oldest`: the source keeps its own `WeightedBuffer` ring with overflow
  `drop_oldest` (`Ingest.ring()`), which drops — and counts — the oldest item when full,
  and `Ingest.pump()` moves items from the ring into the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias, TypeVar

import anyio

from .admission import Admission
from .buffers import WeightedBuffer
from .events import PipelineEvents
from .protocol import Dims, Frame, FrameRejected, FrameRun

__all__ = ["Ingest", "Item", "frames_in"]

T = TypeVar("T")
Item: TypeAlias = Frame | FrameRun
"""What goes through the ingest buffer: one frame, or a run of frames."""
_NONE: tuple[FrameRejected, ...] = ()


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
    - `admission`: the sequence check; None admits everything (tests of a source alone).
    """

    def __init__(
        self,
        buffer: WeightedBuffer[Item],
        *,
        dims: Dims,
        max_frame_bytes: int,
        events: PipelineEvents,
        admission: Admission | None = None,
    ) -> None:
        self.buffer = buffer
        self.admission = admission
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

    async def put(self, item: Item) -> Sequence[FrameRejected]:
        """Hand a decoded frame or run to the pipeline, waiting while it is full (`block`).

        **Returns:** the rejections of its frames at admission (already counted), in
        order; empty when every frame was admitted."""
        weight = frames_in(item)
        while not self.buffer.fits(weight):
            await self.buffer.wait_room()
        return self._admit(item)

    def put_nowait(self, item: Item) -> Sequence[FrameRejected] | None:
        """Hand a frame or run over if there is room now: its rejections, as for `put`;
        None (nothing admitted, nothing counted) when there is no room."""
        if not self.buffer.fits(frames_in(item)):
            return None
        return self._admit(item)

    def _admit(self, item: Item) -> Sequence[FrameRejected]:
        admission, buffer = self.admission, self.buffer
        if type(item) is FrameRun:
            if admission is None or admission.run(item):
                buffer.push(item, len(item))
                return _NONE
            rejected = []
            for frame in item.frames():
                why = admission.frame(frame)
                if why is None:
                    buffer.push(frame)
                else:
                    rejected.append(why)
            return rejected
        why = None if admission is None else admission.frame(item)  # type: ignore[arg-type]
        if why is None:
            buffer.push(item)
            return _NONE
        return (why,)

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
            if frame is not None and self.put_nowait(frame) is None:
                await self.put(frame)  # the pipeline is full: wait for room
