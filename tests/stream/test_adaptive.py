"""Adaptive batching: AIMD over the deadline and the compiled buckets, never beyond them."""

from __future__ import annotations

import numpy as np

from stream.adaptive import AdaptiveBatching
from stream.batcher import Batcher

BUCKETS = (1, 8, 64, 256)


def controller(**kw: float) -> tuple[AdaptiveBatching, Batcher]:
    batcher = Batcher(256, 0.002)
    return AdaptiveBatching(batcher, BUCKETS, 0.005, max_wait_s=0.002, window=4, **kw), batcher


def feed(c: AdaptiveBatching, latency_s: float, batches: int) -> None:
    for _ in range(batches):
        c.observe(np.full(16, latency_s))


def test_over_the_slo_halves_the_deadline_and_drops_a_bucket() -> None:
    c, batcher = controller()
    feed(c, 0.009, 4)
    assert c.decisions == 1 and c.last_p99_s == 0.009
    assert batcher.max_wait_ns == 1_000_000 and batcher.max_batch == 64
    feed(c, 0.009, 12)
    assert batcher.max_batch == 1 and batcher.max_wait_ns == 125_000
    feed(c, 0.009, 8)
    assert batcher.max_batch == 1  # never below the smallest bucket


def test_with_headroom_it_grows_back_deadline_first_then_buckets() -> None:
    c, batcher = controller()
    feed(c, 0.009, 8)  # down to 0.5 ms, bucket 8
    feed(c, 0.001, 4)
    assert batcher.max_wait_ns == 750_000 and batcher.max_batch == 8
    feed(c, 0.001, 4 * 6)  # deadline back at its 2 ms ceiling, then a bucket up
    assert batcher.max_wait_ns == 2_000_000
    assert batcher.max_batch == 64
    feed(c, 0.001, 4 * 10)
    assert batcher.max_batch == 256  # never above the largest compiled bucket
    assert {batcher.max_batch} <= set(BUCKETS)


def test_between_headroom_and_slo_it_holds() -> None:
    c, batcher = controller()
    before = (batcher.max_wait_ns, batcher.max_batch)
    feed(c, 0.0045, 8)
    assert (batcher.max_wait_ns, batcher.max_batch) == before
