"""Freshness policies: what a source's frames may be when a consumer falls behind.

A source configured with a policy (`freshness = "all" | "latest" | "max_age_ms=N"`) has
its stale samples shed — never processed, counted as
`enactive_frames_dropped_total{reason="stale"}` — instead of being worked through late:

- `all`: nothing is shed; every frame is stepped, however late (the default for TCP,
  UDP, MQTT; NATS has no policy: it is the exactly-once source).
- `latest`: of a stream's frames waiting together, only the newest is kept — a stream
  that fell behind resumes on its newest sample, having shed what queued before it.
- `max_age_ms=N`: a frame older than N ms when its batch is formed is shed. A frame's age
  is measured from its receipt (`Frame.received_ns`, on `time.monotonic_ns`), or, for a
  source that knows when a sample was taken on the daemon's clock (Lab Streaming Layer,
  its corrected timestamp), from then.

Where: the batcher applies both (`stream.batcher`), so they hold for whatever queued
inside the daemon; a source whose transport buffers on its own side (an LSL inlet) also
sheds there (`keep`, and `buffer_s` bounds the inlet's buffer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

__all__ = ["ALL", "Freshness"]


@dataclasses.dataclass(frozen=True, slots=True)
class Freshness:
    """A parsed policy: `kind` and, for `max_age`, `max_age_ns`."""

    kind: Literal["all", "latest", "max_age"] = "all"
    max_age_ns: int = 0

    @classmethod
    def parse(cls, text: str) -> Freshness:
        """`"all"`, `"latest"` or `"max_age_ms=N"` (N > 0); raises `ValueError`."""
        if text in ("all", "latest"):
            return cls(text)  # type: ignore[arg-type]
        name, sep, value = text.partition("=")
        if name == "max_age_ms" and sep:
            try:
                ms = float(value)
            except ValueError:
                ms = math.nan
            if math.isfinite(ms) and ms > 0:
                return cls("max_age", max(1, round(ms * 1e6)))
        raise ValueError(f"freshness {text!r}: expected all, latest or max_age_ms=N (N > 0)")

    def __str__(self) -> str:
        if self.kind == "max_age":
            return f"max_age_ms={self.max_age_ns / 1e6:g}"
        return self.kind

    @property
    def sheds(self) -> bool:
        return self.kind != "all"

    def buffer_s(self, default_s: int) -> int:
        """How many seconds a transport-side buffer need hold (an LSL inlet's
        `max_buflen`): 1 s for `latest`, the age limit rounded up for `max_age`,
        `default_s` for `all`."""
        if self.kind == "latest":
            return 1
        if self.kind == "max_age":
            return max(1, math.ceil(self.max_age_ns / 1e9))
        return default_s

    def keep(self, taken_ns: np.ndarray, now_ns: int) -> np.ndarray:
        """Which of one stream's samples, taken at `taken_ns` (ascending, int64) and
        arriving together, to keep at `now_ns`: a bool mask."""
        keep = np.ones(len(taken_ns), bool)
        if self.kind == "latest" and len(taken_ns):
            keep[:-1] = False
        elif self.kind == "max_age":
            keep &= now_ns - taken_ns <= self.max_age_ns
        return keep


ALL = Freshness()
"""The policy that sheds nothing."""
