"""LSL samples to frames: where an outlet's channels go in a payload (`Placement`), and
what one inlet's pulls become (`Framer.pull`, in the inlet's worker thread).

A pull's samples, float32 `(n, channels)` with float64 timestamps `(n,)` (`stream.lsl.Inlet`),
become frames of one stream: the payload float32 `(dims.total,)` with the channels in their
modalities' places and zeros elsewhere; `timestamp` the sample's corrected timestamp;
`seq` that in microseconds, raised where needed to stay strictly increasing; `received_ns`
its capture time on the daemon's clock, `min(timestamp, now)` (with `clock_sync = "none"`
the receipt). On the way, non-finite samples are rejected and the freshness policy sheds
what it must (`Freshness.keep` on capture times), each counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import numpy as np

from ..freshness import Freshness
from ..lsl import Inlet
from ..protocol import MOTOR, PROPRIO, SENSORY, TACTILE, Dims, Frame

__all__ = ["LABEL", "MODALITIES", "PULL_WAIT_S", "Framer", "LastSeq", "Placement", "Pulled"]

LABEL = "lsl"
MODALITIES = ("sensory", "proprio", "tactile", "motor")
_BITS = dict(zip(MODALITIES, (SENSORY, PROPRIO, TACTILE, MOTOR), strict=True))
PULL_WAIT_S = 0.1
"""The longest one pull waits for a sample (so a stop is noticed within it)."""
LATEST_PULLS = 8
"""With `latest`, a pull pulls on at once while more comes (a backlog arriving), up to
this many times, and keeps the newest sample of the last."""
_MAX_SEQ = (1 << 63) - 1


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """Where an outlet's channels go in a payload of `dims.total` values: `columns`
    (channel `i` → payload index `columns[i]`; `whole`: all of them, in order), `present`
    (the bits of the modalities it fills), `channels` (how many it must have) and
    `layout` (`"proprio 6 + motor 3"`)."""

    columns: np.ndarray
    present: int
    channels: int
    layout: str
    whole: bool

    @classmethod
    def of(cls, modalities: Sequence[str], dims: Dims) -> Placement:
        """Channels filling `modalities` (names, in channel order) of a `dims` payload."""
        offsets = dict(zip(MODALITIES, np.cumsum((0, *dims[:3])).tolist(), strict=True))
        sizes = dict(zip(MODALITIES, dims, strict=True))
        columns = [offsets[m] + i for m in modalities for i in range(sizes[m])]
        return cls(
            columns=np.asarray(columns, np.intp),
            present=functools.reduce(int.__or__, (_BITS[m] for m in modalities if sizes[m]), 0),
            channels=len(columns),
            layout=" + ".join(f"{m} {sizes[m]}" for m in modalities),
            whole=columns == list(range(dims.total)),
        )


class LastSeq:
    """A stream's last seq handed over by this source (None: none yet); kept across its
    inlets, used by one at a time."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: int | None = None


@dataclasses.dataclass(slots=True)
class Pulled:
    """What one pull became: the `frames` of the samples kept, and how many samples were
    `received` in all, shed as `stale`, rejected as `non_finite`."""

    frames: list[Frame]
    received: int
    stale: int
    non_finite: int


class Framer:
    """Turns one inlet's pulls into frames of one stream (`pull`, in a worker thread).

    **Arguments:** `inlet`, open; `stream_id` and `placement`, where its samples go;
    `seq`, the stream's last seq (shared with its earlier inlets); `freshness`, what to
    shed; `total`, `dims.total`; `daemon_clock`, whether timestamps are on the daemon's
    clock (not with `clock_sync = "none"`); `interval_s`, the least time between pulls
    that take a sample (`Inlet.pull`); `rewind_s`, how far before the stream's last
    sample an inlet's first may be and still continue it (the inlet's buffer).
    """

    def __init__(
        self,
        inlet: Inlet,
        stream_id: str,
        placement: Placement,
        seq: LastSeq,
        freshness: Freshness,
        total: int,
        *,
        daemon_clock: bool,
        interval_s: float,
        rewind_s: float,
    ) -> None:
        self.inlet = inlet
        self.stream_id = stream_id
        self.placement = placement
        self.seq = seq
        self.freshness = freshness
        self.total = total
        self.daemon_clock = daemon_clock
        self.interval_s = interval_s
        self.rewind_us = round(rewind_s * 1e6)
        self.opened = True  # the next chunk is this inlet's first

    def pull(self) -> Pulled | None:
        """One pull: the frames of the samples kept, and the counts (None: no sample came
        within `PULL_WAIT_S`). Raises `OutletLost`."""
        inlet = self.inlet
        n = inlet.pull(PULL_WAIT_S, self.interval_s)
        if not n:
            return None
        stale = 0
        if self.freshness.kind == "latest":
            for _ in range(LATEST_PULLS):  # what came meanwhile is newer (a backlog)
                more = inlet.pull(0.0)
                if not more:
                    break
                stale += n
                n = more
        received = stale + n
        now = time.monotonic_ns()
        # Per chunk a handful of numpy calls, per sample plain Python: most pulls take one
        # or a few samples, where numpy's per-call cost is what counts.
        data = inlet.samples[:n]
        ts: list[float] = inlet.timestamps[:n].tolist()
        rows: list[int] | None = None  # the rows kept, None: all of them
        non_finite = 0
        # A sum is finite exactly when every term is (float64: no overflow from float32).
        if not math.isfinite(float(data.sum(dtype=np.float64)) + sum(ts)):
            finite = np.isfinite(data).all(axis=1) & np.isfinite(inlet.timestamps[:n])
            rows = np.flatnonzero(finite).tolist()
            non_finite = n - len(rows)
            ts = [ts[i] for i in rows]
        if self.daemon_clock:
            captured = [max(min(int(t * 1e9), now), 0) for t in ts]
        else:
            captured = [now] * len(ts)
        if self.freshness.sheds and ts:
            keep = self.freshness.keep(np.array(captured, np.int64), now)
            if not keep.all():
                kept: list[int] = np.flatnonzero(keep).tolist()
                stale += len(ts) - len(kept)
                rows = kept if rows is None else [rows[i] for i in kept]
                ts = [ts[i] for i in kept]
                captured = [captured[i] for i in kept]
        if not ts:
            return Pulled([], received, stale, non_finite)
        values = data if rows is None else data[rows]
        placement = self.placement
        if placement.whole:
            payload = values.copy()
        else:
            payload = np.zeros((len(ts), self.total), np.float32)
            payload[:, placement.columns] = values
        sid, present = self.stream_id, placement.present
        frames = [
            Frame(sid, s, t, row, present, r, LABEL)
            for s, t, row, r in zip(self._seqs(ts), ts, payload, captured, strict=True)
        ]
        return Pulled(frames, received, stale, non_finite)

    def _seqs(self, ts: list[float]) -> list[int]:
        """The seqs of samples timestamped `ts`: microseconds, strictly increasing, above
        the stream's last seq — unless this inlet's first sample is further before it
        than an inlet can hold (`rewind_us`; less is an overlap, the new outlet's buffer
        reaching back before the old one's end): its clock restarted (an outlet host's
        reboot, with `clock_sync = "none"`), the seqs restart there and admission sees a
        new session."""
        last = self.seq.last
        if self.opened:
            self.opened = False
            if last is not None and _seq(ts[0]) < last - self.rewind_us:
                last = None
        seqs = []
        for t in ts:
            s = _seq(t)
            if last is not None and s <= last:
                s = last + 1
            seqs.append(s)
            last = s
        self.seq.last = last
        return seqs


def _seq(t: float) -> int:
    """A timestamp's seq: microseconds, within [0, 2⁶³)."""
    return min(max(round(t * 1e6), 0), _MAX_SEQ)
