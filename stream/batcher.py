"""Dynamic batching for stateful streams.

Frames are collected into the *current* batch in arrival order, at most one per stream;
a frame whose stream is already in the current batch is held back (in order) for a later
batch, so every stream's frames are stepped in order. The executor *pulls*: a batch is
handed over when the executor asks for one and the batch is full (the largest compiled
bucket) or its oldest frame has waited `max_wait` since it was received. While the
executor is busy the current batch keeps growing — the next batch forms while this one
computes (the "model instance available" rule of Triton's dynamic batcher).

A `FrameRun` (like frames from one TCP read) whose streams are distinct and neither in
the current batch nor held back joins the batch whole, as one piece: no object per frame
on the hot path. Anything else goes frame by frame, with the same result.

The batcher holds at most `limit` frames, current and held back (one run may take it
past); beyond that it stops receiving, and back-pressure reaches the sources through the
bounded stream before it.

Freshness (`stream.freshness`, per source label): a frame of a `latest` source that
would be held back behind its stream's earlier frames replaces them (they are shed); a
frame of a `max_age` source older than its limit when its batch is handed out is shed. A
frame that starts a session is never shed (the stream's state reset it carries would be
lost).
Shed frames are reported with `on_stale(n)`; each batch's sources, with the age of their
newest frame in it, with `on_age(source, seconds)` (at most ten times a second).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import anyio
import numpy as np

from .buffers import WeightedBuffer
from .freshness import Freshness
from .protocol import SESSION_START, Frame, FrameRun

__all__ = ["Batch", "Batcher"]

AGE_EVERY_NS = 100_000_000
"""How often (at most) the batcher reports its sources' sample ages."""


@dataclasses.dataclass(slots=True)
class Batch:
    """A batch as columns, one row per frame, oldest first.

    - `stream_ids`, `seq`: per row (distinct streams).
    - `timestamp` float64, `present` uint16, `received_ns` int64: `(n,)`.
    - `payloads`: flat float32 arrays whose concatenation is the rows' payloads, row by
        row (a run's block, or a frame's row).
    - `queue_ns` int64 `(n,)`: per row, from receipt to the batcher taking it in.
    - `sources`, `positions`: the source labels and positions of the rows that carry a
        source position, in row order (empty when none does: TCP, UDP, synthetic).
    """

    stream_ids: list[str]
    seq: list[int]
    timestamp: np.ndarray
    present: np.ndarray
    received_ns: np.ndarray
    payloads: list[np.ndarray]
    queue_ns: np.ndarray
    sources: list[str] = dataclasses.field(default_factory=list)
    positions: list[object] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stream_ids)

    @classmethod
    def of(cls, pieces: Sequence[Frame | FrameRun], admitted_ns: Sequence[int]) -> Batch:
        """The batch of these frames and runs, in order; `admitted_ns[i]` is when piece
        `i` entered the batcher."""
        ids: list[str] = []
        seq: list[int] = []
        timestamp: list[float] = []
        present: list[int] = []
        received: list[int] = []
        queue: list[int] = []
        payloads: list[np.ndarray] = []
        sources: list[str] = []
        positions: list[object] = []
        for piece, admitted in zip(pieces, admitted_ns, strict=True):
            if isinstance(piece, FrameRun):
                n = len(piece)
                ids += piece.stream_ids
                seq += piece.seq
                timestamp += piece.timestamp.tolist()
                present += [piece.present] * n
                received += [piece.received_ns] * n
                queue += [admitted - piece.received_ns] * n
                payloads.append(piece.payload.reshape(-1))
                if piece.positions is not None:
                    sources += [piece.source] * n
                    positions += piece.positions
            else:
                ids.append(piece.stream_id)
                seq.append(piece.seq)
                timestamp.append(piece.timestamp)
                present.append(piece.present)
                received.append(piece.received_ns)
                queue.append(admitted - piece.received_ns)
                payloads.append(piece.payload)
                if piece.position is not None:
                    sources.append(piece.source)
                    positions.append(piece.position)
        return cls(
            ids,
            seq,
            np.array(timestamp, np.float64),
            np.array(present, np.uint16),
            np.array(received, np.int64),
            payloads,
            np.array(queue, np.int64),
            sources,
            positions,
        )


class Batcher:
    """**Arguments:**

    - `max_batch`: the largest bucket; a batch never exceeds it (nor, while buckets
        still compile, the largest compiled one: `set_largest_bucket`).
    - `max_wait_s`: how long the oldest frame of a batch may wait for company.
    - `limit`: frames held at most (default 4 × `max_batch`).
    - `clock`: nanosecond clock matching `Frame.received_ns` (default `time.monotonic_ns`).
    - `freshness`: each source label's policy (absent: `all`); `on_stale(n)`: `n` frames
        were shed by it; `on_age(source, seconds)`: see the module's docstring.

    Call `idle(True)` when the device has nothing left to do and `idle(False)` when it
    gets work: while it is idle a waiting batch is handed out at once instead of at its
    deadline (Triton's dynamic batcher: wait for company only while the model instance
    is busy).
    """

    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        *,
        limit: int | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        freshness: Mapping[str, Freshness] | None = None,
        on_stale: Callable[[int], None] = lambda n: None,
        on_age: Callable[[str, float], None] = lambda source, seconds: None,
    ) -> None:
        self.max_batch = max_batch
        self._largest = max_batch
        self._cap = max_batch  # asked for (adaptive batching)
        self._ceiling = max_batch  # the largest bucket compiled so far
        self.max_wait_ns = int(max_wait_s * 1e9)
        self.limit = limit if limit is not None else 4 * max_batch
        self._clock = clock
        self._device_idle = False
        self._pieces: list[Frame | FrameRun] = []  # the current batch, oldest first
        self._admitted: list[int] = []  # when each piece was admitted
        self._ids: set[str] = set()  # its streams
        self._count = 0  # its frames
        self._held: dict[str, collections.deque[tuple[Frame, int]]] = {}
        self._held_count = 0
        self._changed = anyio.Event()
        self._space = anyio.Event()
        self._took = anyio.Event()
        self._ended = False
        policies = freshness or {}
        self._latest = frozenset(k for k, f in policies.items() if f.kind == "latest")
        self._max_age = {k: f.max_age_ns for k, f in policies.items() if f.kind == "max_age"}
        self._on_stale = on_stale
        self._on_age = on_age
        self._aged_ns = 0  # when the ages were last reported

    # -- state ------------------------------------------------------------------------

    def __len__(self) -> int:
        """Frames in the batcher (current batch + held back)."""
        return self._count + self._held_count

    @property
    def ended(self) -> bool:
        return self._ended

    def set_max_wait(self, seconds: float) -> None:
        """Change the deadline online (adaptive batching)."""
        self.max_wait_ns = int(seconds * 1e9)
        self.wake()

    def set_max_batch(self, n: int) -> None:
        """Change the batch cap online (adaptive batching); at most the initial one."""
        self._cap = max(1, min(n, self._largest))
        self.max_batch = min(self._cap, self._ceiling)
        self.wake()

    def set_largest_bucket(self, n: int) -> None:
        """The largest bucket compiled so far: no batch exceeds it (frames beyond it wait
        for the next batch) until it grows, as the other buckets finish compiling."""
        self._ceiling = max(1, min(n, self._largest))
        self.max_batch = min(self._cap, self._ceiling)
        self.wake()

    def idle(self, idle: bool) -> None:
        """The device has nothing left to do (True) or has work again (False)."""
        self._device_idle = idle
        if idle:
            self.wake()

    def wake(self) -> None:
        """Look again whether the current batch is due."""
        self._changed.set()

    def add(self, item: Frame | FrameRun, admitted_ns: int | None = None) -> None:
        """Take one admitted frame or run (never waits; callers respect `has_space`)."""
        now = self._clock() if admitted_ns is None else admitted_ns
        if type(item) is FrameRun:
            self._add_run(item, now)
        else:
            self._add(item, now)  # type: ignore[arg-type]
        self.wake()

    def _add(self, frame: Frame, now: int) -> None:
        stream_id = frame.stream_id
        held = self._held.get(stream_id)
        if held is not None:
            if frame.source in self._latest:  # it replaces what waits before it ...
                kept = [h for h in held if h[0].present & SESSION_START]  # ... but a reset
                if len(kept) < len(held):
                    self._on_stale(len(held) - len(kept))
                    self._held_count -= len(held) - len(kept)
                    held.clear()
                    held.extend(kept)
            held.append((frame, now))
            self._held_count += 1
        elif stream_id in self._ids or self._count >= self.max_batch:
            self._held[stream_id] = collections.deque(((frame, now),))
            self._held_count += 1
        else:
            self._pieces.append(frame)
            self._admitted.append(now)
            self._ids.add(stream_id)
            self._count += 1

    def _add_run(self, run: FrameRun, now: int) -> None:
        ids = run.stream_ids
        room = self.max_batch - self._count
        streams = set(ids)
        if (
            room > 0
            and len(streams) == len(ids)
            and streams.isdisjoint(self._ids)
            and (not self._held or self._held.keys().isdisjoint(streams))
        ):
            # What `_add` would do frame by frame: the first `room` frames join the
            # batch, in order (here as one piece); the rest are held back.
            head = run if len(ids) <= room else run.head(room)
            self._pieces.append(head)
            self._admitted.append(now)
            self._ids.update(head.stream_ids)
            self._count += len(head)
            if head is run:
                return
            rest = range(room, len(ids))
        else:
            rest = range(len(ids))
        for i in rest:
            self._add(run.frame(i), now)

    @property
    def has_space(self) -> bool:
        return len(self) < self.limit

    def end(self) -> None:
        """No more frames will come: flush what is left, then `next_batch` returns None."""
        self._ended = True
        self._took.set()
        self.wake()

    # -- collecting ---------------------------------------------------------------------

    async def collect(self, receive: WeightedBuffer[Frame | FrameRun]) -> None:
        """Take the admitted frames and runs from `receive` until it is closed and empty;
        then `end()`. Each piece's queue time ends when it is taken: the clock is read
        once per drain, not per piece."""
        while True:
            while not self.has_space:
                self._space = anyio.Event()
                await self._space.wait()
            try:
                item = await receive.get()
            except anyio.EndOfStream:
                break
            now = time.monotonic_ns()
            # Take in what is already queued too, without yielding, waking the
            # batch-taker or re-reading the clock per item: once per drain is enough.
            while True:
                if type(item) is FrameRun:
                    self._add_run(item, now)
                else:
                    self._add(item, now)  # type: ignore[arg-type]
                if len(self) >= self.limit:
                    break
                try:
                    item = receive.get_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            self.wake()
        self.end()

    # -- handing out --------------------------------------------------------------------

    def _due_in_s(self) -> float:
        """Seconds until the current batch must close (≤ 0: now; inf: empty)."""
        if not self._pieces:
            return math.inf
        if self._count >= self.max_batch or self._ended or self._device_idle:
            return 0.0
        # Pieces are in age order: held-back (older) frames enter a batch first.
        oldest = self._pieces[0].received_ns
        return (oldest + self.max_wait_ns - self._clock()) / 1e9

    async def wait_take(self) -> None:
        """Return once the next batch has been handed out (or the input has ended)."""
        if not self._ended:
            await self._took.wait()

    def take(self) -> Batch:
        """Hand out the current batch now and start the next one from held-back frames
        (the batch may be empty when a freshness policy shed every frame in it)."""
        self._took.set()
        self._took = anyio.Event()
        if self._max_age:
            self._shed_old()
        self._report_ages()
        batch = Batch.of(self._pieces, self._admitted)
        self._pieces, self._admitted, self._ids, self._count = [], [], set(), 0
        for stream_id in list(self._held):
            if self._count >= self.max_batch:
                break
            held = self._held[stream_id]
            frame, admitted = held.popleft()
            self._pieces.append(frame)
            self._admitted.append(admitted)
            self._ids.add(stream_id)
            self._count += 1
            self._held_count -= 1
            if not held:
                del self._held[stream_id]
        self._space.set()
        return batch

    def _shed_old(self) -> None:
        now, limits = self._clock(), self._max_age
        pieces: list[Frame | FrameRun] = []
        admitted: list[int] = []
        shed = 0
        for piece, at in zip(self._pieces, self._admitted, strict=True):
            limit = limits.get(piece.source)
            if (
                limit is not None
                and now - piece.received_ns > limit
                and not piece.present & SESSION_START  # (its stream's reset is kept)
            ):
                shed += len(piece) if type(piece) is FrameRun else 1
            else:
                pieces.append(piece)
                admitted.append(at)
        if shed:
            self._on_stale(shed)
            self._pieces, self._admitted = pieces, admitted

    def _report_ages(self) -> None:
        now = self._clock()
        if now - self._aged_ns < AGE_EVERY_NS or not self._pieces:
            return
        self._aged_ns = now
        newest: dict[str, int] = {}
        for piece in self._pieces:
            source, received = piece.source, piece.received_ns
            if received > newest.get(source, -1):
                newest[source] = received
        for source, received in newest.items():
            self._on_age(source, max(now - received, 0) / 1e9)

    async def next_batch(self) -> Batch | None:
        """Wait until the current batch is due, then hand it out. None once the input has
        ended and everything was handed out."""
        while True:
            due = self._due_in_s()
            if due <= 0.0:
                batch = self.take()
                if len(batch):
                    return batch
                continue
            if self._ended and not self._pieces:
                return None
            self._changed = anyio.Event()
            with anyio.move_on_after(due):
                await self._changed.wait()
