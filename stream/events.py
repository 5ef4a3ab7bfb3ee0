"""One typed interface for everything a pipeline stage reports.

Stages never know who listens: they call methods of one `PipelineEvents`. `Metrics`
implements all of them (that is how every number reaches `/metrics`); the status line and
adaptive batching subclass `Listener`, which ignores every event, and override the few
they need; `Events` fans one call out to several listeners. An event that no listener
knows is a type error, not a silently ignored string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["BatchTimes", "Events", "Listener", "PipelineEvents"]


@dataclasses.dataclass(frozen=True, slots=True)
class BatchTimes:
    """One batch's timings, reported once its moments were offered to the sinks.

    - `bucket`: the rows the batch was padded to.
    - `device_s`: from leaving the batcher to its records being on the host.
    - `integrate_s`: from there to the moments' emission; `emit_s`: offering them.
    - `end_to_end_s`: float64 `(n,)`, per moment, from its frame's receipt to emission
        (`n` frames were processed).
    """

    bucket: int
    device_s: float
    integrate_s: float
    emit_s: float
    end_to_end_s: np.ndarray


class PipelineEvents(Protocol):
    """What the stages report. Every method is called on the event loop and must return
    quickly (no I/O); seconds are floats, arrays are float64 of seconds, one per frame."""

    # -- sources (through `Ingest`) -------------------------------------------------------
    def received(self, source: str, n: int) -> None:
        """`n` frames arrived from `source` (counted whether they are then decoded,
        rejected or dropped: received = processed + rejected + dropped)."""

    def rejected(self, source: str, reason: str) -> None:
        """One frame from `source` was rejected for `reason` (`protocol.REASONS`)."""

    def dropped(self, reason: str, n: int) -> None:
        """`n` well-formed frames were dropped: by an overload policy (`overload`), a
        freshness policy (`stale`), or the alignment, too late to join a frame (`late`)."""

    def limited(self, listener: str, reason: str) -> None:
        """A connection to `listener` (its configuration key, e.g. `ingest.tcp`) was
        refused or closed by a limit, or an accept failed (`metrics.LIMIT_REASONS`:
        `max_connections`, `max_per_address`, `idle_timeout`, `frame_timeout`,
        `header_timeout`, `accept_error`, ...)."""

    def source_state(self, source: str, up: bool) -> None:
        """A source's connection (a broker, an LSL outlet) went down (False) or came
        (back) up (True)."""

    def source_redelivered(self, source: str, n: int) -> None:
        """`n` messages were delivered again by `source`'s broker (not acknowledged in
        time, or delivered to a daemon that crashed)."""

    def source_acknowledged(self, source: str, kind: str, n: int) -> None:
        """`n` messages were acknowledged to `source`'s broker: `ack` (their effect is
        durable, or they were duplicates of what is) or `term` (they can never decode)."""

    def sample_age(self, source: str, seconds: float) -> None:
        """The newest sample from `source` in a batch about to be stepped was `seconds`
        old (since its receipt, or for a source that knows it, its capture)."""

    def partitions_owned(self, n: int) -> None:
        """This instance of a scaled-out deployment consumes `n` partitions now."""

    def partition_pending(self, partition: int, n: int) -> None:
        """`n` messages of `partition` wait in the frames stream, not yet delivered."""

    def partition_checkpoint(self, partition: int, outcome: str) -> None:
        """A checkpoint of `partition` was `written` to JetStream, `failed` (retried at
        the next), or `fenced`: another instance wrote it since, and owns it now."""

    # -- admission, batcher, executor ------------------------------------------------------
    def batch(
        self, bucket: int, rows: int, queue_s: np.ndarray, batch_wait_s: np.ndarray
    ) -> None:
        """A batch of `rows` frames padded to `bucket` was dispatched to the device.
        `queue_s`: per frame, receipt to admission; `batch_wait_s`: per frame, receipt
        to the batch leaving the batcher."""

    def evicted(self, n: int) -> None:
        """`n` idle streams' states were moved from the device slab to the host."""

    def restored(self, n: int) -> None:
        """`n` returning streams' states were moved back into the slab."""

    def expired(self, n: int) -> None:
        """`n` streams idle past `state.stream_ttl_s` were forgotten."""

    def checkpointed(self, seconds: float, positions: int) -> None:
        """A checkpoint is durable; it took `seconds` and covers `positions` source
        positions, now committed to their sources."""

    def checkpoint_failed(self, message: str) -> None:
        """A checkpoint could not be written (retried at the next interval)."""

    # -- integrator and sinks --------------------------------------------------------------
    def moments(self, t: BatchTimes) -> None:
        """One batch's moments were offered to the sinks, with its timings."""

    def emitted(self, sink: str, n: int) -> None:
        """`n` moments were delivered by `sink`."""

    def sink_dropped(self, sink: str, reason: str, n: int) -> None:
        """`n` moments could not be delivered by `sink`, for `reason`."""

    def sink_duplicates(self, sink: str, n: int) -> None:
        """`n` moments `sink` published were dropped by the broker as duplicates of ones
        it already stored (re-emitted after a restart)."""


class Listener:
    """A `PipelineEvents` that ignores every event: subclass it and override what you
    need."""

    def received(self, source: str, n: int) -> None:
        pass

    def rejected(self, source: str, reason: str) -> None:
        pass

    def dropped(self, reason: str, n: int) -> None:
        pass

    def limited(self, listener: str, reason: str) -> None:
        pass

    def source_state(self, source: str, up: bool) -> None:
        pass

    def source_redelivered(self, source: str, n: int) -> None:
        pass

    def source_acknowledged(self, source: str, kind: str, n: int) -> None:
        pass

    def sample_age(self, source: str, seconds: float) -> None:
        pass

    def partitions_owned(self, n: int) -> None:
        pass

    def partition_pending(self, partition: int, n: int) -> None:
        pass

    def partition_checkpoint(self, partition: int, outcome: str) -> None:
        pass

    def batch(
        self, bucket: int, rows: int, queue_s: np.ndarray, batch_wait_s: np.ndarray
    ) -> None:
        pass

    def evicted(self, n: int) -> None:
        pass

    def restored(self, n: int) -> None:
        pass

    def expired(self, n: int) -> None:
        pass

    def checkpointed(self, seconds: float, positions: int) -> None:
        pass

    def checkpoint_failed(self, message: str) -> None:
        pass

    def moments(self, t: BatchTimes) -> None:
        pass

    def emitted(self, sink: str, n: int) -> None:
        pass

    def sink_dropped(self, sink: str, reason: str, n: int) -> None:
        pass

    def sink_duplicates(self, sink: str, n: int) -> None:
        pass


class Events:
    """Every event goes to each of `listeners`, in order."""

    def __init__(self, listeners: Sequence[PipelineEvents]) -> None:
        self.listeners = tuple(listeners)

    def received(self, source: str, n: int) -> None:
        for each in self.listeners:
            each.received(source, n)

    def rejected(self, source: str, reason: str) -> None:
        for each in self.listeners:
            each.rejected(source, reason)

    def dropped(self, reason: str, n: int) -> None:
        for each in self.listeners:
            each.dropped(reason, n)

    def limited(self, listener: str, reason: str) -> None:
        for each in self.listeners:
            each.limited(listener, reason)

    def source_state(self, source: str, up: bool) -> None:
        for each in self.listeners:
            each.source_state(source, up)

    def source_redelivered(self, source: str, n: int) -> None:
        for each in self.listeners:
            each.source_redelivered(source, n)

    def source_acknowledged(self, source: str, kind: str, n: int) -> None:
        for each in self.listeners:
            each.source_acknowledged(source, kind, n)

    def sample_age(self, source: str, seconds: float) -> None:
        for each in self.listeners:
            each.sample_age(source, seconds)

    def partitions_owned(self, n: int) -> None:
        for each in self.listeners:
            each.partitions_owned(n)

    def partition_pending(self, partition: int, n: int) -> None:
        for each in self.listeners:
            each.partition_pending(partition, n)

    def partition_checkpoint(self, partition: int, outcome: str) -> None:
        for each in self.listeners:
            each.partition_checkpoint(partition, outcome)

    def batch(
        self, bucket: int, rows: int, queue_s: np.ndarray, batch_wait_s: np.ndarray
    ) -> None:
        for each in self.listeners:
            each.batch(bucket, rows, queue_s, batch_wait_s)

    def evicted(self, n: int) -> None:
        for each in self.listeners:
            each.evicted(n)

    def restored(self, n: int) -> None:
        for each in self.listeners:
            each.restored(n)

    def expired(self, n: int) -> None:
        for each in self.listeners:
            each.expired(n)

    def checkpointed(self, seconds: float, positions: int) -> None:
        for each in self.listeners:
            each.checkpointed(seconds, positions)

    def checkpoint_failed(self, message: str) -> None:
        for each in self.listeners:
            each.checkpoint_failed(message)

    def moments(self, t: BatchTimes) -> None:
        for each in self.listeners:
            each.moments(t)

    def emitted(self, sink: str, n: int) -> None:
        for each in self.listeners:
            each.emitted(sink, n)

    def sink_dropped(self, sink: str, reason: str, n: int) -> None:
        for each in self.listeners:
            each.sink_dropped(sink, reason, n)

    def sink_duplicates(self, sink: str, n: int) -> None:
        for each in self.listeners:
            each.sink_duplicates(sink, n)
