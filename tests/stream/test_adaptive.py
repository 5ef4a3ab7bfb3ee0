"""Adaptive batching: AIMD over the compiled buckets and the deadline, never beyond them,
and never shrinking batches when the service is backlogged."""

from __future__ import annotations

import numpy as np

from stream.adaptive import AdaptiveBatching
from stream.batcher import Batcher
from stream.events import BatchTimes

BUCKETS = (1, 8, 64, 256)


def controller() -> tuple[AdaptiveBatching, Batcher]:
    batcher = Batcher(256, 0.002)
    return AdaptiveBatching(batcher, BUCKETS, 0.005, max_wait_s=0.002, window=4), batcher


def feed(
    c: AdaptiveBatching, *, latency_s: float, device_s: float, fill: float, batches: int
) -> None:
    for _ in range(batches):
        rows = max(1, int(fill * c.max_batch))
        c.moments(BatchTimes(c.max_batch, device_s, 0.0, 0.0, np.full(rows, latency_s)))


def test_a_step_too_slow_for_the_slo_drops_a_bucket_and_halves_the_deadline() -> None:
    c, batcher = controller()
    feed(c, latency_s=0.009, device_s=0.004, fill=0.5, batches=4)
    assert c.decisions == 1 and c.last_p99_s == 0.009
    assert batcher.max_batch == 64 and batcher.max_wait_ns == 1_000_000
    feed(c, latency_s=0.009, device_s=0.006, fill=0.5, batches=40)
    assert batcher.max_batch == 1  # never below the smallest bucket


def test_backlog_grows_the_batches_even_over_the_slo() -> None:
    c, batcher = controller()
    feed(c, latency_s=0.009, device_s=0.006, fill=0.5, batches=8)  # down to bucket 8
    assert batcher.max_batch == 8
    feed(c, latency_s=0.050, device_s=0.0005, fill=1.0, batches=4 * 5)
    assert batcher.max_batch == 256  # full batches: throughput first, up to the top bucket


def test_waiting_is_cut_when_over_the_slo_without_backlog_and_regrows_with_headroom() -> None:
    c, batcher = controller()
    feed(c, latency_s=0.008, device_s=0.0005, fill=0.3, batches=4)
    assert batcher.max_batch == 256 and batcher.max_wait_ns == 1_000_000
    feed(c, latency_s=0.001, device_s=0.0005, fill=0.3, batches=4 * 2)
    assert batcher.max_wait_ns == 1_500_000
    feed(c, latency_s=0.001, device_s=0.0005, fill=0.3, batches=4 * 10)
    assert batcher.max_wait_ns == 2_000_000  # its ceiling


def test_between_headroom_and_slo_it_holds() -> None:
    c, batcher = controller()
    before = (batcher.max_wait_ns, batcher.max_batch)
    feed(c, latency_s=0.0045, device_s=0.0005, fill=0.3, batches=8)
    assert (batcher.max_wait_ns, batcher.max_batch) == before
