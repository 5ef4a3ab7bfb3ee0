"""The integrator: device records → moments with their frames' identity and latency,
handed to every sink without waiting (a slow sink drops, it never stalls the device)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from anyio.streams.memory import MemoryObjectReceiveStream

from .executor import Stepped
from .protocol import ALL_PRESENT, FLAG_ABSENT, FLAG_EAGER, FLAG_RESTORED, Moment, MomentSizes

__all__ = ["Sink", "integrate"]


class Sink(Protocol):
    """Where moments go. `offer` must never block."""

    name: str

    def offer(self, moment: Moment) -> None: ...


async def integrate(
    receive: MemoryObjectReceiveStream[Stepped],
    sinks: Sequence[Sink],
    sizes: MomentSizes,
    *,
    observe: Callable[[str, Any], None] = lambda event, value: None,
) -> None:
    """Turn every stepped batch into moments and offer each to every sink, until the
    executor closes its stream.

    `observe` receives `("integrate", seconds)` per batch, `("emit", seconds)` per batch,
    `("end_to_end", [seconds…])` and `("processed", n)`.
    """
    async with receive:
        async for item in receive:
            base = FLAG_EAGER if item.eager else 0
            moments = [
                Moment(
                    f.stream_id,
                    f.seq,
                    f.timestamp,
                    0,
                    base
                    | (FLAG_RESTORED if restored else 0)
                    | (FLAG_ABSENT if f.present != ALL_PRESENT else 0),
                    sizes,
                    row,
                )
                for f, restored, row in zip(item.frames, item.restored, item.records, strict=False)
            ]
            t1 = time.monotonic_ns()
            latencies = []
            for m, f in zip(moments, item.frames, strict=True):
                m.latency_ns = time.monotonic_ns() - f.received_ns
                latencies.append(m.latency_ns / 1e9)
                for sink in sinks:
                    sink.offer(m)
            t2 = time.monotonic_ns()
            observe("integrate", (t1 - item.stepped_ns) / 1e9)
            observe("emit", (t2 - t1) / 1e9)
            observe("end_to_end", latencies)
            observe("processed", len(moments))
