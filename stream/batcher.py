"""Dynamic batching for stateful streams.

Frames are collected into the *current* batch in arrival order, at most one per stream;
a frame whose stream is already in the current batch is held back (in order) for a later
batch, so every stream's frames are stepped in order. The executor *pulls*: a batch is
handed over when the executor asks for one and the batch is full (the largest bucket) or
its oldest frame has waited `max_wait` since it was received. While the executor is busy
the current batch keeps growing — the next batch forms while this one computes (the
"model instance available" rule of Triton's dynamic batcher).

The batcher holds at most `limit` frames (current + held back); past that it stops
receiving, and back-pressure reaches the sources through the bounded stream before it.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .protocol import Frame

__all__ = ["Batcher"]


class Batcher:
    """**Arguments:**

    - `max_batch`: the largest compiled bucket; a batch never exceeds it.
    - `max_wait_s`: how long the oldest frame of a batch may wait for company.
    - `limit`: frames held at most (default 4 × `max_batch`).
    - `clock`: nanosecond clock matching `Frame.received_ns` (default `time.monotonic_ns`).
    - `idle`: True while the device has nothing to do; then a waiting batch is handed out
        at once instead of at its deadline (Triton's dynamic batcher: wait for company
        only while the model instance is busy). Call `wake()` when it turns True.
    """

    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        *,
        limit: int | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        idle: Callable[[], bool] = lambda: False,
    ) -> None:
        self.max_batch = max_batch
        self._largest = max_batch
        self.max_wait_ns = int(max_wait_s * 1e9)
        self.limit = limit if limit is not None else 4 * max_batch
        self._clock = clock
        self._idle = idle
        self._current: dict[str, Frame] = {}
        self._held: dict[str, collections.deque[Frame]] = {}
        self._held_count = 0
        self._changed = anyio.Event()
        self._space = anyio.Event()
        self._ended = False

    # -- state ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Frames in the batcher (current batch + held back)."""
        return len(self._current) + self._held_count

    @property
    def ended(self) -> bool:
        return self._ended

    def set_max_wait(self, seconds: float) -> None:
        """Change the deadline online (adaptive batching)."""
        self.max_wait_ns = int(seconds * 1e9)
        self.wake()

    def set_max_batch(self, n: int) -> None:
        """Change the batch cap online (adaptive batching); at most the initial one."""
        self.max_batch = max(1, min(n, self._largest))
        self.wake()

    def wake(self) -> None:
        """Look again whether the current batch is due (the device just went idle)."""
        self._changed.set()

    def add(self, frame: Frame) -> None:
        """Take one admitted frame (never waits; callers respect `has_space`)."""
        self._add(frame)
        self.wake()

    def _add(self, frame: Frame) -> None:
        held = self._held.get(frame.stream_id)
        if held is not None:
            held.append(frame)
            self._held_count += 1
        elif frame.stream_id in self._current or len(self._current) >= self.max_batch:
            self._held[frame.stream_id] = collections.deque((frame,))
            self._held_count += 1
        else:
            self._current[frame.stream_id] = frame

    @property
    def has_space(self) -> bool:
        return len(self) < self.limit

    def end(self) -> None:
        """No more frames will come: flush what is left, then `next_batch` returns None."""
        self._ended = True
        self.wake()

    # -- collecting ---------------------------------------------------------------------

    async def collect(
        self,
        receive: MemoryObjectReceiveStream[Frame],
        admit: Callable[[Frame, int], bool] = lambda frame, now_ns: True,
    ) -> None:
        """Receive frames until the stream ends, adding those `admit(frame, now_ns)`
        accepts (`now_ns`: `time.monotonic_ns()` when the frame was taken off the
        stream, read once per drain); then `end()`."""
        async with receive:
            while True:
                while not self.has_space:
                    self._space = anyio.Event()
                    await self._space.wait()
                try:
                    frame = await receive.receive()
                except anyio.EndOfStream:
                    break
                now = time.monotonic_ns()
                if admit(frame, now):
                    self._add(frame)
                # Drain what is already queued without yielding, waking the batch-taker
                # or re-reading the clock per frame: once per drain is soon enough.
                room = self.limit - len(self)
                while room > 0:
                    try:
                        frame = receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    except anyio.EndOfStream:
                        self.end()
                        return
                    if admit(frame, now):
                        self._add(frame)
                        room -= 1
                self.wake()
        self.end()

    # -- handing out --------------------------------------------------------------------

    def _due_in_s(self) -> float:
        """Seconds until the current batch must close (≤ 0: now; inf: empty)."""
        if not self._current:
            return math.inf
        if len(self._current) >= self.max_batch or self._ended or self._idle():
            return 0.0
        # Insertion order is age order: held-back (older) frames enter a batch first.
        oldest = next(iter(self._current.values())).received_ns
        return (oldest + self.max_wait_ns - self._clock()) / 1e9

    def take(self) -> list[Frame]:
        """Hand out the current batch now and start the next one from held-back frames."""
        batch = list(self._current.values())
        self._current = {}
        for stream_id in list(self._held):
            if len(self._current) >= self.max_batch:
                break
            held = self._held[stream_id]
            self._current[stream_id] = held.popleft()
            self._held_count -= 1
            if not held:
                del self._held[stream_id]
        self._space.set()
        return batch

    async def next_batch(self) -> list[Frame] | None:
        """Wait until the current batch is due, then hand it out. None once the input has
        ended and everything was handed out."""
        while True:
            due = self._due_in_s()
            if due <= 0.0:
                return self.take()
            if self._ended and not self._current:
                return None
            self._changed = anyio.Event()
            with anyio.move_on_after(due):
                await self._changed.wait()
