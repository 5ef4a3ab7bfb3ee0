"""Checkpoint files: only occupied slots' rows are saved, a restore puts them back in
their slots (the rest fresh), older format-1 files still load; damaged or crafted files are
refused whole with a one-line `CheckpointError`; a write keeps the previous generation, which
a start may fall back to; `discard_checkpoint` moves both aside."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from stream.checkpoint import (
    FILENAME,
    PREVIOUS,
    CheckpointError,
    discard_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
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
    table.evicted_state("gone", {"a": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)})
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
    restored = load_checkpoint(tmp_path, fresh(), table, FINGERPRINT)
    assert restored is not None and restored.path == tmp_path / FILENAME
    got = restored.slab
    occupied = list(slots.values())
    others = [s for s in range(CAPACITY) if s not in occupied]
    for name in ("a", "b"):
        np.testing.assert_array_equal(got[name][occupied], slab[name][occupied])
        np.testing.assert_array_equal(got[name][others], fresh()[name][others])
    assert dict(table.slot_of) == slots
    assert sorted(table.free) == others
    assert table.processed_seq == {"x": 15, "y": 11, "z": 16, "gone": 3}
    np.testing.assert_array_equal(table.evicted_of("gone")["b"], np.ones(4))


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
    restored = load_checkpoint(tmp_path, fresh(), table, FINGERPRINT)
    assert restored is not None
    for name in ("a", "b"):
        np.testing.assert_array_equal(restored.slab[name], slab[name])
    assert table.processed_seq == {"x": 7}


def test_no_file_means_a_fresh_start(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT) is None


def test_a_write_killed_midway_leaves_nothing_behind_after_the_next_start(tmp_path: Path) -> None:
    rows = {k: v[:1] for k, v in filled().items()}  # the one occupied slot's row
    save_checkpoint(tmp_path, rows, table_with({"x": 1}), FINGERPRINT)
    (tmp_path / ".checkpoint-abc123.npz").write_bytes(b"half a checkpoint")  # a SIGKILL's
    got = load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT)
    assert got is not None  # the last good one is used
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


# -- crafted and damaged files: refused whole, one line, never a word about pickle --------

Arrays = dict[str, Any]
SLOTS = {"x": 5, "y": 1, "z": 6}


def write_valid(directory: Path, slots: dict[str, int] = SLOTS) -> Path:
    """A real checkpoint: `slots` with their rows, and one evicted stream, "gone"."""
    rows = {k: v[list(slots.values())] for k, v in filled().items()}
    return save_checkpoint(directory, rows, table_with(slots), FINGERPRINT)


def rewrite(path: Path, change: Callable[[Arrays, dict[str, Any]], object]) -> None:
    """Rewrite `path` as the writer does (np.savez, valid zip and CRCs) after `change`
    edited its arrays and meta in place."""
    with np.load(path) as data:
        arrays: Arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    change(arrays, meta)
    if "meta" not in arrays:
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)


def meta_edit(**changes: Any) -> Callable[[Arrays, dict[str, Any]], None]:
    return lambda _, meta: meta.update(changes)


def set_item(key: str, index: tuple[int, ...], value: float) -> Callable[[Arrays, dict], None]:
    def change(arrays: Arrays, _: dict[str, Any]) -> None:
        arrays[key][index] = value

    return change


def seq_of(stream_id: str, value: object) -> Callable[[Arrays, dict[str, Any]], None]:
    return lambda _, meta: meta["seq"].__setitem__(stream_id, value)


def without(key: str, inner: str | None = None) -> Callable[[Arrays, dict[str, Any]], None]:
    return lambda _, meta: (meta[inner] if inner else meta).pop(key)


def array(key: str, value: Callable[[Arrays], Any]) -> Callable[[Arrays, dict[str, Any]], None]:
    return lambda arrays, _: arrays.__setitem__(key, value(arrays))


CRAFTED: dict[str, tuple[Callable[[Arrays, dict[str, Any]], object], str]] = {
    "slot used twice": (
        meta_edit(slots={"x": 5, "y": 5, "z": 6}),
        "`slots` gives slot 5 to both 'x' and 'y'",
    ),
    "slot out of range": (meta_edit(slots={"x": 5, "y": 1, "z": 8}), "in [0, 8)"),
    "negative slot": (meta_edit(slots={"x": 5, "y": -1, "z": 6}), "slot -1"),
    "slot a boolean": (meta_edit(slots={"x": 5, "y": True, "z": 6}), "slot True"),
    "slot a float": (meta_edit(slots={"x": 5, "y": 1.0, "z": 6}), "slot 1.0"),
    "negative seq": (seq_of("x", -1), "`seq` of 'x' is -1, expected an integer in [0, 2**64)"),
    "huge seq": (seq_of("x", 2**64), "`seq` of 'x' is 18446744073709551616"),
    "seq a string": (seq_of("x", "15"), "`seq` of 'x' is '15'"),
    "stream without seq": (without("y", "seq"), "'y' has no `seq`"),
    "evicted without seq": (without("gone", "seq"), "'gone' has no `seq`"),
    "slots not an object": (meta_edit(slots=[["x", 5]]), "`slots` is a list, expected"),
    "evicted not a list": (meta_edit(evicted={"gone": 0}), "`evicted` is an object, expected"),
    "seq not an object": (meta_edit(seq=7), "`seq` is a number, expected"),
    "missing slots": (without("slots"), "`meta` has no `slots`"),
    "missing seq": (without("seq"), "`meta` has no `seq`"),
    "missing fingerprint": (without("fingerprint"), "`meta` has no `fingerprint`"),
    "meta not an object": (array("meta", lambda _: np.frombuffer(b"[1, 2]", np.uint8)), "a list"),
    "meta not JSON": (array("meta", lambda _: np.frombuffer(b"{nope", np.uint8)), "not valid"),
    "meta with NaN": (array("meta", lambda _: np.frombuffer(b"NaN", np.uint8)), "holds NaN"),
    "meta repeats a key": (
        array("meta", lambda _: np.frombuffer(b'{"slots": {}, "slots": {}}', np.uint8)),
        "repeats the key 'slots'",
    ),
    "meta of another dtype": (array("meta", lambda _: np.zeros(3, np.int64)), "`meta` has dtype"),
    "invalid stream id": (meta_edit(slots={"x y": 5, "y": 1, "z": 6}), "invalid stream id"),
    "format unknown": (meta_edit(format=99), "has format 99, this daemon reads 1 and 2"),
    "format a boolean": (meta_edit(format=True), "has format True"),
    "other fingerprint": (
        meta_edit(fingerprint={"model": "other", "capacity": CAPACITY}),
        "was written for {'model': 'other'",
    ),
    "evicted count mismatch": (
        lambda _, meta: meta.update(evicted=["gone", "more"], seq={**meta["seq"], "more": 1}),
        "expected (2, 3, 2) (one row per stream in `evicted`)",
    ),
    "evicted arrays without evicted ids": (meta_edit(evicted=[]), "expected (0, 3, 2)"),
    "evicted also in slots": (
        meta_edit(evicted=["x"]),
        "'x' is both in `slots` and in `evicted`",
    ),
    "evicted twice": (
        lambda _, meta: meta.update(evicted=["gone", "gone"]),
        "`evicted` lists 'gone' twice",
    ),
    "wrong dtype": (
        array("slab_0", lambda a: a["slab_0"].astype(np.float64)),
        "array `slab_0` has dtype float64, expected float32",
    ),
    "object dtype": (
        array("slab_1", lambda a: np.array([object()] * 3, dtype=object)),
        "array `slab_1` has dtype object, expected float32",
    ),
    "wrong shape": (
        array("slab_1", lambda a: a["slab_1"][:2]),
        "array `slab_1` has shape (2, 4), expected (3, 4)",
    ),
    "missing array": (lambda arrays, _: arrays.pop("slab_1"), "has no array `slab_1`"),
    "unexpected array": (array("bonus", lambda _: np.zeros(1)), "unexpected array 'bonus'"),
    "NaN in a state": (set_item("slab_1", (1, 2), np.nan), "NaN or Inf in the state of 'y'"),
    "Inf in an evicted state": (
        set_item("evicted_0", (0, 1, 1), np.inf),
        "NaN or Inf in the state of 'gone'",
    ),
}


def damage(kind: str) -> Callable[[Path], None]:
    def garbage(path: Path) -> None:
        path.write_bytes(b"\x00garbage\xff" * 100)

    def empty(path: Path) -> None:
        path.write_bytes(b"")

    def truncated(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def flipped(path: Path) -> None:  # one bit of a state: the entry's CRC no longer matches
        data = bytearray(path.read_bytes())
        with np.load(path) as arrays:
            at = data.find(arrays["slab_1"].tobytes())
        data[at + 5] ^= 0x10
        path.write_bytes(bytes(data))

    def pickle(path: Path) -> None:  # what np.load would read with allow_pickle=True
        path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)

    return {
        "garbage": garbage,
        "empty": empty,
        "truncated": truncated,
        "flipped": flipped,
        "pickle": pickle,
    }[kind]


def assert_refused(directory: Path, fragment: str, **kwargs: Any) -> str:
    """Loading `directory` raises a one-line `CheckpointError` that names the file,
    `fragment`, and the fix, says nothing of pickle, and changes nothing."""
    slab, table = fresh(), StreamTable(CAPACITY, 64)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(directory, slab, table, FINGERPRINT, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    assert str(directory / FILENAME) in message
    assert fragment in message
    assert "move it aside to start fresh, or start with `--discard-checkpoint`" in message
    assert "pickle" not in message.lower()
    for name in ("a", "b"):
        np.testing.assert_array_equal(slab[name], fresh()[name])
    assert len(table) == 0 and not table.processed_seq and len(table.free) == CAPACITY
    return message


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_files_are_refused_whole(tmp_path: Path, case: str) -> None:
    change, fragment = CRAFTED[case]
    rewrite(write_valid(tmp_path), change)
    assert_refused(tmp_path, fragment)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "flipped", "pickle"])
def test_damaged_files_are_refused(tmp_path: Path, kind: str) -> None:
    damage(kind)(write_valid(tmp_path))
    message = assert_refused(tmp_path, "cannot be read")
    if kind == "flipped":
        assert "Bad CRC-32 for file 'slab_1.npy'" in message


def test_a_write_keeps_the_previous_file(tmp_path: Path) -> None:
    write_valid(tmp_path, {"x": 5})
    write_valid(tmp_path, {"x": 5, "y": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME, PREVIOUS]
    for name, streams in ((FILENAME, ["x", "y", "gone"]), (PREVIOUS, ["x", "gone"])):
        with np.load(tmp_path / name) as data:
            assert list(json.loads(bytes(data["meta"]).decode())["seq"]) == streams


@pytest.mark.parametrize(
    ("links", "crash_at"), [(True, 1), (True, 2), (True, 3), (False, 1), (False, 2)]
)
def test_a_crash_at_any_point_of_a_write_leaves_a_valid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool, crash_at: int
) -> None:
    """The write is killed at its `crash_at`-th link or rename: with hard links (link the
    latest to a temporary name, rename that to the previous, rename the new one in) or
    without (rename the latest to the previous, rename the new one in)."""
    write_valid(tmp_path, {"x": 5})
    write_valid(tmp_path, {"x": 5, "y": 1})
    calls = 0

    def crash(real: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == crash_at:
                raise KeyboardInterrupt  # as abrupt as the write can be stopped in-process
            real(*args)

        return call

    def no_links(*_: Any) -> None:
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "replace", crash(os.replace))
    monkeypatch.setattr(os, "link", crash(os.link) if links else no_links)
    with pytest.raises(KeyboardInterrupt):
        write_valid(tmp_path, {"x": 5, "y": 1, "z": 6})
    monkeypatch.undo()
    restored = load_checkpoint(
        tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT, fallback_to_previous=True
    )
    assert restored is not None
    if (tmp_path / FILENAME).exists():
        assert restored.path == tmp_path / FILENAME
        # Without the fallback too: the latest file is always complete with hard links.
        assert load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT)
    else:  # renamed aside, the new one not yet in: only the previous generation is left
        assert not links and restored.path == tmp_path / PREVIOUS
        message = assert_refused(tmp_path, "is missing but the previous checkpoint")
        assert "set `state.fallback_to_previous = true` to restore it" in message


def test_a_corrupt_latest_file_falls_back_to_the_previous_one_when_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_valid(tmp_path, {"x": 5})
    damage("truncated")(write_valid(tmp_path, {"x": 5, "y": 1}))
    message = assert_refused(tmp_path, "cannot be read")  # not allowed: refused
    assert f"or set `state.fallback_to_previous = true` to restore {tmp_path / PREVIOUS}" in message

    table = StreamTable(CAPACITY, 64)
    with caplog.at_level(logging.WARNING, logger="stream.checkpoint"):
        restored = load_checkpoint(tmp_path, fresh(), table, FINGERPRINT, fallback_to_previous=True)
    assert restored is not None and restored.path == tmp_path / PREVIOUS
    assert dict(table.slot_of) == {"x": 5}
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert str(tmp_path / FILENAME) in line and str(tmp_path / PREVIOUS) in line
    # The unusable file is kept aside, so the next write keeps the good one as previous.
    [aside] = tmp_path.glob(f"{FILENAME}.unusable-*")
    assert f"moved it to {aside}" in line
    write_valid(tmp_path, {"x": 5, "z": 6})
    with np.load(tmp_path / PREVIOUS) as data:
        assert json.loads(bytes(data["meta"]).decode())["slots"] == {"x": 5}


def test_when_both_generations_are_unusable_one_line_names_both(tmp_path: Path) -> None:
    write_valid(tmp_path)
    rewrite(write_valid(tmp_path), meta_edit(slots={"x": 5, "y": 5, "z": 6}))
    damage("garbage")(tmp_path / PREVIOUS)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(
            tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT, fallback_to_previous=True
        )
    message = str(e.value)
    assert "\n" not in message and "pickle" not in message
    assert f"{tmp_path / FILENAME}: `slots` gives slot 5 to both" in message
    assert f"the previous checkpoint too: {tmp_path / PREVIOUS}: cannot be read" in message
    assert message.endswith("move them aside to start fresh, or start with `--discard-checkpoint`")
    assert (tmp_path / FILENAME).exists()  # nothing moved when nothing was restored


def test_discard_moves_both_generations_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_valid(tmp_path)
    write_valid(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (FILENAME, PREVIOUS)}
    with caplog.at_level(logging.WARNING, logger="stream.checkpoint"):
        moved = discard_checkpoint(tmp_path)
    assert [a.name for a, _ in moved] == [PREVIOUS, FILENAME]
    for old, aside in moved:
        assert aside.name.startswith(f"{old.name}.discarded-")
        assert aside.read_bytes() == before[old.name]  # kept, never deleted
        assert f"{old} to {aside}" in caplog.text
    assert load_checkpoint(tmp_path, fresh(), StreamTable(CAPACITY, 64), FINGERPRINT) is None
    write_valid(tmp_path)
    assert len(discard_checkpoint(tmp_path)) == 1  # same second: another free name
    assert len(list(tmp_path.glob(f"{FILENAME}.discarded-*"))) == 2
