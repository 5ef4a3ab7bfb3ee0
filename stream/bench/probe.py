"""The daemon as seen from outside during one run: its process CPU time and `/metrics`.

A `Snapshot` is the daemon's CPU seconds (`/proc/<pid>/stat`, utime + stime, every
thread) and its raw `/metrics` text at one instant; `daemon_delta` turns two of them into
what the daemon did in between: CPU µs per frame processed, frames/s, the batches formed
by bucket, the batch fill, and its end-to-end latency percentiles from the histogram's
bucket deltas. `RunProbe` takes the snapshots of one client run: at its start, at the end
of its warm-up (from a thread of its own that only reads: the parsing waits for the end,
so no sender or receiver waits for it) and at its end.

The clients (`stream.bench.client`, `stream.bench.fleet`) use it, in their own process:
the window then starts when the first frame is due and ends when the last moment is
received, without the process start and the connection set-up around it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from .procfs import cpu_seconds

__all__ = [
    "RunProbe",
    "Snapshot",
    "accounted",
    "daemon_delta",
    "histogram_quantile",
    "queue_depths",
    "take_snapshot",
    "thread_cpu_seconds",
]

E2E = "enactive_end_to_end_latency_seconds"
FILL = "enactive_batch_fill_ratio"
QUANTILES = (0.5, 0.9, 0.99)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid`'s threads so far, summed by name
    (`/proc/<pid>/task/<tid>/stat`): the main thread (the daemon's event loop) as
    `main`, the others by their `comm` (XLA's `tf_…` pools; Python threads are `python`).
    A thread that ended since is missing: compare with `cpu_seconds` for the whole."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:  # ended meanwhile
            continue
        head, _, rest = raw.rpartition(")")
        name = "main" if tid == str(pid) else head.partition("(")[2]
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The daemon at one instant: `at` (`time.perf_counter`), `cpu_s`, its threads' CPU
    seconds by name (`thread_cpu_seconds`), `/metrics` text."""

    at: float
    cpu_s: float
    threads: dict[str, float]
    metrics: str


def take_snapshot(host: str, metrics_port: int, pid: int, timeout: float = 10.0) -> Snapshot:
    """Read the daemon's CPU time, then its `/metrics` (raw: parsed by `daemon_delta`)."""
    at, cpu, threads = time.perf_counter(), cpu_seconds(pid), thread_cpu_seconds(pid)
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return Snapshot(at, cpu, threads, text)


Samples = list[tuple[str, dict[str, str], float]]


def _samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, labels, v in samples:
        if n == name and label in labels:
            out[labels[label]] = out.get(labels[label], 0.0) + v
    return out


def _total(samples: Samples, name: str) -> float:
    return sum(v for n, _, v in samples if n == name)


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _grown(after: Samples, before: Samples, name: str, label: str) -> dict[str, float]:
    """How much each `label` value's series of counter `name` grew (those that did)."""
    return {k: v for k, v in _minus(_by(after, name, label), _by(before, name, label)).items() if v}


def histogram_quantile(bounds: Sequence[float], cumulative: Sequence[float], q: float) -> float:
    """The `q`-quantile of a histogram, as Prometheus's `histogram_quantile` computes it:
    linear interpolation inside the bucket that holds it (from 0 in the first bucket);
    in the `+Inf` bucket, the highest finite bound.

    **Arguments:**

    - `bounds`: upper bounds, increasing, the last `math.inf`.
    - `cumulative`: the count of observations ≤ each bound.
    - `q`: in [0, 1].

    **Returns:** the quantile; NaN when the histogram is empty.
    """
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    for i, (bound, count) in enumerate(zip(bounds, cumulative, strict=True)):
        if count >= rank:
            if math.isinf(bound):
                return bounds[i - 1] if i else 0.0
            lo = bounds[i - 1] if i else 0.0
            below = cumulative[i - 1] if i else 0.0
            inside = count - below
            return lo + (bound - lo) * ((rank - below) / inside if inside else 1.0)
    return bounds[-2] if len(bounds) > 1 else math.nan


def _histogram(after: Samples, before: Samples, name: str) -> tuple[list[float], list[float]]:
    """(bounds, cumulative count deltas) of histogram `name` (one series), by bound."""
    delta = _minus(_by(after, f"{name}_bucket", "le"), _by(before, f"{name}_bucket", "le"))
    pairs = sorted((float(le), v) for le, v in delta.items())
    return [b for b, _ in pairs], [v for _, v in pairs]


def queue_depths(snapshot: Snapshot) -> dict[str, float]:
    """`enactive_queue_depth{stage}` in a snapshot: what waits in each pipeline stage."""
    return _by(_samples(snapshot.metrics), "enactive_queue_depth", "stage")


def accounted(before: Snapshot, after: Snapshot) -> float:
    """Frames the daemon finished with between two snapshots: processed + rejected +
    dropped (each frame it received ends as one of them)."""
    a, b = _samples(after.metrics), _samples(before.metrics)
    names = (
        "enactive_frames_processed_total",
        "enactive_frames_rejected_total",
        "enactive_frames_dropped_total",
    )
    return sum(_total(a, n) - _total(b, n) for n in names)


def daemon_delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What the daemon did between two snapshots.

    **Returns:** a JSON-ready dict: `wall_s`, `cpu_s`, `processed` (frames stepped),
    `received` (by source), `rejected` (and `rejected_by_reason`), `dropped`,
    `moments_dropped_by_reason` (moments a sink could not take), `cpu_us_per_frame` (`cpu_s` ÷
    `processed`, µs; None without frames), `cores` (`cpu_s` ÷ `wall_s`), `frames_per_s`
    (`processed` ÷ `wall_s`), `batches`, `batches_by_bucket` (bucket → batches, the
    buckets used), `frames_per_batch`, `batch_fill` (the mean real rows ÷ bucket),
    `batch_fill_histogram` (upper bound → batches in that fill bucket, not cumulative),
    `latency_ms` (`p50`, `p90`, `p99` interpolated in the end-to-end latency histogram's
    buckets, `mean`; NaN-free: None where no frame was observed), `threads_cpu_s` (by
    thread name, see `thread_cpu_seconds`), `main_cpu_us_per_frame` (the main thread's:
    the event loop).
    """
    a, b = _samples(after.metrics), _samples(before.metrics)
    wall, cpu = after.at - before.at, after.cpu_s - before.cpu_s
    processed = _total(a, "enactive_frames_processed_total") - _total(
        b, "enactive_frames_processed_total"
    )
    batches = _grown(a, b, "enactive_batches_total", "bucket")
    n_batches = sum(batches.values())
    fill_count = _total(a, f"{FILL}_count") - _total(b, f"{FILL}_count")
    fill_sum = _total(a, f"{FILL}_sum") - _total(b, f"{FILL}_sum")
    fill_bounds, fill_cum = _histogram(a, b, FILL)
    fill_hist = {
        ("+Inf" if math.isinf(bound) else f"{bound:g}"): count - (fill_cum[i - 1] if i else 0.0)
        for i, (bound, count) in enumerate(zip(fill_bounds, fill_cum, strict=True))
    }
    lat_bounds, lat_cum = _histogram(a, b, E2E)
    lat_count = _total(a, f"{E2E}_count") - _total(b, f"{E2E}_count")
    lat_sum = _total(a, f"{E2E}_sum") - _total(b, f"{E2E}_sum")
    latency: dict[str, float | None] = {}
    for q in QUANTILES:
        value = histogram_quantile(lat_bounds, lat_cum, q) if lat_bounds else math.nan
        latency[f"p{100 * q:g}"] = None if math.isnan(value) else 1e3 * value
    latency["mean"] = 1e3 * lat_sum / lat_count if lat_count else None
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "processed": processed,
        "received": _minus(
            _by(a, "enactive_frames_received_total", "source"),
            _by(b, "enactive_frames_received_total", "source"),
        ),
        "rejected": _total(a, "enactive_frames_rejected_total")
        - _total(b, "enactive_frames_rejected_total"),
        "rejected_by_reason": _grown(a, b, "enactive_frames_rejected_total", "reason"),
        "moments_dropped_by_reason": _grown(a, b, "enactive_moments_dropped_total", "reason"),
        "dropped": _total(a, "enactive_frames_dropped_total")
        - _total(b, "enactive_frames_dropped_total"),
        "cpu_us_per_frame": 1e6 * cpu / processed if processed else None,
        "cores": cpu / wall if wall > 0 else None,
        "frames_per_s": processed / wall if wall > 0 else None,
        "batches": n_batches,
        "batches_by_bucket": batches,
        "frames_per_batch": processed / n_batches if n_batches else None,
        "batch_fill": fill_sum / fill_count if fill_count else None,
        "batch_fill_histogram": {k: v for k, v in fill_hist.items() if v},
        "latency_ms": latency,
        "threads_cpu_s": {
            k: v - before.threads.get(k, 0.0)
            for k, v in sorted(after.threads.items())
            if v - before.threads.get(k, 0.0) > 0
        },
        "main_cpu_us_per_frame": (
            1e6 * (after.threads.get("main", 0.0) - before.threads.get("main", 0.0)) / processed
            if processed
            else None
        ),
    }


class RunProbe:
    """The daemon's snapshots around one client run.

    **Arguments:** the daemon's `host`, `metrics_port` and `pid`.

    `begin()` takes the first snapshot; `start_warm(at)` takes one more from a thread
    when `time.perf_counter()` reaches `at` (the warm-up's end); `finish()` takes the last
    and returns `{"run": daemon_delta(first, last), "measured": daemon_delta(warm or
    first, last)}`.
    """

    def __init__(self, host: str, metrics_port: int, pid: int) -> None:
        self.host, self.port, self.pid = host, metrics_port, pid
        self.first: Snapshot | None = None
        self.warm: Snapshot | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()

    def snapshot(self) -> Snapshot:
        """One snapshot of the daemon now."""
        return take_snapshot(self.host, self.port, self.pid)

    def begin(self) -> None:
        """Take the first snapshot."""
        self.first = self.snapshot()

    def start_warm(self, at: float) -> None:
        """Take a snapshot at `at` (`time.perf_counter`), from a thread of its own."""

        def warm() -> None:
            delay = at - time.perf_counter()
            if delay > 0 and self._cancel.wait(delay):
                return
            try:
                self.warm = self.snapshot()
            except BaseException as e:  # reported by finish()
                self._error = e

        self._thread = threading.Thread(target=warm, daemon=True)
        self._thread.start()

    def finish(self) -> dict[str, Any]:
        """Take the last snapshot; the deltas (see the class)."""
        assert self.first is not None, "begin() first"
        last = self.snapshot()
        if self._thread is not None:
            self._cancel.set()  # a run shorter than its warm-up: measure all of it
            self._thread.join()
        if self._error is not None:
            raise self._error
        return {
            "run": daemon_delta(self.first, last),
            "measured": daemon_delta(self.warm or self.first, last),
        }
