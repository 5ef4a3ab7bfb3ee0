"""Multi-rate alignment: one body's frames joined from several input streams by time.

A body (`[[align.bodies]]`) is fed by a *driving* input stream and one or more other
inputs, each carrying some modalities at its own rate — an IMU's proprioception at
1 kHz driving, a skin's tactile frames at 100 Hz. Every driving frame becomes one frame
of the body, at the driving frame's time, seq, receipt and source; each other input
contributes its **latest sample at or before that time, if it is at most `tolerance`
older** (sample and hold with a maximum age); an input with no such sample leaves its
modalities absent — their presence bits off, zero-filled, never guessed.

```
 imu-1   ─ d ─ d ─ d ─ d ─ d ─ d ─ d ─ d ─►   drive: one body frame per sample
 touch-1 ──── t ─────────── t ────────────►   latest at or before, ≤ tolerance older
 arm-1   ─ f ─ f ─ f ─ f ─ f ─ f ─ f ─ f ─►   proprio from d, tactile from t or absent
```

**When a frame is emitted.** A driving frame at time *t* waits until every other input
has shown a sample at or after *t* (its latest sample before *t* is then known, however
the inputs' arrivals interleave), or until it has waited `max_wait` on the daemon's
clock (an input that is slow or silent does not hold the body up longer than that).
Frames are emitted in driving order. So, given the same samples in the same order of
arrival per input, the output is the same whatever the interleaving of the inputs —
unless `max_wait` ran out, which depends on the clock.

**Late samples.** A sample (of any input) whose time is at or before a frame its body
has already emitted arrives too late to be used: it is dropped and counted,
`enactive_frames_dropped_total{reason="late"}`. Arrivals out of order across inputs are
what the waiting absorbs; within one input they are used when they arrive in time.

**Against ROS `message_filters.ApproximateTime`.** ApproximateTime emits a set only when
*every* input has a message, choosing the sets that minimise the time spread, and drops
messages that never make a set; it waits for later messages to be sure a set is the
best. Here every driving sample gives a frame (the presence mask says what joined it), a
match is the latest sample within the tolerance (causal: never a sample from after the
frame's time), and the wait is bounded by `max_wait`. ApproximateTime's `max_interval`
plays the part of `tolerance`; its `age_penalty` has no counterpart.

Sequence numbers: each input's frames must have increasing seqs (duplicates and stale
seqs are rejected and counted like any stream's); a body's frames carry their driving
frame's seq, and go through admission as the body's stream. Source positions (a broker's
messages) of the samples a body consumed are released once the frames that could use
them are emitted, due when those frames' effects are durable (`stream.commits`).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .protocol import MOTOR, PROPRIO, SENSORY, SESSION_START, TACTILE, Dims, Frame, FrameRejected

__all__ = ["Aligner", "Body", "bodies"]

MAX_HELD = 8192
"""Samples held per other input at most; beyond, the oldest go (a driving input that is
silent while the others send must not make them grow without end)."""

Release = Callable[[Frame, str, int | None], None]
"""`release(frame, body_id, barrier)`: a consumed sample's position may be committed
once `body_id`'s processed seq reaches `barrier` (None: at the next checkpoint)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Body:
    """One aligned body: its stream id, driving input, other inputs, the match tolerance
    and the longest a driving frame waits (nanoseconds)."""

    id: str
    drive: str
    inputs: tuple[str, ...]
    tolerance_ns: int
    max_wait_ns: int


def bodies(config: Any) -> tuple[Body, ...]:
    """The bodies of an `AlignConfig` (`[align]`), with the section's defaults."""
    return tuple(
        Body(
            id=b["id"],
            drive=b["drive"],
            inputs=tuple(b["inputs"]),
            tolerance_ns=round(b.get("tolerance_ms", config.tolerance_ms) * 1e6),
            max_wait_ns=round(b.get("max_wait_ms", config.max_wait_ms) * 1e6),
        )
        for b in config.bodies
    )


def _time_ns(frame: Frame) -> int:
    return round(frame.timestamp * 1e9)


class _Input:
    """One other input of a body: its samples in time order, as (time ns, frame)."""

    __slots__ = ("newest_ns", "samples", "times")

    def __init__(self) -> None:
        self.samples: list[Frame] = []
        self.times: list[int] = []
        self.newest_ns: int | None = None

    def add(self, t: int, frame: Frame) -> list[Frame]:
        """Hold a sample; returns those that had to go to make room (the oldest)."""
        i = bisect.bisect_right(self.times, t)
        self.times.insert(i, t)
        self.samples.insert(i, frame)
        if self.newest_ns is None or t > self.newest_ns:
            self.newest_ns = t
        if len(self.samples) <= MAX_HELD:
            return []
        gone = self.samples[: MAX_HELD // 2]
        del self.samples[: MAX_HELD // 2], self.times[: MAX_HELD // 2]
        return gone

    def latest(self, t: int, tolerance_ns: int) -> Frame | None:
        """The latest sample at or before `t`, if at most `tolerance_ns` older."""
        i = bisect.bisect_right(self.times, t) - 1
        if i >= 0 and t - self.times[i] <= tolerance_ns:
            return self.samples[i]
        return None

    def prune(self, emitted_ns: int) -> list[Frame]:
        """Drop the samples no later frame can use (every one at or before `emitted_ns`
        but the latest of them); returns them."""
        i = bisect.bisect_right(self.times, emitted_ns) - 1
        if i <= 0:
            return []
        gone = self.samples[:i]
        del self.samples[:i], self.times[:i]
        return gone


class _BodyState:
    __slots__ = ("body", "emitted_ns", "emitted_seq", "order", "others", "pending")

    def __init__(self, body: Body) -> None:
        self.body = body
        # driving frames waiting: (time ns, arrival ns, frame), in driving order
        self.pending: collections.deque[tuple[int, int, Frame]] = collections.deque()
        self.others = {stream_id: _Input() for stream_id in body.inputs}
        self.emitted_ns: int | None = None  # the time of the last frame emitted
        self.emitted_seq: int | None = None
        self.order = (body.drive, *body.inputs)


class Aligner:
    """Joins the configured bodies' inputs into body frames (sans I/O: the caller
    passes the clock and admits what comes out).

    **Arguments:**

    - `bodies`: the bodies; each input stream feeds one.
    - `dims`: the modality sizes (which payload columns each presence bit covers).
    - `reject(frame, reason)`: a repeated or stale seq of an input (count it).
    - `late(n)`: `n` samples arrived too late to be used (count them).
    - `release`: see `Release`; called for every consumed input frame that carries a
        source position.
    """

    def __init__(
        self,
        bodies: Sequence[Body],
        dims: Dims,
        *,
        reject: Callable[[Frame, str], None] = lambda frame, reason: None,
        late: Callable[[int], None] = lambda n: None,
        release: Release = lambda frame, body_id, barrier: None,
    ) -> None:
        self._states = [_BodyState(body) for body in bodies]
        self.inputs: dict[str, _BodyState] = {}
        for state in self._states:
            for stream_id in state.order:
                self.inputs[stream_id] = state
        self._input_ids = frozenset(self.inputs)
        self._last_seq: dict[str, int] = {}
        self._columns = _modality_columns(dims)
        self._total = dims.total
        self._reject, self._late, self._release = reject, late, release

    def wants(self, stream_ids: Sequence[str] | str) -> bool:
        """Whether any of these stream ids is an input of a body."""
        if isinstance(stream_ids, str):
            return stream_ids in self._input_ids
        return not self._input_ids.isdisjoint(stream_ids)

    @property
    def pending(self) -> int:
        """Driving frames waiting."""
        return sum(len(s.pending) for s in self._states)

    def next_due_ns(self) -> int | None:
        """When the oldest waiting driving frame runs out of `max_wait` (None: none)."""
        due = [s.pending[0][1] + s.body.max_wait_ns for s in self._states if s.pending]
        return min(due) if due else None

    def add(self, frame: Frame, now_ns: int) -> tuple[list[Frame], FrameRejected | None]:
        """Take one input frame that arrived at `now_ns`; returns the body frames now
        ready, in order, and the frame's rejection (a repeated or stale seq) if any."""
        state = self.inputs[frame.stream_id]
        why = self._check_seq(frame)
        if why is not None:
            return [], why
        t = _time_ns(frame)
        body = state.body
        late_before = state.emitted_ns
        if frame.stream_id == body.drive:
            last = state.pending[-1][0] if state.pending else late_before
            if last is not None and t <= last:
                self._dropped_late(frame, body)
                return [], None
            state.pending.append((t, now_ns, frame))
        else:
            if late_before is not None and t <= late_before:
                self._dropped_late(frame, body)
                return [], None
            for gone in state.others[frame.stream_id].add(t, frame):
                if gone.position is not None:
                    self._release(gone, body.id, None)
        return self._ready(state, now_ns, force=False), None

    def due(self, now_ns: int) -> list[Frame]:
        """The body frames whose driving frame has waited `max_wait` by `now_ns`."""
        out: list[Frame] = []
        for state in self._states:
            out += self._ready(state, now_ns, force=False)
        return out

    def flush(self) -> list[Frame]:
        """Every waiting driving frame, as it stands (at shutdown)."""
        out: list[Frame] = []
        for state in self._states:
            out += self._ready(state, 0, force=True)
        return out

    # -- inside ---------------------------------------------------------------------------

    def _check_seq(self, frame: Frame) -> FrameRejected | None:
        last = self._last_seq.get(frame.stream_id)
        if last is not None and not frame.present & SESSION_START and frame.seq <= last:
            reason = "duplicate_seq" if frame.seq == last else "stale_seq"
            self._reject(frame, reason)
            if frame.position is not None:
                self._release(frame, self.inputs[frame.stream_id].body.id, None)
            return FrameRejected(
                reason,
                f"seq {frame.seq} of {frame.stream_id!r} "
                + ("seen already" if frame.seq == last else f"< last {last}"),
                stream_id=frame.stream_id,
                seq=frame.seq,
            )
        self._last_seq[frame.stream_id] = frame.seq
        return None

    def _dropped_late(self, frame: Frame, body: Body) -> None:
        self._late(1)
        if frame.position is not None:
            self._release(frame, body.id, None)

    def _ready(self, state: _BodyState, now_ns: int, *, force: bool) -> list[Frame]:
        out: list[Frame] = []
        body, pending, others = state.body, state.pending, state.others
        while pending:
            t, arrived, drive = pending[0]
            waited = force or now_ns - arrived >= body.max_wait_ns
            if not waited and any(
                x.newest_ns is None or x.newest_ns < t for x in others.values()
            ):
                break
            pending.popleft()
            out.append(self._join(state, t, drive))
        if out:
            assert state.emitted_ns is not None
            for stream_id in body.inputs:
                for gone in others[stream_id].prune(state.emitted_ns):
                    if gone.position is not None:
                        self._release(gone, body.id, state.emitted_seq)
        return out

    def _join(self, state: _BodyState, t: int, drive: Frame) -> Frame:
        body = state.body
        payload = np.zeros(self._total, np.float32)
        present = drive.present & SESSION_START
        for stream_id in state.order:
            sample = drive if stream_id == body.drive else state.others[stream_id].latest(
                t, body.tolerance_ns
            )
            if sample is None:
                continue
            for bit, columns in self._columns:
                if sample.present & bit and not present & bit:
                    payload[columns] = sample.payload[columns]
                    present |= bit
        state.emitted_ns, state.emitted_seq = t, drive.seq
        return Frame(
            body.id,
            drive.seq,
            drive.timestamp,
            payload,
            present,
            drive.received_ns,
            drive.source,
            drive.position,
        )


def _modality_columns(dims: Dims) -> list[tuple[int, slice]]:
    bits = (SENSORY, PROPRIO, TACTILE, MOTOR)
    sizes = (dims.sensory, dims.proprio, dims.tactile, dims.motor)
    out, start = [], 0
    for bit, size in zip(bits, sizes, strict=True):
        out.append((bit, slice(start, start + size)))
        start += size
    return out
