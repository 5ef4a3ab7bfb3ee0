"""Partitions of a scaled-out deployment: which instance owns which, the instance number
from a StatefulSet pod's name, and a checkpoint split by partition and merged back into
another instance's table, every stream's state and seq intact."""

from __future__ import annotations

import io

import numpy as np
import pytest

from stream.checkpoint import checkpoint_arrays, merge_contents
from stream.checkpoint_file import read_checkpoint_file
from stream.partitions import (
    instance_from_hostname,
    owned_partitions,
    partition_of,
    partition_transform,
)
from stream.streams import StreamTable

CAPACITY = 8
FINGERPRINT = {"model": "test", "capacity": CAPACITY}


def test_every_partition_has_exactly_one_owner() -> None:
    for instances in (1, 2, 3, 5):
        owners = [owned_partitions(i, instances, 12) for i in range(instances)]
        assert sorted(p for owned in owners for p in owned) == list(range(12))
        assert max(map(len, owners)) - min(map(len, owners)) <= 1


def test_partition_of_spreads_ids_and_matches_fnv1a() -> None:
    # Where nats-server put these ids with `{{partition(4,1)}}` (tests/e2e/test_cluster.py
    # checks a live server's placements too).
    assert [partition_of(f"s{i}", 4) for i in range(12)] == [2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 3, 0]
    counts = np.bincount([partition_of(f"robot-{i:05d}", 12) for i in range(12_000)])
    assert counts.min() > 800 and counts.max() < 1200
    assert partition_transform("sensors.", 12) == (
        "sensors.*",
        "sensors.{{partition(12,1)}}.{{wildcard(1)}}",
    )


def test_instance_from_a_statefulset_pods_name() -> None:
    assert instance_from_hostname("enactive-stream-2") == 2
    assert instance_from_hostname("enactive-stream-10.enactive-stream-headless.ns") == 10
    with pytest.raises(ValueError, match="trailing ordinal"):
        instance_from_hostname("laptop")


def state(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((3, 2), value, np.float32), "b": np.full(4, -value, np.float32)}


def test_a_checkpoint_split_by_partition_merges_back_whole() -> None:
    rng = np.random.default_rng(3)
    streams = [f"s-{i}" for i in range(6)]
    slab = {"a": rng.standard_normal((CAPACITY, 3, 2)).astype(np.float32),
            "b": rng.standard_normal((CAPACITY, 4)).astype(np.float32)}  # fmt: skip
    table = StreamTable(CAPACITY, 64)
    for slot, stream_id in zip([5, 0, 2, 7, 1, 3], streams, strict=True):
        table.slot_of[stream_id] = slot
        table.processed_seq[stream_id] = 100 + slot
    table.evicted_state("gone-1", state(9.0))
    table.processed_seq["gone-1"] = 4
    rows = {k: v[list(table.slot_of.values())] for k, v in slab.items()}
    expected = {s: {k: v[slot] for k, v in slab.items()} for s, slot in table.slot_of.items()}
    expected["gone-1"] = state(9.0)

    parts = 3
    blobs = []
    for p in range(parts):
        arrays = checkpoint_arrays(
            rows, table, FINGERPRINT, keep=lambda s, p=p: partition_of(s, parts) == p
        )
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        blobs.append(buffer.getvalue())
    # Another instance, which holds a stream of its own already, takes partitions 0..2.
    other = StreamTable(CAPACITY, 64)
    fresh = {"a": np.zeros((CAPACITY, 3, 2), np.float32), "b": np.zeros((CAPACITY, 4), np.float32)}
    other.slot_of["mine"] = other.free.pop()
    other.processed_seq["mine"] = 1
    for blob in blobs:
        contents = read_checkpoint_file(io.BytesIO(blob), fresh, CAPACITY, FINGERPRINT)
        merge_contents(contents, fresh, other)
    assert other.processed_seq == {**table.processed_seq, "mine": 1}
    assert len(set(other.slot_of.values())) == len(other.slot_of)  # no slot twice
    for stream_id, want in expected.items():
        if stream_id in other.slot_of:
            got = {k: v[other.slot_of[stream_id]] for k, v in fresh.items()}
        else:
            got = other.evicted_of(stream_id)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert other.restored >= set(table.processed_seq)


def test_streams_beyond_the_free_slots_are_kept_on_the_host() -> None:
    table = StreamTable(CAPACITY, 64)
    slab = {"a": np.arange(CAPACITY * 6, dtype=np.float32).reshape(CAPACITY, 3, 2),
            "b": np.arange(CAPACITY * 4, dtype=np.float32).reshape(CAPACITY, 4)}  # fmt: skip
    for slot in range(CAPACITY):
        table.slot_of[f"s{slot}"] = slot
        table.processed_seq[f"s{slot}"] = slot
    rows = {k: v[list(table.slot_of.values())] for k, v in slab.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **checkpoint_arrays(rows, table, FINGERPRINT, keep=lambda s: True))
    other = StreamTable(CAPACITY, 64)
    for _ in range(5):
        other.free.pop()  # five slots taken already
    fresh = {"a": np.zeros((CAPACITY, 3, 2), np.float32), "b": np.zeros((CAPACITY, 4), np.float32)}
    buffer.seek(0)
    merge_contents(read_checkpoint_file(buffer, fresh, CAPACITY, FINGERPRINT), fresh, other)
    assert list(other.slot_of) == ["s5", "s6", "s7"]  # the most recently used in the slab
    for slot in range(5):  # the others on the host, intact
        np.testing.assert_array_equal(other.evicted_of(f"s{slot}")["b"], slab["b"][slot])


def test_the_cluster_bench_balance_counts_every_id() -> None:
    from stream.bench.cluster import ClusterBenchSettings, balance

    b = balance(1_000)
    assert sum(b["per_partition"]) == sum(b["per_instance"]) == 1_000
    assert len(b["per_partition"]) == 12 and len(b["per_instance"]) == 3
    assert b["min_over_even"] <= 1 <= b["max_over_even"] < 1.05
    assert ClusterBenchSettings.of(quick=True, streams=None).rounds == 10
    with pytest.raises(ValueError):
        ClusterBenchSettings(rate=0)
