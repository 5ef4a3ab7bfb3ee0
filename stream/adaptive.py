"""Adaptive batching: tune the batch deadline and size online to hold a p99 latency SLO.

Clipper's AIMD batching (Crankshaw et al., NSDI 2017) adapted to fixed buckets: every
`window` batches the controller looks at the p99 of the end-to-end latencies it saw.

- Under the SLO with room to spare (p99 < `headroom` × SLO): additive increase — the
  deadline grows by `wait_step`, and when the deadline is at its ceiling the batch cap
  moves up to the next compiled bucket.
- Over the SLO: multiplicative decrease — the deadline is halved and the cap drops one
  bucket.

Larger batches and longer deadlines buy throughput (fewer, fuller device steps); shorter
ones buy latency. The cap only ever takes values from the compiled buckets, so adapting
never compiles anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .batcher import Batcher

__all__ = ["AdaptiveBatching"]


class AdaptiveBatching:
    """**Arguments:**

    - `batcher`: the batcher to steer (`set_max_wait`, `set_max_batch`).
    - `buckets`: the compiled batch sizes, increasing.
    - `slo_s`: the p99 end-to-end latency to stay under, in seconds.
    - `max_wait_s`: the deadline's ceiling (and its starting value).
    - `window`: batches per decision.
    - `headroom`: grow only while p99 < `headroom` × SLO.
    - `wait_step_s`: the additive step of the deadline.
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
        wait_step_s: float = 250e-6,
    ) -> None:
        self.batcher = batcher
        self.buckets = tuple(buckets)
        self.slo_s = slo_s
        self.max_wait_ceiling = max_wait_s
        self.window = window
        self.headroom = headroom
        self.wait_step_s = wait_step_s
        self.max_wait_s = max_wait_s
        self.cap_index = len(self.buckets) - 1
        self._seen: list[np.ndarray] = []
        self.decisions = 0
        self.last_p99_s = 0.0
        self._apply()

    @property
    def max_batch(self) -> int:
        return self.buckets[self.cap_index]

    def _apply(self) -> None:
        self.batcher.set_max_wait(self.max_wait_s)
        self.batcher.set_max_batch(self.max_batch)

    def observe(self, latencies_s: np.ndarray) -> None:
        """Feed one batch's end-to-end latencies (seconds); decides every `window` batches."""
        self._seen.append(latencies_s)
        if len(self._seen) < self.window:
            return
        p99 = float(np.percentile(np.concatenate(self._seen), 99))
        self._seen.clear()
        self.last_p99_s = p99
        self.decisions += 1
        if p99 > self.slo_s:
            self.max_wait_s /= 2
            self.cap_index = max(self.cap_index - 1, 0)
        elif p99 < self.headroom * self.slo_s:
            if self.max_wait_s < self.max_wait_ceiling:
                self.max_wait_s = min(self.max_wait_s + self.wait_step_s, self.max_wait_ceiling)
            elif self.cap_index < len(self.buckets) - 1:
                self.cap_index += 1
        self._apply()
