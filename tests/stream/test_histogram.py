"""BatchHistogram exposes exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream.histogram import BatchHistogram


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_exposition_as_a_histogram(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bounds = [1e-4, 1e-3, 0.01, 0.1, 1.0]
    values = np.concatenate([rng.exponential(0.01, 500), bounds, [0.0, 50.0]])
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("x_seconds", "doc", bounds, ["stage"])
    ours.register(batch)
    reference = Histogram("x_seconds", "doc", ["stage"], buckets=bounds, registry=theirs)
    for chunk in np.array_split(values, 7):
        batch.observe(chunk, "queue")
    for v in values:
        reference.labels("queue").observe(float(v))
    batch.labels("device")
    reference.labels("device")

    def no_sums(lines: list[str]) -> list[str]:
        return [line for line in lines if "_sum{" not in line]

    assert no_sums(exposition(ours)) == no_sums(exposition(theirs))
    sums = [
        float(line.split()[-1])
        for line in exposition(ours) + exposition(theirs)
        if line.startswith('x_seconds_sum{stage="queue"}')
    ]
    assert sums[0] == pytest.approx(sums[1])


def test_rejects_unsorted_buckets_and_wrong_labels() -> None:
    with pytest.raises(ValueError, match="increase"):
        BatchHistogram("x", "doc", [1.0, 0.5])
    h = BatchHistogram("x", "doc", [1.0], ["stage"])
    with pytest.raises(ValueError, match="labels"):
        h.labels("a", "b")
    h.observe([], "a")  # an empty batch is fine
    assert h.labels("a").counts.sum() == 0
