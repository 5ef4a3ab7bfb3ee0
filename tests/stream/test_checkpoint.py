"""Checkpoint files: only occupied slots' rows are saved, a restore puts them back in
their slots (the rest fresh), older format-1 files still load, and unusable files are refused
with a `CheckpointError`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from stream.checkpoint import FILENAME, CheckpointError, load_checkpoint, save_checkpoint
from stream.streams import StreamTable

CAPACITY = 8
FINGERPRINT = {"model": "test", "capacity": CAPACITY}


def fresh() -> dict[str, np.ndarray]:
    return {
        "a": np.zeros((CAPACITY, 3, 2), np.float32),
        "b": np.full((CAPACITY, 4), -1.0, np.float32),
    }


def filled() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in fresh().items()}


def table_with(slots: dict[str, int]) -> StreamTable:
    table = StreamTable(CAPACITY, 64)
    for stream_id, slot in slots.items():
        table.slot_of[stream_id] = slot
        table.processed_seq[stream_id] = slot + 10
    table.evicted["gone"] = {"a": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)}
    table.processed_seq["gone"] = 3
    return table


def test_only_occupied_slots_are_saved_and_restored_into_them(tmp_path: Path) -> None:
    slab, slots = filled(), {"x": 5, "y": 1, "z": 6}
    rows = {k: v[list(slots.values())] for k, v in slab.items()}
    save_checkpoint(tmp_path, rows, table_with(slots), FINGERPRINT)
    with np.load(tmp_path / FILENAME) as data:
        assert data["slab_0"].shape == (3, 3, 2)  # three streams, not eight slots
        assert json.loads(bytes(data["meta"]).decode())["format"] == 2

    table = StreamTable(CAPACITY, 64)
    got = load_checkpoint(tmp_path, fresh(), table, FINGERPRINT)
    assert got is not None
    occupied = list(slots.values())
    others = [s for s in range(CAPACITY) if s not in occupied]
    for name in ("a", "b"):
        np.testing.assert_array_equal(got[name][occupied], slab[name][occupied])
        np.testing.assert_array_equal(got[name][others], fresh()[name][others])
    assert dict(table.slot_of) == slots
    assert sorted(table.free) == others
    assert table.processed_seq == {"x": 15, "y": 11, "z": 16, "gone": 3}
    np.testing.assert_array_equal(table.evicted["gone"]["b"], np.ones(4))


def test_a_format_1_file_with_every_slot_still_loads(tmp_path: Path) -> None:
    slab = filled()
    leaves = jax.tree.leaves(slab)
    meta = {
        "format": 1,
        "fingerprint": FINGERPRINT,
        "slots": {"x": 2},
        "evicted": [],
        "seq": {"x": 7},
    }
    np.savez(
        tmp_path / FILENAME,
        **{f"slab_{i}": leaf for i, leaf in enumerate(leaves)},
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )
    table = StreamTable(CAPACITY, 64)
    got = load_checkpoint(tmp_path, fresh(), table, FINGERPRINT)
    assert got is not None
    for name in ("a", "b"):
        np.testing.assert_array_equal(got[name], slab[name])
    assert table.processed_seq == {"x": 7}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 99}, "has format 99"),
        ({"fingerprint": {"model": "other", "capacity": CAPACITY}}, "was written for"),
        ({"slots": {"x": CAPACITY + 3}}, "cannot be read"),
        ({"slots": {"x": 5, "y": 1}}, "slab array"),
    ],
)
def test_unusable_files_are_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    rows = {k: v[:3] for k, v in filled().items()}
    save_checkpoint(tmp_path, rows, table_with({"x": 5, "y": 1, "z": 6}), FINGERPRINT)
    path = tmp_path / FILENAME
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays["meta"]).decode()) | change
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT)


def test_no_file_means_a_fresh_start(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT) is None


def test_a_write_killed_midway_leaves_nothing_behind_after_the_next_start(tmp_path: Path) -> None:
    rows = {k: v[:1] for k, v in filled().items()}  # the one occupied slot's row
    save_checkpoint(tmp_path, rows, table_with({"x": 1}), FINGERPRINT)
    (tmp_path / ".checkpoint-abc123.npz").write_bytes(b"half a checkpoint")  # a SIGKILL's
    got = load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT)
    assert got is not None  # the last good one is used
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]
