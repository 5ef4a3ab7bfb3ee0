"""Durable state: the slab, the slot map, evicted states and sequence numbers, written
atomically (temporary file, fsync, rename) and read back at start.

One file, `<state dir>/checkpoint.npz`: the slab's leaves as arrays `slab_<i>`, holding
the rows of the occupied slots only, in the slot map's order (the file grows with the
streams, not with `max_streams`); the evicted streams' leaves stacked as `evicted_<i>`;
and a JSON `meta` with the format, the model fingerprint, the slot map, the evicted
stream ids and the processed sequence numbers. Format 1 (written before this one) held
every slot's row; it is still read.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .streams import StreamTable

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FILENAME = "checkpoint.npz"
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used with this configuration."""


def save_checkpoint(
    directory: str | os.PathLike[str],
    rows: Any,
    table: StreamTable,
    fingerprint: dict[str, Any],
) -> Path:
    """Write everything needed to resume to `directory` atomically.

    **Arguments:** `rows`, the slab rows of the streams in `table.slot_of`, in its order,
    as numpy arrays (`SlabSnapshot.to_host()`); `table`, the stream table; `fingerprint`,
    what must match at restore (model dims, capacity).

    **Returns:** the checkpoint's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        f"slab_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(rows))
    }
    evicted = [(s, st) for s, st in table.evicted.items() if st is not None]
    if evicted:
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *[st for _, st in evicted])
        arrays.update({f"evicted_{i}": leaf for i, leaf in enumerate(jax.tree.leaves(stacked))})
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "slots": dict(table.slot_of),
        "evicted": [s for s, _ in evicted],
        "seq": table.processed_seq,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
            f.flush()
            os.fsync(f.fileno())
        path = directory / FILENAME
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    directory: str | os.PathLike[str],
    like_slab: Any,
    table: StreamTable,
    fingerprint: dict[str, Any],
) -> Any | None:
    """Read the checkpoint in `directory`, if any, into `table`.

    **Arguments:** `like_slab`, a fresh host slab: the saved rows are written into it
    (shapes are checked against it), the other slots keep its fresh state; `table`, an
    empty stream table to fill; `fingerprint`, as saved.

    **Returns:** the host slab (`like_slab`, filled in), or None when there is no
    checkpoint.

    **Raises:** `CheckpointError` when the file was written for another model or
    capacity, or cannot be read.

    Temporary files left by a write that was killed midway are removed first.
    """
    for leftover in Path(directory).glob(".checkpoint-*.npz"):
        leftover.unlink(missing_ok=True)
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if meta.get("format") not in (1, FORMAT):
                raise CheckpointError(
                    f"{path} has format {meta.get('format')!r}, this daemon reads 1 and "
                    f"{FORMAT}; move it away to start fresh"
                )
            if meta.get("fingerprint") != fingerprint:
                raise CheckpointError(
                    f"{path} was written for {meta.get('fingerprint')}, this daemon runs "
                    f"{fingerprint}; move it away to start fresh"
                )
            leaves, treedef = jax.tree.flatten(like_slab)
            rows: slice | np.ndarray = slice(None)  # format 1: every slot's row
            if meta["format"] == FORMAT:  # the occupied slots' rows, in the slot map's order
                rows = np.fromiter(meta["slots"].values(), np.intp, len(meta["slots"]))
            for i, leaf in enumerate(leaves):
                got, want = data[f"slab_{i}"], leaf[rows]
                if got.shape != want.shape:
                    raise CheckpointError(
                        f"{path}: slab array {got.shape}, expected "
                        f"{want.shape}; move it away to start fresh"
                    )
                leaf[rows] = got
            slab = jax.tree.unflatten(treedef, leaves)
            evicted_ids = meta["evicted"]
            if evicted_ids:
                stacked = [data[f"evicted_{i}"] for i in range(len(leaves))]
                for j, stream_id in enumerate(evicted_ids):
                    table.evicted[stream_id] = jax.tree.unflatten(treedef, [a[j] for a in stacked])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read: {e}") from e
    for stream_id, slot in meta["slots"].items():  # saved least recently used first
        table.slot_of[stream_id] = slot
    taken = set(table.slot_of.values())
    table.free = [s for s in range(table.capacity - 1, -1, -1) if s not in taken]
    table.processed_seq = {k: int(v) for k, v in meta["seq"].items()}
    table.forget_unprocessed(time.monotonic_ns())
    table.restored = set(table.processed_seq)
    return slab
