"""Adaptive batching: tune the batch size cap and deadline online to hold a p99 latency
SLO while keeping throughput.

After Clipper's AIMD batching (Crankshaw et al., NSDI 2017), adapted to fixed buckets.
Every `window` batches the controller looks at what it saw:

- **The step itself is too slow** — p99 of the device time plus the deadline exceeds
  the SLO: multiplicative decrease: the cap drops one bucket (halving or more) and the
  deadline halves. This is Clipper's signal: the batch's own processing latency.
- **Backlogged** — batches close full (mean fill ≥ `full`): the service is short of
  throughput, and smaller batches would only lengthen the queue: the cap moves up one
  bucket (additive increase).
- **Not backlogged but over the SLO end to end**: the wait for company is the latency
  batching adds: the deadline halves.
- **Comfortably under the SLO**: the deadline grows by `wait_step_s` back towards its
  ceiling (larger batches, fewer steps).

The cap only takes values from the compiled buckets, so adapting never compiles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .batcher import Batcher
from .events import BatchTimes, Listener

__all__ = ["AdaptiveBatching"]


class AdaptiveBatching(Listener):
    """**Arguments:**

    - `batcher`: the batcher to steer (`set_max_wait`, `set_max_batch`).
    - `buckets`: the compiled batch sizes, increasing.
    - `slo_s`: the p99 end-to-end latency to stay under, in seconds.
    - `max_wait_s`: the deadline's ceiling (and its starting value).
    - `window`: batches per decision.
    - `headroom`: grow the deadline only while p99 < `headroom` × SLO.
    - `full`: the mean batch fill above which the service counts as backlogged.
    - `wait_step_s`: the additive step of the deadline.
    - `on_apply(max_wait_s, max_batch)`: told of every setting applied (the metrics'
        gauges).
    """

    def __init__(
        self,
        batcher: Batcher,
        buckets: Sequence[int],
        slo_s: float,
        *,
        max_wait_s: float,
        window: int = 32,
        headroom: float = 0.8,
        full: float = 0.9,
        wait_step_s: float = 250e-6,
        on_apply: Callable[[float, int], None] = lambda max_wait_s, max_batch: None,
    ) -> None:
        self._on_apply = on_apply
        self.batcher = batcher
        self.buckets = tuple(buckets)
        self.slo_s = slo_s
        self.max_wait_ceiling = max_wait_s
        self.window = window
        self.headroom = headroom
        self.full = full
        self.wait_step_s = wait_step_s
        self.max_wait_s = max_wait_s
        self.cap_index = len(self.buckets) - 1
        self._latencies: list[np.ndarray] = []
        self._device: list[float] = []
        self._fill: list[float] = []
        self.decisions = 0
        self.last_p99_s = 0.0
        self._apply()

    @property
    def max_batch(self) -> int:
        return self.buckets[self.cap_index]

    def _apply(self) -> None:
        self.batcher.set_max_wait(self.max_wait_s)
        self.batcher.set_max_batch(self.max_batch)
        self._on_apply(self.max_wait_s, self.max_batch)

    def moments(self, t: BatchTimes) -> None:
        """Feed one batch: its device time (from leaving the batcher to its records on the
        host), its fill and its end-to-end latencies; decides every `window` batches."""
        self._device.append(t.device_s)
        self._fill.append(len(t.end_to_end_s) / self.max_batch)
        self._latencies.append(t.end_to_end_s)
        if len(self._latencies) < self.window:
            return
        p99 = float(np.percentile(np.concatenate(self._latencies), 99))
        device_p99 = float(np.percentile(self._device, 99)) if self._device else 0.0
        fill = float(np.mean(self._fill)) if self._fill else 0.0
        self._latencies.clear()
        self._device.clear()
        self._fill.clear()
        self.last_p99_s = p99
        self.decisions += 1
        if device_p99 + self.max_wait_s > self.slo_s and self.cap_index > 0:
            self.cap_index -= 1
            self.max_wait_s /= 2
        elif fill >= self.full:
            self.cap_index = min(self.cap_index + 1, len(self.buckets) - 1)
        elif p99 > self.slo_s:
            self.max_wait_s /= 2
        elif p99 < self.headroom * self.slo_s:
            self.max_wait_s = min(self.max_wait_s + self.wait_step_s, self.max_wait_ceiling)
        self._apply()
