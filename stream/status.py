"""The one-line live status the daemon prints every second."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import numpy as np

from processors import CompilationCounter

from .events import BatchTimes, Listener
from .metrics import Metrics
from .streams import StreamTable

__all__ = ["StatusLine"]

_KEEP = 100_000  # latencies kept per interval for the percentiles


class StatusLine(Listener):
    """Frames/s, p50/p99 end-to-end latency over the last interval, active streams,
    rejects, fallbacks and compilations since ready."""

    def __init__(
        self, metrics: Metrics, table: StreamTable, counter: CompilationCounter | None
    ) -> None:
        self._metrics = metrics
        self._table = table
        self._counter = counter
        self._latencies: list[np.ndarray] = []
        self._kept = 0
        self._last_processed = 0.0
        self._last_t = time.monotonic()

    def moments(self, t: BatchTimes) -> None:
        """Keep one batch's end-to-end latencies (float seconds) for this interval."""
        if self._kept < _KEEP:
            self._latencies.append(t.end_to_end_s)
            self._kept += len(t.end_to_end_s)

    def _total(self, name: str) -> float:
        total = 0.0
        for family in self._metrics.registry.collect():
            if family.name == name:
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return total

    def line(self) -> str:
        now = time.monotonic()
        processed = self._total("enactive_frames_processed")
        rate = (processed - self._last_processed) / max(now - self._last_t, 1e-9)
        self._last_processed, self._last_t = processed, now
        if self._latencies:
            p50, p99 = np.percentile(np.concatenate(self._latencies) * 1e3, [50, 99])
            latency = f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
        else:
            latency = "p50      –     p99      –   "
        self._latencies, self._kept = [], 0
        runtime = self._counter.runtime if self._counter is not None else 0
        return (
            f"{rate:9.0f} frames/s  {latency}  streams {self._table.active:5d}  "
            f"rejected {self._total('enactive_frames_rejected'):.0f}  "
            f"fallbacks {self._total('enactive_jit_fallback'):.0f}  "
            f"compilations since ready {runtime}"
        )

    async def run(self, interval_s: float, emit: Callable[[str], None]) -> None:
        """Emit a line every `interval_s` until cancelled."""
        next_t = anyio.current_time() + interval_s
        while True:
            await anyio.sleep_until(next_t)
            next_t += interval_s
            emit(self.line())
