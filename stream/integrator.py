"""The integrator: device records → moments with their frames' identity and latency,
handed to every sink without waiting (a slow sink drops, it never stalls the device)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
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

    `observe` receives, per batch, `("integrate", seconds)` (from the end of the device
    step to the moments' emission), `("emit", seconds)` (offering them to the sinks),
    `("end_to_end", seconds array)` (receipt to emission, one per moment) and
    `("processed", n)`.
    """
    async with receive:
        async for item in receive:
            t0 = time.monotonic_ns()
            frames = item.frames
            received = np.fromiter((f.received_ns for f in frames), np.int64, len(frames))
            # One emission time per batch: offering a whole batch takes microseconds.
            latency = t0 - received
            base = FLAG_EAGER if item.eager else 0
            for f, restored, row, latency_ns in zip(
                frames, item.restored, item.records, latency.tolist(), strict=False
            ):
                flags = base | (FLAG_RESTORED if restored else 0)
                if f.present != ALL_PRESENT:
                    flags |= FLAG_ABSENT
                m = Moment(f.stream_id, f.seq, f.timestamp, latency_ns, flags, sizes, row)
                for sink in sinks:
                    sink.offer(m)
            t1 = time.monotonic_ns()
            observe("integrate", (t0 - item.stepped_ns) / 1e9)
            observe("emit", (t1 - t0) / 1e9)
            observe("end_to_end", latency / 1e9)
            observe("processed", len(frames))
