"""Lab Streaming Layer through liblsl (the optional extra `lsl`, client `pylsl`, whose wheel
bundles liblsl): finding outlets, and one inlet's pulls into buffers allocated once.

The LSL source (`stream.sources.lsl`) turns what is pulled here into frames; everything
that calls into liblsl is here, and every call may block, so the source makes each one
in a worker thread, never on the event loop. `pylsl` is imported when first needed: the
daemon's modules import without it (`require_lsl` says what to install).

**Pulling.** A pull waits up to `wait_s` for one sample, then takes whatever else is
buffered, up to `chunk_samples`, in one more call (what `pull_chunk(min_samples=1)` does,
without its allocations): liblsl's `lsl_pull_chunk_f` writes the samples, converted to
float32 from any numeric channel format, and their timestamps straight into the inlet's
two arrays, `samples` (float32 `(chunk_samples, channels)`) and `timestamps` (float64
`(chunk_samples,)`), made once when the inlet opens.

**Clocks.** `clock_sync = "processing"`: liblsl maps every timestamp into this host's
`lsl_local_clock` (`proc_clocksync`; on Linux `CLOCK_MONOTONIC`, the daemon's clock), and
with `dejitter` smooths it and keeps it from going back (`proc_dejitter`,
`proc_monotonize`). `"time_correction"`: the inlet adds the
outlet's clock offset (`time_correction()`) itself, re-read every
`TIME_CORRECTION_EVERY_S` within a pull. `"none"`: the outlet's own clock, untouched.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from typing import Any, Literal

import numpy as np

__all__ = [
    "CHANNEL_FORMATS",
    "ClockSync",
    "Inlet",
    "LslError",
    "OutletInfo",
    "OutletLost",
    "Resolver",
    "require_lsl",
]

log = logging.getLogger(__name__)

ClockSync = Literal["processing", "time_correction", "none"]

CHANNEL_FORMATS = ("undefined", "float32", "double64", "string", "int32", "int16", "int8", "int64")
"""liblsl's channel formats, by their number (`cf_float32` = 1, ...)."""
NUMERIC_FORMATS = frozenset({1, 2, 4, 5, 6, 7})
OPEN_TIMEOUT_S = 5.0
"""How long opening an inlet (connecting, and with `time_correction` the first clock
offset estimate) may take before the attempt fails and is retried later."""
TIME_CORRECTION_EVERY_S = 5.0
"""How often `clock_sync = "time_correction"` reads the outlet's clock offset again."""
AHEAD_S = 0.05
"""A sample whose smoothed timestamp is this far ahead of the clock when it is pulled
shows liblsl's smoothing gone wrong (it was captured before it arrived): it restarts."""
STALL_S = 0.25
SETTLE_S = 0.02
"""A pull that returns more than its wait and `STALL_S` after the previous one (the
process was stalled: stopped, swapped out) waits `SETTLE_S` after its first sample, for
liblsl to take in the backlog from the connection, so that the pull takes all of it."""
FORGET_AFTER_S = 5.0
"""An outlet no longer answering is forgotten by the resolver after this long."""
_LOST = -2  # liblsl's lsl_lost_error


class LslError(Exception):
    """The LSL source cannot start: its extra is missing, or a setting is refused."""


class OutletLost(Exception):
    """An inlet's outlet went away, or could not be reached: the inlet must be closed."""


def require_lsl() -> None:
    """Raise `LslError` when the `lsl` extra (pylsl, and the liblsl it loads) is missing."""
    try:
        import pylsl  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # pylsl raises RuntimeError without liblsl
        raise LslError(
            "the LSL source needs the lsl extra: pip install 'enactive-stream[lsl]'"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class OutletInfo:
    """One outlet the resolver sees: its core stream information, and the `handle` (a
    `pylsl.StreamInfo`) an inlet opens it with. `uid` is unique to one outlet's life (a
    restarted outlet has a new one); `channel_format` is an index of `CHANNEL_FORMATS`;
    `rate_hz` is 0 for an irregular stream."""

    name: str
    type: str
    uid: str
    source_id: str
    hostname: str
    channel_count: int
    channel_format: int
    rate_hz: float
    handle: Any = dataclasses.field(repr=False, compare=False)

    @property
    def numeric(self) -> bool:
        return self.channel_format in NUMERIC_FORMATS

    @property
    def format_name(self) -> str:
        f = self.channel_format
        return CHANNEL_FORMATS[f] if 0 <= f < len(CHANNEL_FORMATS) else f"format {f}"

    def describe(self) -> str:
        """`'eeg' (type EEG on host lab-3, uid 5f1c…)`, for log lines."""
        return f"{self.name!r} (type {self.type!r} on host {self.hostname!r}, uid {self.uid})"


class Resolver:
    """liblsl's continuous resolver for an XPath 1.0 `predicate` over the stream
    information (`type='EEG' and starts-with(name, 'BioSemi')`): it looks for matching
    outlets in the background; `outlets()` (blocking briefly) lists those it sees now.
    Raises `LslError` when liblsl refuses the predicate."""

    def __init__(self, predicate: str) -> None:
        import pylsl

        try:
            self._resolver: Any = pylsl.ContinuousResolver(
                pred=predicate, forget_after=FORGET_AFTER_S
            )
        except RuntimeError:
            raise LslError(
                f"lsl.predicate = {predicate!r}: liblsl refused it; expected an XPath 1.0 "
                "predicate over the stream information, e.g. \"type='EEG'\" or "
                "\"starts-with(name, 'imu-')\""
            ) from None

    def outlets(self) -> list[OutletInfo]:
        return [
            OutletInfo(
                name=info.name(),
                type=info.type(),
                uid=info.uid(),
                source_id=info.source_id(),
                hostname=info.hostname(),
                channel_count=info.channel_count(),
                channel_format=info.channel_format(),
                rate_hz=info.nominal_srate(),
                handle=info,
            )
            for info in self._resolver.results()
        ]

    def close(self) -> None:
        self._resolver = None  # liblsl's resolver is destroyed with it (in this thread)


class Inlet:
    """One outlet's inlet: opened (connected, blocking up to `OPEN_TIMEOUT_S`) at
    construction, then pulled from one thread at a time.

    **Arguments:**

    - `info`: the outlet, numeric (`OutletInfo.numeric`).
    - `max_buflen_s`: what liblsl buffers for it at most, in seconds (for an irregular
        stream, hundreds of samples); beyond, liblsl drops the oldest samples.
    - `chunk_samples`: the most samples one pull takes.
    - `clock_sync`, `dejitter`: how timestamps are mapped (the module docstring).

    `samples`, `timestamps`: the pull buffers (float32 `(chunk_samples, channels)`,
    float64 `(chunk_samples,)`); `pull` fills their first rows.

    **Raises:** `OutletLost` when the outlet cannot be reached or does not answer in time.
    """

    def __init__(
        self,
        info: OutletInfo,
        *,
        max_buflen_s: int,
        chunk_samples: int,
        clock_sync: ClockSync,
        dejitter: bool,
    ) -> None:
        import pylsl

        # Smoothed timestamps, kept from going back (as the fit settles, or jitters).
        flags = pylsl.proc_dejitter | pylsl.proc_monotonize if dejitter else 0
        if clock_sync == "processing":
            flags |= pylsl.proc_clocksync
        self.name = info.name
        self.channels = info.channel_count
        self.capacity = chunk_samples
        self.samples = np.zeros((chunk_samples, self.channels), np.float32)
        self.timestamps = np.zeros(chunk_samples, np.float64)
        self.correction = 0.0
        self.smoothing_restarts = 0
        self._correct = clock_sync == "time_correction"
        self._corrected_at = 0.0
        self._flags = flags
        self._dejitter = dejitter and info.rate_hz > 0  # (liblsl smooths regular streams only)
        self._local_clock = clock_sync != "none"
        self._gap_s = max_buflen_s / 2
        self._stalled_s = 0.0  # a stall seen by a pull that got nothing
        try:
            # recover=False: a lost outlet is reported (OutletLost), never silently
            # waited for; the source resolves it again, under whatever uid it comes back.
            self._inlet: Any = pylsl.StreamInlet(
                info.handle, max_buflen=max_buflen_s, recover=False, processing_flags=flags
            )
            self._inlet.open_stream(timeout=OPEN_TIMEOUT_S)
            if clock_sync != "none":  # the first estimate takes a while: here, not in a pull
                correction = self._inlet.time_correction(timeout=OPEN_TIMEOUT_S)
                if self._correct:
                    self.correction = correction
                    self._corrected_at = time.monotonic()
        except (pylsl.util.LostError, pylsl.util.TimeoutError, RuntimeError) as e:
            self._inlet = None
            raise OutletLost(f"cannot open an inlet: {e}") from None
        self._pull = _pull_chunk_f()
        self._obj = self._inlet.obj
        self._error = ctypes.c_int32()
        self._error_ref = ctypes.byref(self._error)
        self._data = self.samples.ctypes.data
        self._ts = self.timestamps.ctypes.data
        self._returned = self._called = time.monotonic()

    def pull(self, wait_s: float, interval_s: float = 0.0) -> int:
        """Wait up to `wait_s` for a sample, then take what else is buffered (at most
        `capacity` in all) into the first rows of `samples` and `timestamps` (corrected as
        configured): how many (0: none came). A sample that comes sooner than
        `interval_s` after the previous pull returned waits out the rest of it, so that
        those after it come along (a fast outlet's samples in few pulls rather than one
        each). Raises `OutletLost`.

        Pulls follow each other closely, each waiting at most `wait_s`, unless the
        process stalled (stopped, swapped out). Then liblsl may have dropped samples (its
        buffer full), which skews its smoothing (restarted), and it is still taking in
        what queued on the connection meanwhile: the pull waits `SETTLE_S` for it, and
        takes it all."""
        start = time.monotonic()
        if self._correct and start - self._corrected_at >= TIME_CORRECTION_EVERY_S:
            self._refresh_correction()
        stalled_s = max(self._stalled_s, start - self._called)
        if stalled_s > STALL_S:
            self._stalled(stalled_s)  # before this pull: from its first sample on
        got = self._take(0, wait_s)
        now = time.monotonic()
        if not got:
            self._called = now
            if now - start > wait_s + STALL_S:  # stalled while waiting: seen next time
                self._stalled_s = now - start
            return 0
        self._stalled_s = 0.0
        if stalled_s <= STALL_S and now - start > wait_s + STALL_S:
            stalled_s = now - start
            self._stalled(stalled_s)  # while waiting: from the next sample on
        elif stalled_s <= STALL_S and interval_s:
            pause = self._returned + interval_s - now
            if pause > 0:
                time.sleep(pause)
        n = got + self._take(got, 0.0)
        late = time.monotonic() - now - max(interval_s, SETTLE_S)
        if late > STALL_S and n < self.capacity:  # stalled meanwhile: once more
            self._stalled(late)
            n += self._take(n, 0.0)
        if self.correction:
            self.timestamps[:n] += self.correction
        self._returned = self._called = now = time.monotonic()
        if self._dejitter and self._local_clock and self.timestamps[n - 1] > now + AHEAD_S:
            self._restart_smoothing(None)
        return n

    def _take(self, row: int, wait_s: float) -> int:
        """Pull into rows `row`… (waiting up to `wait_s` for the first, when `row` is 0,
        then taking one sample; else what is there): how many."""
        first = row == 0
        rows = 1 if first else self.capacity - row
        if rows <= 0:
            return 0
        channels = self.channels
        got = self._pull(
            self._obj,
            self._data + 4 * channels * row,
            self._ts + 8 * row,
            channels * rows,
            rows,
            wait_s if first else 0.0,
            self._error_ref,
        )
        self._check()
        return got // channels

    def _stalled(self, seconds: float) -> None:
        """The process stalled for `seconds`: restart the smoothing if liblsl may have
        dropped samples meanwhile, and let it take in the backlog."""
        if self._dejitter and seconds > self._gap_s:
            self._restart_smoothing(seconds)
        time.sleep(SETTLE_S)

    def _restart_smoothing(self, stalled_s: float | None) -> None:
        """Start liblsl's timestamp smoothing afresh (switching it off and on resets it):
        its model counts samples, so samples liblsl dropped (its buffer overflowed while
        nothing was pulled) or an outlet's pause skew it for minutes; afresh, it starts
        from the next sample's own timestamp."""
        from pylsl import proc_dejitter, proc_monotonize
        from pylsl.lib import lib

        # (monotonizing too: it would hold the timestamps at the skewed ones' height)
        lib.lsl_set_postprocessing(self._obj, self._flags & ~(proc_dejitter | proc_monotonize))
        lib.lsl_set_postprocessing(self._obj, self._flags)
        self.smoothing_restarts += 1
        why = (
            "its timestamps ran ahead of the clock"
            if stalled_s is None
            else f"nothing pulled for {stalled_s:.1f} s: samples may be lost"
        )
        log.info("lsl: outlet %r: timestamp smoothing restarted (%s)", self.name, why)

    def _check(self) -> None:
        code = self._error.value
        if code:
            self._error.value = 0
            raise OutletLost("" if code == _LOST else f"liblsl error {code}")

    def _refresh_correction(self) -> None:
        import pylsl

        try:
            self.correction = self._inlet.time_correction(timeout=0.5)
        except pylsl.util.TimeoutError:
            pass  # keep the last estimate; try again next time
        except pylsl.util.LostError:
            raise OutletLost("") from None
        self._corrected_at = time.monotonic()

    def close(self) -> None:
        """Disconnect (blocking: liblsl joins the inlet's threads)."""
        inlet, self._inlet = self._inlet, None
        if inlet is not None:
            inlet.close_stream()
            del inlet  # destroyed here, in this thread


_PULL_CHUNK_F: Any = None


def _pull_chunk_f() -> Any:
    """liblsl's `lsl_pull_chunk_f(inlet, data, timestamps, data_elements,
    timestamp_elements, timeout, &error) -> data elements written`, with its own
    prototype (pylsl's declares none), from the liblsl pylsl loaded. ctypes releases the
    GIL while it runs."""
    global _PULL_CHUNK_F
    if _PULL_CHUNK_F is None:
        from pylsl.lib import lib

        prototype = ctypes.CFUNCTYPE(
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_double,
            ctypes.POINTER(ctypes.c_int32),
        )
        _PULL_CHUNK_F = prototype(("lsl_pull_chunk_f", lib))
    return _PULL_CHUNK_F
