"""The doorway between sources and the pipeline.

Every source (TCP, UDP, synthetic, brokers) decodes bytes into `Frame`s — or, for a TCP
read of like frames, one `FrameRun` — and hands them to one `Ingest`, which owns the
stream into the admission stage, its bound in frames, and the counters a source must
touch. Sources never see metrics objects or queues directly.

Overload policies:

- `block`: `await ingest.put(item)` waits while the pipeline is full, so a TCP sender
  is slowed down by TCP's own flow control. Nothing is lost.
- `drop_oldest`: the source keeps its own bounded ring (`DropOldest`), dropping — and
  counting — the oldest frame when it is full, and a pump task `put`s from the ring.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, TypeAlias, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .protocol import Dims, Frame, FrameRun

__all__ = ["DropOldest", "Ingest", "Item", "frames_in"]

T = TypeVar("T")
Item: TypeAlias = Frame | FrameRun
"""What goes through the ingest stream: one frame, or a run of frames."""


def frames_in(item: object) -> int:
    """Frames an item stands for: a run's length, else 1 (a frame, or a rejection)."""
    return len(item) if type(item) is FrameRun else 1


class Ingest:
    """What a source hands frames to.

    **Arguments:**

    - `send`: the stream into the admission stage, shared by all sources (the daemon
        closes it once every source has stopped). Its buffer must not be bounded: `limit`
        bounds it, in frames, and the receiver reports what it took with `taken(n)`.
    - `limit`: frames the stream holds at most (`ingest.queue`); a run is never split,
        so one run may take it past the limit while it was below.
    - `dims`: the configured modality sizes, for decoding.
    - `max_frame_bytes`: the configured frame size limit, for decoding.
    - `on_received(source, n)`, `on_rejected(source, reason)`, `on_dropped(reason, n)`:
        counters. A source calls `ingest.received(source)` for every frame that arrives,
        whether it then decodes, is rejected or is dropped, so that
        received = processed + rejected + dropped.
    """

    def __init__(
        self,
        send: MemoryObjectSendStream[Item],
        *,
        limit: int,
        dims: Dims,
        max_frame_bytes: int,
        on_received: Callable[[str, int], None] = lambda source, n: None,
        on_rejected: Callable[[str, str], None] = lambda source, reason: None,
        on_dropped: Callable[[str, int], None] = lambda reason, n: None,
    ) -> None:
        self._send = send
        self.limit = limit
        self.queued = 0  # frames in the stream
        self._room = anyio.Event()
        self.dims = dims
        self.max_frame_bytes = max_frame_bytes
        self._on_received = on_received
        self.rejected = on_rejected
        self._on_dropped = on_dropped
        self.stopped = anyio.Event()

    def received(self, source: str, n: int = 1) -> None:
        """Count `n` frames that arrived from `source`."""
        self._on_received(source, n)

    def dropped(self, reason: str, n: int = 1) -> None:
        """Count `n` frames dropped for `reason` (e.g. `overload`)."""
        self._on_dropped(reason, n)

    @property
    def accepting(self) -> bool:
        """False once `stop()` was called: sources stop taking new data."""
        return not self.stopped.is_set()

    def stop(self) -> None:
        """Tell every source to stop taking new data (the daemon is shutting down)."""
        self.stopped.set()

    async def put(self, item: Item) -> None:
        """Hand a decoded frame or run to the pipeline, waiting while it is full (`block`)."""
        while not self.put_nowait(item):
            if self._room.is_set():
                self._room = anyio.Event()
            await self._room.wait()

    def put_nowait(self, item: Item) -> bool:
        """Hand a frame or run over if there is room now; False (nothing counted) if not."""
        if self.queued >= self.limit:
            return False
        self._send.send_nowait(item)
        self.queued += frames_in(item)
        return True

    def taken(self, n: int) -> None:
        """The receiver took `n` frames off the stream."""
        self.queued -= n
        if self.queued < self.limit:
            self._room.set()


class DropOldest(Generic[T]):
    """A bounded ring for sources that cannot be slowed down (UDP, LSL).

    `push()` never waits: when the ring is full the oldest item is dropped and counted as
    `overload`. `run()` pumps items into the ingest (waiting while it is full), turning
    each into a frame with `decode` on the way — so under overload the items that are
    dropped were never decoded: shedding load costs almost nothing, and the CPU goes to
    the frames the pipeline can take. `decode` returns None for an item it rejected (and
    counted); by default items are frames already.
    """

    def __init__(
        self, ingest: Ingest, size: int, decode: Callable[[T], Frame | None] | None = None
    ) -> None:
        self._ingest = ingest
        self._ring: collections.deque[T] = collections.deque()
        self._size = size
        self._decode: Callable[[T], Frame | None] = decode or (lambda item: item)  # type: ignore[assignment,return-value]
        self._ready = anyio.Event()

    def push(self, item: T) -> None:
        if len(self._ring) >= self._size:
            self._ring.popleft()
            self._ingest.dropped("overload")
        self._ring.append(item)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._ring)

    async def run(self) -> None:
        """Forward items to the ingest until cancelled: everything that fits at once,
        without yielding per item (a pump that yields per item falls behind a reader that
        does not, and the ring then drops what the pipeline had room for)."""
        ring, ingest, decode = self._ring, self._ingest, self._decode
        while True:
            if not ring:
                self._ready = anyio.Event()
                await self._ready.wait()
                continue
            while ring:
                frame = decode(ring.popleft())
                if frame is not None and not ingest.put_nowait(frame):
                    await ingest.put(frame)  # the pipeline is full: wait for room
                    break
