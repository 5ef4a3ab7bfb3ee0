"""The integrator: device records → a batch of moments with their frames' identity and
latency, offered to every sink without waiting (a slow sink drops, it never stalls the
device) — except a reliable sink (`ReliableSink`), whose room it waits for."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio
import numpy as np
from anyio.streams.memory import MemoryObjectReceiveStream

from .events import BatchTimes, PipelineEvents
from .executor import Stepped
from .protocol import (
    ALL_PRESENT,
    FLAG_ABSENT,
    FLAG_EAGER,
    FLAG_RESTORED,
    FLAG_SESSION_START,
    SESSION_START,
    MomentBatch,
    MomentSizes,
)
from .sinks import ReliableSink, Sink

__all__ = ["integrate"]


async def integrate(
    receive: MemoryObjectReceiveStream[Stepped],
    sinks: Sequence[Sink],
    sizes: MomentSizes,
    *,
    events: PipelineEvents,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Turn every stepped batch into a `MomentBatch` and offer it to every sink, until the
    executor closes its stream; report each batch's timings as `events.moments(...)`.
    `on_ready()` is called as soon as a batch's records are on the host.
    """
    reliable = [sink for sink in sinks if isinstance(sink, ReliableSink)]
    async with receive:
        async for item in receive:
            # Records already computed are read at once; waiting for the device happens
            # off the event loop. (`is_ready` is ArrayImpl's; `jax.Array` does not declare
            # it, so without it every batch takes the worker thread.)
            is_ready = getattr(item.records, "is_ready", None)
            if is_ready is not None and is_ready():
                records = np.asarray(item.records)
            else:
                records = await anyio.to_thread.run_sync(np.asarray, item.records)
            ready = time.monotonic_ns()
            on_ready()
            batch = item.batch
            n = len(batch)
            received = batch.received_ns
            present = batch.present
            flags = np.where(present & ALL_PRESENT != ALL_PRESENT, FLAG_ABSENT, 0).astype(np.uint16)
            flags |= np.where(present & SESSION_START != 0, FLAG_SESSION_START, 0).astype(np.uint16)
            flags |= np.where(np.asarray(item.restored, bool), FLAG_RESTORED, 0).astype(np.uint16)
            if item.eager:
                flags |= FLAG_EAGER
            moments = MomentBatch(
                batch.stream_ids,
                np.array(batch.seq, np.uint64),
                batch.timestamp,
                np.zeros(n, np.uint64),
                flags,
                sizes,
                records[:n],
            )
            for waiting in reliable:  # they never drop: wait for room (back-pressure)
                await waiting.wait_room(n)
            # One emission time per batch: offering a whole batch takes microseconds.
            t0 = time.monotonic_ns()
            latency = t0 - received
            moments.latency_ns[:] = latency
            for sink in sinks:
                sink.offer(moments)
            t1 = time.monotonic_ns()
            events.moments(
                BatchTimes(
                    len(records),
                    (ready - item.taken_ns) / 1e9,
                    (t0 - ready) / 1e9,
                    (t1 - t0) / 1e9,
                    latency / 1e9,
                )
            )
