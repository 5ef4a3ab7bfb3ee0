"""The pipeline: the stages and the bounded buffers between them.

```
 sources ──► admission ──► ingest ──► batcher ──► executor ──► stepped ──► integrator ──► sinks
 tcp, udp,   (seq check;   buffer     (one frame   (AOT bucket   stream     (moments,     offer()
 synthetic   rejections   [frames]    per stream,  step on the   [2]        latency)      never
 (a Source)  back to the              deadline,    state slab,                            waits
             source)                  [limit])     checkpoint)
                                                       │ durable checkpoint
 source.commit(positions) ◄───────── CommitLog ◄───────┘
```

Every arrow is bounded, so a full stage slows the one before it; a source that cannot
be slowed drops and counts (`stream.sources.base`). Frames of an aligned body's inputs
are joined into the body's frames before admission (`stream.alignment`, in `Ingest`);
the batcher sheds what a source's freshness policy calls stale (`stream.freshness`).
Every stage reports through one `PipelineEvents`. Shutdown cascades: `stop()` tells the
sources to stop taking data; once they have returned the ingest buffer is closed, the
batcher hands out what it holds, the executor steps it and writes the final checkpoint
(committing what it covers), the integrator emits the last moments and the sinks flush.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
from anyio.abc import TaskStatus

from processors import SlabStep

from .adaptive import AdaptiveBatching
from .admission import Admission
from .alignment import Body
from .batcher import Batch, Batcher
from .buffers import WeightedBuffer
from .commits import CommitLog
from .events import Events, PipelineEvents
from .executor import Executor, Stepped
from .freshness import Freshness
from .ingest import Ingest, Item
from .integrator import integrate
from .protocol import Dims, Frame, MomentSizes
from .sinks import ReliableSink, Sink
from .sources import OpenedSource, Source
from .streams import StreamTable

__all__ = ["Pipeline", "PipelineSettings", "Ports"]

SOURCE_GRACE_S = 2.0
"""Seconds the sources get to finish the data in hand at shutdown."""
STEPPED_BUFFER = 2
"""Batches dispatched to the device whose records the integrator has not taken yet."""


@dataclasses.dataclass(frozen=True, slots=True)
class PipelineSettings:
    """What the stages are sized by (from the daemon's configuration).

    - `dims`, `max_frame_bytes`: for decoding.
    - `ingest_queue`: frames the ingest buffer holds.
    - `max_wait_s`: the batch deadline.
    - `slo_p99_s`: when set, adaptive batching steers the deadline and cap to hold it.
    - `checkpoint_interval_s`: at most this long between checkpoints while frames flow.
    - `session_start`: what a frame that starts a new session of its stream does to the
        stream's state: `"reset"` (a fresh state) or `"continue"`.
    - `stream_ttl_s`: streams idle this long are forgotten (0: never).
    - `new_streams_per_batch`: frames of streams new to the daemon let in per batch, from
        a lane of their own (a quarter of `ingest_queue`), so a flood of new ids cannot
        crowd out known streams (0: no separate lane).
    - `checkpoint_positions`: source positions waiting for a checkpoint that make one
        due at once (0: only the interval).
    - `freshness`: each source label's freshness policy (`stream.freshness`; absent:
        `all`), applied by the batcher.
    - `bodies`: bodies joined from several input streams (`stream.alignment`).
    """

    dims: Dims
    max_frame_bytes: int
    ingest_queue: int
    max_wait_s: float
    checkpoint_interval_s: float
    slo_p99_s: float | None = None
    session_start: str = "reset"
    stream_ttl_s: float = 0.0
    new_streams_per_batch: int = 0
    checkpoint_positions: int = 0
    freshness: Mapping[str, Freshness] = dataclasses.field(default_factory=dict)
    bodies: tuple[Body, ...] = ()


@dataclasses.dataclass(slots=True)
class Ports:
    """The bound ports: per source name and per sink name (those that listen)."""

    sources: dict[str, int] = dataclasses.field(default_factory=dict)
    sinks: dict[str, int] = dataclasses.field(default_factory=dict)


class Pipeline:
    """**Arguments:**

    - `step`, `table`, `slab`: the step (with one bucket compiled or more: batches use
        only those, see `buckets_compiled`), the stream table and the initial (fresh or
        restored) device slab.
    - `sources`, `sinks`: what feeds it and where moments go; names must be distinct.
    - `events`: where every stage reports.
    - `settings`: sizes and deadlines.
    - `checkpoint(rows, table)`: writes a checkpoint (in a worker thread); None: none.
    - `on_adapt(max_wait_s, max_batch)`: told of the batch deadline and cap whenever
        they are set (at start, and by adaptive batching).
    - `on_batch(batch)`: awaited with each batch before it is stepped (the recorder);
        None: none.
    """

    def __init__(
        self,
        step: SlabStep,
        table: StreamTable,
        slab: Any,
        *,
        sources: Sequence[Source],
        sinks: Sequence[Sink],
        events: PipelineEvents,
        settings: PipelineSettings,
        checkpoint: Callable[[Any, StreamTable], Any] | None = None,
        on_adapt: Callable[[float, int], None] = lambda max_wait_s, max_batch: None,
        on_batch: Callable[[Batch], Awaitable[None]] | None = None,
    ) -> None:
        self.sources = tuple(sources)
        self.sinks = tuple(sinks)
        self.reliable = tuple(s for s in self.sinks if isinstance(s, ReliableSink))
        by_label = {label: s for s in self.sources for label in s.labels}
        self.buffer: WeightedBuffer[Item] = WeightedBuffer(settings.ingest_queue)
        self.step = step
        self.batcher = Batcher(
            max(step.buckets),
            settings.max_wait_s,
            freshness=settings.freshness,
            on_stale=lambda n: self.events.dropped("stale", n),
            on_age=lambda source, seconds: self.events.sample_age(source, seconds),
        )
        # Batches stay within the buckets compiled so far (`buckets_compiled`).
        self.batcher.set_largest_bucket(step.largest_ready)
        self._on_adapt = on_adapt
        self.adaptive = (
            AdaptiveBatching(
                self.batcher,
                step.buckets,
                settings.slo_p99_s,
                max_wait_s=settings.max_wait_s,
                # the cap in force: the adaptive one, within the compiled buckets
                on_apply=lambda max_wait_s, _: on_adapt(max_wait_s, self.batcher.max_batch),
            )
            if settings.slo_p99_s is not None
            else None
        )
        if self.adaptive is None:
            on_adapt(settings.max_wait_s, self.batcher.max_batch)
        else:
            events = Events([events, self.adaptive])
        self.events = events
        self.commits = CommitLog(
            lambda label, positions: by_label[label].commit(positions),
            on_rejected=lambda: self.executor.positions_waiting(),
        )
        self.new_streams_per_batch = settings.new_streams_per_batch
        self.lane: WeightedBuffer[Frame] | None = (
            WeightedBuffer(max(settings.ingest_queue // 4, 1))
            if settings.new_streams_per_batch
            else None
        )
        self.ingest = Ingest(
            self.buffer,
            dims=settings.dims,
            max_frame_bytes=settings.max_frame_bytes,
            events=events,
            admission=Admission(table, events, self.commits),
            lane=self.lane,
            bodies=settings.bodies,
        )
        self.executor = Executor(
            step,
            table,
            slab,
            events=events,
            commits=self.commits,
            checkpoint=checkpoint,
            checkpoint_interval_s=settings.checkpoint_interval_s,
            reset_on_session_start=settings.session_start == "reset",
            stream_ttl_s=settings.stream_ttl_s,
            checkpoint_positions=settings.checkpoint_positions,
            outputs_stored=self._stored if self.reliable else None,
            on_batch=on_batch,
        )
        model_config = step.model.config
        self.sizes = MomentSizes(
            model_config.moment_dim or settings.dims.sensory,
            settings.dims.sensory,
            settings.dims.proprio,
            settings.dims.motor,
        )
        self.stepped_send, self.stepped_receive = anyio.create_memory_object_stream[Stepped](
            STEPPED_BUFFER
        )

    def queue_depths(self) -> dict[str, Callable[[], int]]:
        """What waits before each stage, read at scrape time: frames for `ingest` and
        `batcher`, batches for `device`, moments for `sinks` (all sinks' buffers)."""
        return {
            "ingest": lambda: self.buffer.weight,
            "batcher": lambda: len(self.batcher),
            "device": lambda: self.stepped_send.statistics().current_buffer_used,
            "sinks": lambda: sum(sink.queued for sink in self.sinks),
        }

    def buckets_compiled(self) -> None:
        """More of the step's buckets are compiled (the daemon compiles the rest while it
        serves): batches may now grow to the largest of them."""
        self.batcher.set_largest_bucket(self.step.largest_ready)
        self._on_adapt(self.batcher.max_wait_ns / 1e9, self.batcher.max_batch)

    def stop(self) -> None:
        """Stop taking new data; what was received is processed, then `run` returns."""
        self.ingest.stop()

    async def run(self, *, task_status: TaskStatus[Ports] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every stage until `stop()` and the drain that follows; `started(ports)` once
        every sink and source is listening."""
        ports = Ports()
        async with contextlib.AsyncExitStack() as opened:
            # Connections that outlive `run` (a broker source acknowledges what the final
            # checkpoint commits), entered before anything runs and left after it all.
            for source in self.sources:
                if isinstance(source, OpenedSource):
                    await opened.enter_async_context(source.open())
            await self._run_stages(ports, task_status)

    async def _run_stages(self, ports: Ports, task_status: TaskStatus[Ports]) -> None:
        async with anyio.create_task_group() as sink_group:
            for sink in self.sinks:
                port = await sink_group.start(sink.run)
                if isinstance(port, int):
                    ports.sinks[sink.name] = port
            async with anyio.create_task_group() as stages:
                stages.start_soon(self.batcher.collect, self.buffer)
                stages.start_soon(self.executor.run, self.batcher, self.stepped_send)
                stages.start_soon(self._integrate)
                if self.lane is not None:
                    stages.start_soon(self._admit_new_streams)
                try:
                    async with anyio.create_task_group() as feeding:
                        feeding.start_soon(self.ingest.run_alignment)
                        for source in self.sources:
                            port = await feeding.start(source.run, self.ingest)
                            if port is not None:
                                ports.sources[source.name] = port
                        task_status.started(ports)
                        await self.ingest.stopped.wait()
                        # Sources finish the data in hand and return; one still blocked
                        # after the grace period is cancelled.
                        feeding.cancel_scope.deadline = anyio.current_time() + SOURCE_GRACE_S
                    await self.ingest.flush_alignment()
                finally:
                    if self.lane is not None:
                        self.lane.close()  # the lane drains, then the buffer closes
                    else:
                        self.buffer.close()
            sink_group.cancel_scope.cancel()

    async def _admit_new_streams(self) -> None:
        try:
            await self.ingest.pump_new_streams(
                self.new_streams_per_batch, self.batcher.wait_take
            )
        finally:
            self.buffer.close()

    async def _stored(self, batches: int) -> None:
        for sink in self.reliable:
            await sink.published(batches)

    async def _integrate(self) -> None:
        await integrate(
            self.stepped_receive,
            self.sinks,
            self.sizes,
            events=self.events,
            on_ready=self.executor.finished,
        )
