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

import collections
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

import anyio

from .admission import Admission
from .alignment import Aligner, Body
from .buffers import WeightedBuffer
from .events import PipelineEvents
from .protocol import Dims, Frame, FrameRejected, FrameRun

__all__ = ["Ingest", "Item", "frames_in"]

T = TypeVar("T")
Item: TypeAlias = Frame | FrameRun
"""What goes through the ingest buffer: one frame, or a run of frames."""
_NONE: tuple[FrameRejected, ...] = ()
PUMP_ITEMS = 1024
"""The most items `Ingest.pump` takes out of a ring at once."""


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
    - `lane`: where frames of streams new to the daemon wait (with every later frame of
        theirs while one is there, so a stream's order holds) until `pump_new_streams`
        lets them into the pipeline, a few per batch: a flood of new stream ids cannot
        crowd out the streams already known. None: no separate lane.
    - `bodies`: bodies joined from several input streams (`stream.alignment`): a frame
        of one of their inputs goes to the `Aligner`, and the body frames it makes go on
        to admission in its place. `run_alignment` must then run beside the sources.

    Waiting for room: a frame that joins a body waits, like any frame, for room for
    itself; the body frames it completes (those of the driving frames waiting for it,
    at most `max_wait` × the driving rate) are taken whatever the bound.
    """

    def __init__(
        self,
        buffer: WeightedBuffer[Item],
        *,
        dims: Dims,
        max_frame_bytes: int,
        events: PipelineEvents,
        admission: Admission | None = None,
        lane: WeightedBuffer[Frame] | None = None,
        bodies: Sequence[Body] = (),
    ) -> None:
        self.buffer = buffer
        self.admission = admission
        self.lane = lane if admission is not None else None
        self._in_lane: collections.Counter[str] = collections.Counter()
        self.dims = dims
        self.max_frame_bytes = max_frame_bytes
        self.events = events
        self.stopped = anyio.Event()
        self.aligner = (
            Aligner(
                bodies,
                dims,
                reject=lambda frame, reason: events.rejected(frame.source, reason),
                late=lambda n: events.dropped("late", n),
                release=self._release,
            )
            if bodies
            else None
        )
        self._aligner_waits = anyio.Event()

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
        target = self.target(item)
        while not target.fits(weight):
            await target.wait_room()
        return self._admit(item)

    def put_nowait(self, item: Item) -> Sequence[FrameRejected] | None:
        """Hand a frame or run over if there is room now: its rejections, as for `put`;
        None (nothing admitted, nothing counted) when there is no room."""
        if not self.target(item).fits(frames_in(item)):
            return None
        return self._admit(item)

    def target(self, item: Item) -> WeightedBuffer[Any]:
        """The buffer `item` would go to now (a run partly new: the lane, the scarcer
        one): where a source that must wait waits for room."""
        lane = self.lane
        if lane is None:
            return self.buffer
        if type(item) is FrameRun:  # the hot path: checks in C, no call per frame
            assert self.admission is not None
            ids, in_lane = item.stream_ids, self._in_lane
            known = self.admission.table.admitted_seq
            fresh = in_lane and not in_lane.keys().isdisjoint(ids)
            return lane if fresh or not all(map(known.__contains__, ids)) else self.buffer
        return lane if self._is_new(item.stream_id) else self.buffer  # type: ignore[union-attr]

    def _is_new(self, stream_id: str) -> bool:
        assert self.admission is not None
        return stream_id in self._in_lane or stream_id not in self.admission.table.admitted_seq

    def _admit(self, item: Item) -> Sequence[FrameRejected]:
        admission, buffer = self.admission, self.buffer
        aligner = self.aligner
        if aligner is not None and aligner.wants(
            item.stream_ids if type(item) is FrameRun else item.stream_id  # type: ignore[union-attr]
        ):
            return self._align(aligner, item)
        if type(item) is FrameRun:
            if admission is None or (
                (not self._in_lane or self._in_lane.keys().isdisjoint(item.stream_ids))
                and admission.run(item)  # known streams only: none is new
            ):
                buffer.push(item, len(item))
                return _NONE
            rejected = []
            for frame in item.frames():
                why = self._admit_frame(frame)
                if why is not None:
                    rejected.append(why)
            return rejected
        why = self._admit_frame(item)  # type: ignore[arg-type]
        return _NONE if why is None else (why,)

    def _admit_frame(self, frame: Frame) -> FrameRejected | None:
        admission = self.admission
        if admission is None:
            self.buffer.push(frame)
            return None
        new = self.lane is not None and self._is_new(frame.stream_id)
        why = admission.frame(frame)
        if why is None:
            if new:
                assert self.lane is not None
                self.lane.push(frame)
                self._in_lane[frame.stream_id] += 1
            else:
                self.buffer.push(frame)
        return why

    def _align(self, aligner: Aligner, item: Item) -> Sequence[FrameRejected]:
        """Frames of a body's inputs to the aligner, the body frames it completes (and
        any other frame of a run) to admission, in order."""
        rejected: list[FrameRejected] = []
        now = time.monotonic_ns()
        frames = item.frames() if isinstance(item, FrameRun) else [item]
        for frame in frames:
            if not aligner.wants(frame.stream_id):
                ready: Sequence[Frame] = (frame,)
            else:
                ready, why = aligner.add(frame, now)
                if why is not None:
                    rejected.append(why)
            for each in ready:
                why = self._admit_frame(each)
                if why is not None:
                    rejected.append(why)
        if aligner.pending:
            self._aligner_waits.set()
        return rejected

    def _release(self, frame: Frame, body_id: str, barrier: int | None) -> None:
        if self.admission is not None:
            self.admission.commits.rejected(frame.source, frame.position, body_id, barrier)

    async def run_alignment(self) -> None:
        """Hand over the body frames whose driving frame has waited its `max_wait`, as
        they fall due, until `stop()`; then every body frame still waiting (call it beside
        the sources; it returns once they have)."""
        aligner = self.aligner
        if aligner is None:
            return
        while not self.stopped.is_set():
            due = aligner.next_due_ns()
            if due is None:
                self._aligner_waits = anyio.Event()
                with anyio.move_on_after(0.1):  # (and look at `stopped` now and then)
                    await self._aligner_waits.wait()
                continue
            delay = (due - time.monotonic_ns()) / 1e9
            if delay > 0:
                await anyio.sleep(delay)
            await self._hand_over(aligner.due(time.monotonic_ns()))

    async def flush_alignment(self) -> None:
        """Hand over every body frame still waiting (once the sources have stopped)."""
        if self.aligner is not None:
            await self._hand_over(self.aligner.flush())

    async def _hand_over(self, frames: Sequence[Frame]) -> None:
        for frame in frames:
            target = self.target(frame)
            while not target.fits(1):
                await target.wait_room()
            self._admit_frame(frame)

    async def pump_new_streams(self, per_batch: int, batch_taken: Callable[[], Any]) -> None:
        """Move frames from the lane into the pipeline, at most `per_batch` before each
        batch the batcher takes (`await batch_taken()`), until the lane is closed and
        empty. A stream's frames keep their order: while one of its frames is in the
        lane, its later ones follow it there."""
        lane, buffer, in_lane = self.lane, self.buffer, self._in_lane
        if lane is None:
            return
        while True:
            moved = 0
            while moved < per_batch:
                try:
                    frame = lane.get_nowait()
                except anyio.WouldBlock:
                    break
                except anyio.EndOfStream:
                    return
                while not buffer.fits(1):
                    await buffer.wait_room()
                buffer.push(frame)
                in_lane[frame.stream_id] -= 1
                if not in_lane[frame.stream_id]:
                    del in_lane[frame.stream_id]
                moved += 1
            if moved == per_batch:
                await batch_taken()  # this much per batch; the rest waits its turn
            else:
                await lane.wait_readable()
                if lane.closed and not len(lane):
                    return

    def ring(self, size: int) -> WeightedBuffer[T]:
        """A `drop_oldest` ring of `size` items for a source that cannot be slowed down;
        each item it drops is counted as one `overload` drop."""
        return WeightedBuffer(size, overflow="drop_oldest", on_drop=self._overload)

    def _overload(self, item: object, weight: int) -> None:
        self.events.dropped("overload", weight)

    async def pump(
        self, ring: WeightedBuffer[T], decode: Callable[[list[T]], Iterable[Item]]
    ) -> None:
        """Move items from `ring` into the pipeline until the ring is closed and empty,
        turning them into frames and runs with `decode` on the way — so the items a full
        ring drops were never decoded: shedding load costs almost nothing.

        Each round takes the oldest item and as many more as the pipeline's buffer has
        room for (at most `PUMP_ITEMS`): `decode(items)` gives what to hand over, in
        order (rejections counted, left out), consumed one at a time as each is handed
        over — a lazy `decode` judges each item as the pipeline stands when it goes in.
        Everything that fits is moved at once, without yielding per item (a pump that
        yields per item falls behind a reader that does not, and the ring then drops
        what the pipeline had room for)."""
        while True:
            try:
                items = [ring.get_nowait()]
            except anyio.WouldBlock:
                await ring.wait_readable()
                continue
            except anyio.EndOfStream:
                return
            more = min(self.buffer.limit - self.buffer.weight, PUMP_ITEMS, len(ring) + 1) - 1
            items += (ring.get_nowait() for _ in range(more))
            for item in decode(items):
                if self.put_nowait(item) is None:
                    await self.put(item)  # the pipeline is full: wait for room
