"""A device batch of moments, and its wire encoding in one pass.

The integrator turns each stepped batch into one `MomentBatch` — columns, not objects —
and sinks encode the rows they want with `encode_binary` / `encode_json`. The binary
encoding builds every record of a batch with one numpy structured array per stream-id
length (normally one), so its cost is a few hundred nanoseconds per moment rather than
a Python `struct.pack` per moment. The bytes are exactly those of `encode_moment`.

Rows of one batch belong to distinct streams (the batcher puts at most one frame of a
stream in a batch), so grouping rows by id length never reorders a stream's moments.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ._types import MAGIC_MOMENT, MOMENT_HEADER_BYTES, VERSION, Moment, MomentSizes
from .moments import moment_to_json

__all__ = ["MomentBatch"]


@functools.cache
def _record_dtype(id_bytes: int, width: int) -> np.dtype:
    """The packed layout of one binary moment record (docs/protocol.md)."""
    return np.dtype([
        ("magic", "S4"), ("length", "<u4"), ("version", "<u2"), ("flags", "<u2"),
        ("id_length", "<u2"), ("sizes", "<u2", (5,)), ("seq", "<u8"), ("timestamp", "<f8"),
        ("latency_ns", "<u8"), ("id", f"S{id_bytes}"), ("values", "<f4", (width,)),
    ])  # fmt: skip


@functools.lru_cache(maxsize=1 << 16)
def _id_bytes(stream_id: str) -> bytes:
    return stream_id.encode()


@dataclasses.dataclass(slots=True)
class MomentBatch:
    """The moments of one device batch, as columns.

    - `stream_ids`: n stream ids (distinct).
    - `seq`: uint64 `(n,)`; `timestamp`: float64 `(n,)`; `latency_ns`: uint64 `(n,)`;
        `flags`: uint16 `(n,)`.
    - `values`: float32 `(n, sizes.total)`: moment, synthesis, schema, motor, scalars.
    """

    stream_ids: list[str]
    seq: np.ndarray
    timestamp: np.ndarray
    latency_ns: np.ndarray
    flags: np.ndarray
    sizes: MomentSizes
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.stream_ids)

    @classmethod
    def of(cls, moments: list[Moment]) -> MomentBatch:
        """A batch holding `moments` (all of the same sizes), in order."""
        sizes = moments[0].sizes
        return cls(
            [m.stream_id for m in moments],
            np.array([m.seq for m in moments], np.uint64),
            np.array([m.timestamp for m in moments], np.float64),
            np.array([m.latency_ns for m in moments], np.uint64),
            np.array([m.flags for m in moments], np.uint16),
            sizes,
            np.stack([np.asarray(m.values, np.float32) for m in moments]),
        )

    def moment(self, i: int) -> Moment:
        """Row `i` as a `Moment`."""
        return Moment(
            self.stream_ids[i],
            int(self.seq[i]),
            float(self.timestamp[i]),
            int(self.latency_ns[i]),
            int(self.flags[i]),
            self.sizes,
            self.values[i],
        )

    def encode_binary(self, rows: list[int] | None = None) -> bytes:
        """The binary records of `rows` (default: all), back to back."""
        index = range(len(self)) if rows is None else rows
        ids = [_id_bytes(self.stream_ids[i]) for i in index]
        if not ids:
            return b""
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        padded = (lengths + 3) & ~3
        groups = np.unique(padded)
        if len(groups) == 1:
            return self._encode_group(
                np.arange(len(ids)) if rows is None else np.asarray(rows),
                ids,
                lengths,
                int(groups[0]),
            )
        sel = np.asarray(list(index))
        return b"".join(
            self._encode_group(
                sel[padded == g],
                [ids[j] for j in np.flatnonzero(padded == g)],
                lengths[padded == g],
                int(g),
            )
            for g in groups
        )

    def _encode_group(
        self, rows: np.ndarray, ids: list[bytes], lengths: np.ndarray, id_bytes: int
    ) -> bytes:
        width = self.sizes.total
        dtype = _record_dtype(id_bytes, width)
        out = np.empty(len(rows), dtype)
        out["magic"] = MAGIC_MOMENT
        out["length"] = dtype.itemsize - 8
        out["version"] = VERSION
        out["flags"] = self.flags[rows]
        out["id_length"] = lengths
        out["sizes"] = self.sizes
        out["seq"] = self.seq[rows]
        out["timestamp"] = self.timestamp[rows]
        out["latency_ns"] = self.latency_ns[rows]
        out["id"] = ids
        out["values"] = self.values[rows]
        return out.tobytes()

    def encode_json(self, rows: list[int] | None = None) -> bytes:
        """One JSON line per row of `rows` (default: all), as `moment_to_json` writes it."""
        index = range(len(self)) if rows is None else rows
        return b"".join(moment_to_json(self.moment(i)) for i in index)


assert _record_dtype(4, 1).itemsize == MOMENT_HEADER_BYTES + 4 + 4
