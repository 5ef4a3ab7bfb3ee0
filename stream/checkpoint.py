"""Durable state: the slab, the slot map, evicted states and sequence numbers, written
atomically (temporary file, fsync, rename) and read back at start.

`<state dir>/checkpoint.npz` holds the slab's leaves as arrays `slab_<i>`, holding the rows
of the occupied slots only, in the slot map's order (the file grows with the streams, not
with `max_streams`); the evicted streams' leaves stacked as `evicted_<i>`; and a JSON
`meta` with the format, the model fingerprint, the slot map, the evicted stream ids and the
processed sequence numbers. Format 1 (written before this one) held every slot's row; it is
still read.

Two generations: a write keeps the file it replaces as `checkpoint.prev.npz` (a hard link
first, so that `checkpoint.npz` is never missing; a rename where the file system has no
hard links). A file is checked whole before any of it is used (stream/checkpoint_file.py:
the metadata's schema, every array's dtype and shape, finite states), so a damaged or
crafted file is refused with one line (`CheckpointError`), never half-loaded; with
`fallback_to_previous`, the previous generation is restored instead.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from .checkpoint_file import FORMAT, Contents, Unusable, read_checkpoint_file
from .streams import StreamTable

__all__ = [
    "CheckpointError",
    "Restored",
    "checkpoint_arrays",
    "discard_checkpoint",
    "load_checkpoint",
    "merge_contents",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FILENAME = "checkpoint.npz"
PREVIOUS = "checkpoint.prev.npz"
FIX = "move it aside to start fresh, or start with `--discard-checkpoint`"
_TEMP = ".checkpoint-"  # temporary files: `.checkpoint-*.npz`, removed at the next start


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used with this configuration."""


class Restored(NamedTuple):
    """A checkpoint read back: `slab`, the host slab (`like_slab` filled in), and `path`,
    the file it came from."""

    slab: Any
    path: Path


def save_checkpoint(
    directory: str | os.PathLike[str],
    rows: Any,
    table: StreamTable,
    fingerprint: dict[str, Any],
) -> Path:
    """Write everything needed to resume to `directory` atomically, keeping the file it
    replaces as `checkpoint.prev.npz`.

    **Arguments:** `rows`, the slab rows of the streams in `table.slot_of`, in its order,
    as numpy arrays (`SlabSnapshot.to_host()`); `table`, the stream table; `fingerprint`,
    what must match at restore (model dims, capacity).

    **Returns:** the checkpoint's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = checkpoint_arrays(rows, table, fingerprint)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TEMP, suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
            f.flush()
            os.fsync(f.fileno())
        path = directory / FILENAME
        if path.exists():
            _keep_as_previous(path, directory / PREVIOUS, Path(tmp).with_suffix(".prev.npz"))
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_arrays(
    rows: Any,
    table: StreamTable,
    fingerprint: dict[str, Any],
    keep: Callable[[str], bool] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint (`.npz` entries: `slab_<i>`, `evicted_<i>`, `meta`) of
    the streams of `table` that `keep` keeps (None: all), `rows` as for
    `save_checkpoint`. With `keep`, the slots saved are the kept streams' rows' positions
    among themselves (0, 1, …): what a scaled-out deployment's partition holds."""
    slots = dict(table.slot_of)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(rows)]
    if keep is not None:
        index = np.fromiter(
            (i for i, s in enumerate(slots) if keep(s)), np.intp, count=-1
        )
        leaves = [leaf[index] for leaf in leaves]
        slots = {s: i for i, s in enumerate(s for s in slots if keep(s))}
    arrays = {f"slab_{i}": leaf for i, leaf in enumerate(leaves)}
    evicted = [
        (s, row)
        for s, row in table.evicted.items()
        if row is not None and (keep is None or keep(s))
    ]
    if evicted:
        stacked = table.host.gather([row for _, row in evicted])
        arrays.update({f"evicted_{i}": leaf for i, leaf in enumerate(jax.tree.leaves(stacked))})
    seq = table.processed_seq
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "slots": slots,
        "evicted": [s for s, _ in evicted],
        "seq": seq if keep is None else {s: q for s, q in seq.items() if keep(s)},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return arrays


def _keep_as_previous(path: Path, previous: Path, link: Path) -> None:
    """Make `previous` the file now at `path`, which stays in place (a hard link through a
    temporary name); where hard links are not supported, rename it: until the new file is
    renamed in, only `previous` exists then."""
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable (where the platform can fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def discard_checkpoint(directory: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """Move the checkpoint files in `directory` aside (`checkpoint.npz.discarded-<UTC
    time>`, never deleted), so that the next load starts fresh; logged at WARNING.

    **Returns:** `(from, to)` per file moved (none when there was no checkpoint).
    """
    directory = Path(directory)
    moved = []
    for name in (PREVIOUS, FILENAME):  # the latest last: a crash midway leaves it loadable
        path = directory / name
        if path.exists():
            aside = _aside(path, "discarded")
            os.replace(path, aside)
            moved.append((path, aside))
    if moved:
        _fsync_dir(directory)
        where = ", ".join(f"{a} to {b}" for a, b in reversed(moved))
        log.warning(f"discarding the checkpoint: moved {where}; starting fresh")
    else:
        log.warning(f"discarding the checkpoint: there is none in {directory}; starting fresh")
    return moved


def _aside(path: Path, why: str) -> Path:
    """A free name next to `path`, `<name>.<why>-<UTC time>` (`-1`, `-2`, … if taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.{why}-{stamp}"), 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    return aside


def load_checkpoint(
    directory: str | os.PathLike[str],
    like_slab: Any,
    table: StreamTable,
    fingerprint: dict[str, Any],
    *,
    fallback_to_previous: bool = False,
) -> Restored | None:
    """Read the checkpoint in `directory`, if any, into `table`.

    **Arguments:** `like_slab`, a fresh host slab: the saved rows are written into it
    (dtypes and shapes are checked against it), the other slots keep its fresh state;
    `table`, an empty stream table to fill; `fingerprint`, as saved;
    `fallback_to_previous`, when `checkpoint.npz` is unusable or missing, restore
    `checkpoint.prev.npz` instead (logged at WARNING; the unusable file is moved aside).

    **Returns:** the host slab (`like_slab`, filled in) and the file read, or None when
    there is no checkpoint.

    **Raises:** `CheckpointError`, one line naming the file, what is wrong and the fix,
    when the file was written for another model or capacity, is damaged or breaks the
    format; `like_slab` and `table` are then unchanged.

    Temporary files left by a write that was killed midway are removed first.
    """
    directory = Path(directory)
    for leftover in directory.glob(f"{_TEMP}*.npz"):
        leftover.unlink(missing_ok=True)
    latest, previous = directory / FILENAME, directory / PREVIOUS
    if not latest.exists():
        if not previous.exists():
            return None
        if not fallback_to_previous:
            raise CheckpointError(
                f"{latest} is missing but the previous checkpoint {previous} is there (a write "
                "was interrupted, or the latest was moved away); set "
                f"`state.fallback_to_previous = true` to restore it, or {FIX}"
            )
        contents = _previous(previous, like_slab, table, fingerprint, problem=None)
        log.warning(f"{latest} is missing; restored the previous checkpoint {previous}")
        return Restored(_apply(contents, like_slab, table), previous)
    try:
        return _load(latest, like_slab, table, fingerprint)
    except Unusable as e:
        problem = e.at(latest)
    if not fallback_to_previous or not previous.exists():
        hint = f", or set `state.fallback_to_previous = true` to restore {previous}"
        raise CheckpointError(f"{problem}; {FIX}{hint if previous.exists() else ''}")
    contents = _previous(previous, like_slab, table, fingerprint, problem=problem)
    aside = _aside(latest, "unusable")
    try:
        os.replace(latest, aside)  # so that the next write keeps the good one as previous
    except OSError as e:
        raise CheckpointError(f"{problem}; cannot move it aside: {e.strerror or e}") from None
    log.warning(f"{problem}; moved it to {aside} and restored the previous checkpoint {previous}")
    return Restored(_apply(contents, like_slab, table), previous)


def _load(path: Path, like_slab: Any, table: StreamTable, fingerprint: dict[str, Any]) -> Restored:
    contents = read_checkpoint_file(path, like_slab, table.capacity, fingerprint)
    return Restored(_apply(contents, like_slab, table), path)


def _previous(
    path: Path, like_slab: Any, table: StreamTable, fingerprint: dict[str, Any], problem: str | None
) -> Contents:
    """The previous generation, checked; why not in one line, after `problem` (the latest
    file's), if it cannot be used either."""
    try:
        return read_checkpoint_file(path, like_slab, table.capacity, fingerprint)
    except Unusable as e:
        first = f"{problem}; the previous checkpoint too: " if problem else ""
        fix = FIX.replace("move it", "move them") if problem else FIX
        raise CheckpointError(f"{first}{e.at(path)}; {fix}") from None


def merge_contents(contents: Contents, like_slab: Any, table: StreamTable) -> None:
    """Add checked `contents` (a partition's) to `like_slab` and `table`, which may hold
    other partitions' streams already: its streams take free slots (the most recently
    used first), those that find none and its evicted ones are kept on the host. Call
    `table.forget_unprocessed` once every partition is in."""
    leaves, treedef = jax.tree.flatten(like_slab)
    streams = list(contents.slots)  # least recently used first
    fit = min(len(streams), len(table.free))
    in_slab, on_host = streams[len(streams) - fit :], streams[: len(streams) - fit]
    slots = [table.free.pop() for _ in in_slab]
    taken = np.fromiter((contents.slots[s] for s in in_slab), np.intp, len(in_slab))
    for leaf, got in zip(leaves, contents.slab, strict=True):
        leaf[slots] = got[taken]
    for stream_id, slot in zip(in_slab, slots, strict=True):
        table.slot_of[stream_id] = slot
    host = np.fromiter((contents.slots[s] for s in on_host), np.intp, len(on_host))
    if len(host) or contents.evicted:
        parts = [[got[host]] for got in contents.slab]
        if contents.evicted:
            for part, extra in zip(parts, contents.stacked, strict=True):
                part.append(extra)
        stacked = [np.concatenate(part) for part in parts]
        table.evicted_states([*on_host, *contents.evicted], jax.tree.unflatten(treedef, stacked))
    table.processed_seq.update(contents.seq)
    table.restored.update(contents.seq)


def _apply(contents: Contents, like_slab: Any, table: StreamTable) -> Any:
    """Write checked `contents` into `like_slab` and `table`; returns the slab."""
    leaves, treedef = jax.tree.flatten(like_slab)
    rows: slice | np.ndarray = slice(None)  # format 1: every slot's row
    if contents.format == FORMAT:  # the occupied slots' rows, in the slot map's order
        rows = np.fromiter(contents.slots.values(), np.intp, len(contents.slots))
    for leaf, got in zip(leaves, contents.slab, strict=True):
        leaf[rows] = got
    if contents.evicted:
        table.evicted_states(contents.evicted, jax.tree.unflatten(treedef, contents.stacked))
    for stream_id, slot in contents.slots.items():  # saved least recently used first
        table.slot_of[stream_id] = slot
    taken = set(table.slot_of.values())
    table.free = [s for s in range(table.capacity - 1, -1, -1) if s not in taken]
    table.processed_seq = dict(contents.seq)
    table.forget_unprocessed(time.monotonic_ns())
    table.restored = set(table.processed_seq)
    return jax.tree.unflatten(treedef, leaves)
