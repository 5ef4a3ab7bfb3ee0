"""Fixed-size frames and moment records, pre-encoded and parsed with numpy.

Every benchmark stream id has the same length (`b-00000`, `b-00001`, …), so every frame
has one size and every moment record has one size. A block of frames is then a 2-D
`uint8` array, one row per frame, whose `seq` and `timestamp` fields are strided views
that the client rewrites in place — no per-frame Python object. Received moment records
are parsed the same way: the timestamp a record echoes sits at a fixed offset in every
row.

The header bytes come from the project's own codec (`stream.protocol.encode_frame`); this
module only copies them into rows and patches fields.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream.protocol import (
    FRAME_HEADER_BYTES,
    MAGIC_MOMENT,
    MOMENT_HEADER_BYTES,
    Dims,
    MomentSizes,
    encode_frame,
)

__all__ = [
    "FRAME_SEQ_OFFSET",
    "FRAME_TIMESTAMP_OFFSET",
    "MOMENT_LATENCY_OFFSET",
    "MOMENT_TIMESTAMP_OFFSET",
    "FrameBlock",
    "frame_bytes",
    "moment_record_bytes",
    "parse_records",
    "receipt_times",
    "stream_ids",
]

FRAME_SEQ_OFFSET = 24
"""Byte offset of a frame's u64 `seq`."""
FRAME_TIMESTAMP_OFFSET = 32
"""Byte offset of a frame's f64 `timestamp`."""
MOMENT_TIMESTAMP_OFFSET = 32
"""Byte offset of a moment record's f64 `timestamp` (the frame's, echoed)."""
MOMENT_LATENCY_OFFSET = 40
"""Byte offset of a moment record's u64 `latency_ns` (the daemon's own measure)."""
PAYLOAD_POOL = 4096
"""Distinct random payloads per block; rows reuse them cyclically."""


def _padded(n: int) -> int:
    return n + (-n & 3)


def frame_bytes(id_bytes: int, dims: Dims) -> int:
    """Size of one binary frame.

    **Arguments:**

    - `id_bytes`: the UTF-8 length of the stream id, 1..255.
    - `dims`: the modality sizes (every modality present).

    **Returns:** `40 + L + pad(L) + 4·ΣN` bytes.
    """
    return FRAME_HEADER_BYTES + _padded(id_bytes) + 4 * dims.total


def moment_record_bytes(id_bytes: int, sizes: MomentSizes) -> int:
    """Size of one binary moment record.

    **Arguments:**

    - `id_bytes`: the UTF-8 length of the stream id, 1..255.
    - `sizes`: the record's vector sizes.

    **Returns:** `48 + L + pad(L) + 4·(K + D + P + M + 3)` bytes.
    """
    return MOMENT_HEADER_BYTES + _padded(id_bytes) + 4 * sizes.total


def stream_ids(n: int, prefix: str = "b-") -> list[str]:
    """`n` stream ids of equal length: `prefix` and a zero-padded index (≥ 5 digits).

    **Arguments:**

    - `n`: how many, >= 1.
    - `prefix`: ASCII text before the index.

    **Returns:** the ids, e.g. `["b-00000", "b-00001", …]`.
    """
    if n < 1:
        raise ValueError(f"n = {n}, expected >= 1")
    width = max(5, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _field(data: np.ndarray, offset: int, dtype: str) -> np.ndarray:
    """A strided view of one fixed-offset field in every row of a 2-D `uint8` array."""
    rows, size = data.shape
    return np.ndarray((rows,), dtype=dtype, buffer=data, offset=offset, strides=(size,))


class FrameBlock:
    """`rounds` rounds of one frame per stream, pre-encoded, round-major.

    Row `r·S + s` is stream `ids[s]`'s frame of round `r`, with seq `first_seq + r`,
    timestamp 0.0 and a random float32 payload (every modality present).

    **Arguments:**

    - `ids`: the streams (S of them), all of the same UTF-8 length.
    - `rounds`: frames per stream, >= 1.
    - `dims`: the modality sizes.
    - `first_seq`: seq of the first round, >= 1.
    - `seed`: fixes the payloads.

    **Attributes:**

    - `data`: `uint8` of shape `(rounds·S, frame_size)`; `memoryview(block)` is its bytes.
    - `seq`: `uint64` view of shape `(rounds·S,)` into `data` (write to renumber).
    - `timestamp`: `float64` view of shape `(rounds·S,)` into `data` (write to stamp).
    - `frame_size`: bytes per frame; `payload_offset`: where the payload starts in a row.
    """

    def __init__(
        self, ids: Sequence[str], rounds: int, dims: Dims, *, first_seq: int = 1, seed: int = 0
    ) -> None:
        raw = [s.encode("utf-8") for s in ids]
        if not raw or len({len(r) for r in raw}) != 1:
            raise ValueError("need >= 1 stream id, all of the same UTF-8 length")
        if rounds < 1 or first_seq < 1:
            raise ValueError(f"rounds = {rounds}, first_seq = {first_seq}; both must be >= 1")
        n_streams, id_len = len(raw), len(raw[0])
        rng = np.random.default_rng(seed)
        template = encode_frame(
            ids[0],
            first_seq,
            0.0,
            sensory=np.zeros(dims.sensory, np.float32),
            proprio=np.zeros(dims.proprio, np.float32),
            tactile=np.zeros(dims.tactile, np.float32),
            motor=np.zeros(dims.motor, np.float32),
        )
        size = len(template)
        assert size == frame_bytes(id_len, dims)
        n = rounds * n_streams
        data = np.empty((n, size), np.uint8)
        data[:] = np.frombuffer(template, np.uint8)
        id_rows = np.frombuffer(b"".join(raw), np.uint8).reshape(n_streams, id_len)
        start = FRAME_HEADER_BYTES
        data.reshape(rounds, n_streams, size)[:, :, start : start + id_len] = id_rows
        payload = size - 4 * dims.total
        pool = min(n, PAYLOAD_POOL)
        values = rng.standard_normal((pool, dims.total)).astype("<f4").view(np.uint8)
        for lo in range(0, n, pool):
            hi = min(lo + pool, n)
            data[lo:hi, payload:] = values[: hi - lo]
        self.data = data
        self.frame_size = size
        self.payload_offset = payload
        self.streams = n_streams
        self.rounds = rounds
        self.seq = _field(data, FRAME_SEQ_OFFSET, "<u8")
        self.timestamp = _field(data, FRAME_TIMESTAMP_OFFSET, "<f8")
        self.seq[:] = first_seq + np.repeat(np.arange(rounds, dtype=np.uint64), n_streams)

    def __len__(self) -> int:
        return self.data.shape[0]

    def payload(self, row: int) -> np.ndarray:
        """Row `row`'s payload: float32 of shape `(dims.total,)` (a copy)."""
        return self.data[row, self.payload_offset :].view("<f4").copy()

    def bytes_view(self) -> memoryview:
        """All frames back to back, as one flat byte view (no copy)."""
        return memoryview(self.data.reshape(-1).data)


def parse_records(buf: np.ndarray | bytearray, record_bytes: int, n: int) -> dict[str, np.ndarray]:
    """Read the fixed-offset fields of `n` back-to-back moment records of one size.

    **Arguments:**

    - `buf`: at least `n · record_bytes` bytes of records.
    - `record_bytes`: the size of every record.
    - `n`: how many records.

    **Returns:** `{"timestamp": float64 (n,), "latency_ns": uint64 (n,), "seq": uint64 (n,)}`
    (copies).

    **Raises:** `ValueError` when a record's magic or length field disagrees with
    `record_bytes` (the records are not all of that size).
    """
    data = np.frombuffer(buf, np.uint8, n * record_bytes).reshape(n, record_bytes)
    magic = data[:, :4]
    if n and not (magic == np.frombuffer(MAGIC_MOMENT, np.uint8)).all():
        bad = int(np.argmin((magic == np.frombuffer(MAGIC_MOMENT, np.uint8)).all(axis=1)))
        raise ValueError(f"record {bad}: magic {bytes(magic[bad])!r}, expected {MAGIC_MOMENT!r}")
    length = _field(data, 4, "<u4")
    if n and not (length == record_bytes - 8).all():
        bad = int(np.argmax(length != record_bytes - 8))
        raise ValueError(
            f"record {bad}: length {int(length[bad])}, expected {record_bytes - 8} "
            "(stream ids of different lengths?)"
        )
    return {
        "timestamp": _field(data, MOMENT_TIMESTAMP_OFFSET, "<f8").copy(),
        "latency_ns": _field(data, MOMENT_LATENCY_OFFSET, "<u8").copy(),
        "seq": _field(data, FRAME_SEQ_OFFSET, "<u8").copy(),
    }


def receipt_times(
    chunk_ends: Sequence[int] | np.ndarray,
    chunk_times: Sequence[float] | np.ndarray,
    record_bytes: int,
    n: int,
) -> np.ndarray:
    """When each record was complete, from the receive log of a byte stream.

    **Arguments:**

    - `chunk_ends`: after each `recv`, the total bytes received so far (increasing).
    - `chunk_times`: the clock reading right after each `recv`.
    - `record_bytes`: the size of every record.
    - `n`: records to time; the last must end within the log.

    **Returns:** float64 of shape `(n,)`: for record `i`, the time of the first `recv` at
    whose end all of its `record_bytes` had arrived.
    """
    ends = np.asarray(chunk_ends, np.int64)
    times = np.asarray(chunk_times, np.float64)
    record_ends = (np.arange(n, dtype=np.int64) + 1) * record_bytes
    index = np.searchsorted(ends, record_ends, side="left")
    if n and index[-1] >= ends.size:
        raise ValueError(f"{n} records of {record_bytes} bytes end past the log's last byte")
    return times[index]
