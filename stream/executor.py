"""The device executor: turns batches of frames into records on the device.

It owns the device-resident state slab. For each batch it asks the stream table for
slots (evicting idle streams to the host, restoring returning ones), packs the frames'
payloads into one float32 array and their slots/flags into one int32 array, and
dispatches the batch's compiled bucket without waiting for it: the call only enqueues
the step and the copy of its records (~50 µs, on the event loop: cheaper than a trip
to a worker thread and back), then the device computes while the loop keeps receiving,
the batcher forms the next batch and the integrator waits for the records. A bucket
that fell back to eager execution runs in a worker thread instead (it takes tens of ms).
It tells the batcher when the device has work and when it has none left
(`Batcher.idle`). A checkpoint enqueues a copy of the occupied slab rows between two
batches, like a step, and reads it back and writes it in the background; once it is
durable, the source positions it covers are committed (`CommitLog`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import jax
import numpy as np
from anyio.streams.memory import MemoryObjectSendStream

from processors import FLAG_RESET, FLAG_VALID, SlabSnapshot, SlabStep

from .batcher import Batch, Batcher
from .commits import CommitLog, Cut
from .events import PipelineEvents
from .protocol import ALL_PRESENT, SESSION_START
from .streams import SlotPlan, StreamTable

__all__ = ["Executor", "Stepped"]

OUTPUTS_WAIT_S = 10.0
"""How long a checkpoint waits for reliable sinks to store the moments it covers before
it is given up (and tried again at the next interval)."""


@dataclasses.dataclass(slots=True)
class Stepped:
    """One batch after the device step.

    - `batch`: the batch's frames, as columns, in row order.
    - `records`: float32 `(bucket, K+D+P+M+3)` on the device, possibly still being
        computed (its copy to the host is under way); rows past `len(batch)` are padding.
    - `eager`: True when the eager fallback produced the records.
    - `restored`: per frame, True when its stream's state came from a checkpoint.
    - `taken_ns`: when the batch left the batcher.
    """

    batch: Batch
    records: jax.Array
    eager: bool
    restored: list[bool]
    taken_ns: int


class Executor:
    """**Arguments:**

    - `step`: the compiled `SlabStep`.
    - `table`: the `StreamTable` (its capacity equals the slab's).
    - `slab`: the initial (fresh or restored) device slab.
    - `events`: where batches, evictions, restores and checkpoints are reported.
    - `commits`: the source positions waiting for a durable checkpoint.
    - `checkpoint`: `checkpoint(rows, table)` writes a checkpoint (called in a worker
        thread); None disables checkpoints, and then positions are committed as soon as
        their batch is dispatched.
    - `checkpoint_interval_s`: at most this long between checkpoints while frames flow.
    - `reset_on_session_start`: a frame that starts a new session of its stream
        (`SESSION_START`) steps from a fresh state (True) or from the stream's state.
    - `stream_ttl_s`: a stream not stepped for this long is forgotten at the next
        checkpoint (0: never), so the stream table never fills for good.
    - `checkpoint_positions`: a checkpoint is taken as soon as this many source positions
        wait for one (0: only by the interval), so a broker's limit on unacknowledged
        messages is never reached.
    - `outputs_stored(k)`: returns once the moments of the first `k` batches dispatched
        are stored by every reliable sink; a checkpoint covering `k` batches is written
        only after it (None: no reliable sink).
    - `on_batch(batch)`: awaited with each batch before it is stepped, in step order (the
        recorder, `stream.recording`); while it waits, the pipeline waits (None: none).
    """

    def __init__(
        self,
        step: SlabStep,
        table: StreamTable,
        slab: Any,
        *,
        events: PipelineEvents,
        commits: CommitLog,
        checkpoint: Callable[[Any, StreamTable], Any] | None = None,
        checkpoint_interval_s: float = 5.0,
        reset_on_session_start: bool = True,
        stream_ttl_s: float = 0.0,
        checkpoint_positions: int = 0,
        outputs_stored: Callable[[int], Awaitable[None]] | None = None,
        on_batch: Callable[[Batch], Awaitable[None]] | None = None,
    ) -> None:
        self._on_batch = on_batch
        self._pressure = checkpoint_positions
        self._outputs_stored = outputs_stored
        self.dispatched = 0  # batches dispatched so far
        self._ttl_ns = int(stream_ttl_s * 1e9)
        self._reset_on_start = reset_on_session_start
        self.step = step
        self.table = table
        self.slab = slab
        self._checkpoint = checkpoint
        self._interval_ns = int(checkpoint_interval_s * 1e9)
        self._events = events
        self._commits = commits
        self._limiter = anyio.CapacityLimiter(1)
        self._next_checkpoint = time.monotonic_ns() + self._interval_ns
        self.pending = 0  # batches dispatched whose records the integrator has not taken
        self._batcher: Batcher | None = None
        self._idle: anyio.CancelScope | None = None  # waiting for a batch, nothing to save
        self._dirty_since: int | None = None  # oldest effect in no checkpoint taken yet
        self._writing_since: int | None = None  # oldest effect in the one being written
        self._writing: anyio.Event | None = None  # set while no checkpoint write runs
        self._background: anyio.abc.TaskGroup | None = None

    def _assemble(self, batch: Batch, plan: SlotPlan) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        bucket = self.step.bucket_for(n)  # compiled ones only
        if n > bucket:  # the batcher keeps batches within the largest compiled bucket
            raise RuntimeError(f"a batch of {n} frames exceeds the compiled buckets")
        x = np.zeros((bucket, self.step.input_width), np.float32)
        meta = np.zeros((bucket, 2), np.int32)
        # Straight into `x` (a C-contiguous view): ~3× cheaper than `np.stack` of the rows.
        np.concatenate(batch.payloads, out=x[:n].reshape(-1))
        meta[:n, 0] = plan.slots
        meta[:n, 1] = batch.present & ALL_PRESENT
        meta[:n, 1] |= FLAG_VALID
        meta[:n, 1][np.asarray(plan.fresh, bool)] |= FLAG_RESET
        if self._reset_on_start:
            meta[:n, 1][batch.present & SESSION_START != 0] |= FLAG_RESET
        return x, meta

    def _dispatch(self, x: np.ndarray, meta: np.ndarray) -> tuple[jax.Array, bool]:
        """Enqueue the step and the copy of its records back to the host, without waiting
        for either (the integrator waits for the records)."""
        self.slab, records, eager = self.step(self.slab, x, meta)
        records.copy_to_host_async()
        return records, eager

    def _move(self, plan: SlotPlan) -> Any:
        """Runs in the worker thread: read evicted streams back to the host (waiting for
        the steps before) — all of them in one gather and one copy, however many a batch
        of new streams evicts — then write returning streams into their slots. Returns
        the evicted rows (None: none)."""
        rows = None
        if plan.evict:
            rows = self.step.snapshot(self.slab, [slot for slot, _ in plan.evict]).to_host()
        for slot, state in plan.restore:
            self.slab = self.step.write_slot(self.slab, slot, state)
        return rows

    async def run(self, batcher: Batcher, send: MemoryObjectSendStream[Stepped]) -> None:
        """Step batches until the batcher is drained, then write a final checkpoint.

        Steps are dispatched without waiting for the device: while one computes, the next
        batch is planned and queued behind it, so the device never idles on the host. The
        bounded `send` stream limits how many batches are in flight.
        """
        table, events = self.table, self._events
        self._writing = anyio.Event()
        self._writing.set()
        self._batcher = batcher
        batcher.idle(self.pending == 0)
        async with send, anyio.create_task_group() as self._background:
            while (batch := await self._next_batch(batcher)) is not None:
                if self._on_batch is not None:  # (recording: every frame, before its step)
                    await self._on_batch(batch)
                taken = time.monotonic_ns()
                n = len(batch)
                stream_ids = batch.stream_ids
                plan = table.plan(stream_ids)
                table.stepped(stream_ids, taken)
                x, meta = self._assemble(batch, plan)
                if plan.evict or plan.restore:
                    rows = await anyio.to_thread.run_sync(self._move, plan, limiter=self._limiter)
                    if plan.evict:
                        table.evicted_states([stream_id for _, stream_id in plan.evict], rows)
                        events.evicted(len(plan.evict))
                    if plan.restore:
                        events.restored(len(plan.restore))
                if len(x) in self.step.eager_buckets:  # runs, not enqueues: off the loop
                    records, eager = await anyio.to_thread.run_sync(
                        self._dispatch, x, meta, limiter=self._limiter
                    )
                else:
                    records, eager = self._dispatch(x, meta)
                self.pending += 1
                if self.pending == 1:
                    batcher.idle(False)
                table.processed_seq.update(zip(stream_ids, batch.seq, strict=True))
                if batch.positions:
                    self._commits.applied(batch.sources, batch.positions)
                restored = [False] * n
                if table.restored:
                    for i, stream_id in enumerate(stream_ids):
                        if stream_id in table.restored:
                            table.restored.discard(stream_id)
                            restored[i] = True
                if self._dirty_since is None:
                    self._dirty_since = taken
                events.batch(len(x), n, batch.queue_ns / 1e9, (taken - batch.received_ns) / 1e9)
                self.dispatched += 1
                await send.send(Stepped(batch, records, eager, restored, taken))
                if time.monotonic_ns() >= self._next_checkpoint or (
                    self._pressure and len(self._commits) >= self._pressure
                ):
                    await self.checkpoint()
            await self.checkpoint(final=True)

    async def _next_batch(self, batcher: Batcher) -> Batch | None:
        """The next batch. While none comes, a checkpoint that falls due is written all
        the same, so effects never stay unsaved for long while the daemon is idle — and
        so is one for the position of a frame rejected meanwhile (a redelivery of what was
        applied already): nothing is stepped for it, yet it is committed only by one."""
        while True:
            if self._checkpoint is None:
                self._commits.commit(self._commits.cut(self.table.processed_seq))
            if self._checkpoint is None or not (self._unsaved or len(self._commits)):
                with anyio.CancelScope() as self._idle:  # (`positions_waiting` cancels)
                    try:
                        return await batcher.next_batch()
                    finally:
                        self._idle = None
                continue
            wait_s = (self._next_checkpoint - time.monotonic_ns()) / 1e9
            with anyio.move_on_after(max(wait_s, 0.0)):
                return await batcher.next_batch()
            # Idle past the interval: checkpoint now (or, while one is being written,
            # try again one interval later).
            self._next_checkpoint = time.monotonic_ns() + self._interval_ns
            await self.checkpoint()

    @property
    def _unsaved(self) -> bool:
        """Some effect on state is in no checkpoint taken yet."""
        return self._dirty_since is not None

    def _failed(self, cut: Cut, message: str) -> None:
        """Nothing of this checkpoint was saved: the next one covers it."""
        if self._writing_since is not None:
            since = [t for t in (self._dirty_since, self._writing_since) if t is not None]
            self._dirty_since, self._writing_since = min(since), None
        self._commits.retry(cut)
        self._events.checkpoint_failed(message)

    def unsaved_age_s(self) -> float:
        """Seconds since the oldest effect on state that no durable checkpoint holds yet
        (0 when every effect is saved)."""
        oldest = [t for t in (self._dirty_since, self._writing_since) if t is not None]
        return (time.monotonic_ns() - min(oldest)) / 1e9 if oldest else 0.0

    def positions_waiting(self) -> None:
        """A rejected frame's position waits for a checkpoint: stop waiting for a batch
        with nothing to save, so that one comes though no batch does."""
        if self._idle is not None:
            self._idle.cancel()

    def finished(self) -> None:
        """The integrator took one batch's records: when none is left on the device, tell
        the batcher, so a waiting batch need not wait for its deadline."""
        self.pending -= 1
        if self.pending == 0 and self._batcher is not None:
            self._batcher.idle(True)

    async def checkpoint(self, *, final: bool = False) -> None:
        """Write a checkpoint if anything changed since the last one.

        Nothing here waits for the device: the stream table is copied and a copy of its
        streams' slab rows is enqueued behind the steps already dispatched (the slab
        itself is donated to the next step); the rows are read back and the file written
        in the background while batches flow on (one write at a time: while one runs, the
        next waits for a later batch). The final checkpoint at shutdown is written before
        this returns.

        A failed write (disk full, directory gone) is reported (`checkpoint_failed`) and
        retried at the next interval: the service goes on. Only the final checkpoint
        raises, so the exit status tells the operator.
        """
        if self._checkpoint is None:
            self._commits.commit(self._commits.cut(self.table.processed_seq))
            return
        if self._writing is not None and not self._writing.is_set():
            if not final:
                return  # one write at a time: try again after the next batch
            await self._writing.wait()  # its outcome decides what is unsaved
        if not self._unsaved and not len(self._commits):
            return
        self._next_checkpoint = time.monotonic_ns() + self._interval_ns
        if self._ttl_ns:
            expired = self.table.expire(time.monotonic_ns() - self._ttl_ns)
            if expired:
                self._events.expired(len(expired))
        t0 = time.perf_counter()
        table = self.table.snapshot()
        cut = self._commits.cut(table.processed_seq)
        snapshot = self.step.snapshot(self.slab, list(table.slot_of.values()))
        self._writing_since, self._dirty_since = self._dirty_since, None
        covers = self.dispatched
        if final:
            await self._write(snapshot, table, cut, t0, covers, final=True)
        else:
            self._writing = anyio.Event()
            assert self._background is not None
            self._background.start_soon(self._write, snapshot, table, cut, t0, covers)

    async def _write(
        self,
        snapshot: SlabSnapshot,
        table: StreamTable,
        cut: Cut,
        t0: float,
        covers: int,
        *,
        final: bool = False,
    ) -> None:
        checkpoint = self._checkpoint
        assert checkpoint is not None
        stored = True
        try:
            if self._outputs_stored is not None:
                # Never an effect saved whose moment is not: after a crash its frame would
                # count as applied, and its moment would be lost.
                with anyio.move_on_after(OUTPUTS_WAIT_S) as waited:
                    await self._outputs_stored(covers)
                stored = not waited.cancelled_caught
            if stored:
                await anyio.to_thread.run_sync(lambda: checkpoint(snapshot.to_host(), table))
        except OSError as e:
            self._failed(cut, f"{type(e).__name__}: {e}")
            if final:
                raise
        else:
            if not stored:  # (a source that redelivers gives the frames again after a crash)
                self._failed(
                    cut,
                    f"the moments it covers were not stored within {OUTPUTS_WAIT_S:g} s",
                )
            else:
                self._writing_since = None
                self._commits.commit(cut)
                self._events.checkpointed(time.perf_counter() - t0, len(cut))
        finally:
            if self._writing is not None:
                self._writing.set()
