"""Wire protocol v1: constants, reject reasons, exceptions and the frame / moment types.

Also the packed header layouts and the few byte helpers shared by the codec modules.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import NamedTuple, TypeAlias

import numpy as np

MAGIC_FRAME = b"ESF1"
MAGIC_MOMENT = b"ESM1"
VERSION = 1
FRAME_HEADER_BYTES = 40  # through the timestamp; the stream id follows
MOMENT_HEADER_BYTES = 48  # through latency_ns; the stream id follows
MAX_STREAM_ID_BYTES = 255
DEFAULT_MAX_FRAME_BYTES = 1 << 20

# Presence bits, one per modality, in payload order.
SENSORY, PROPRIO, TACTILE, MOTOR = 1, 2, 4, 8
ALL_PRESENT = SENSORY | PROPRIO | TACTILE | MOTOR

# Frame header flags: the u16 at offset 10 (reserved and 0 before they existed; a daemon
# that predates them ignores them).
FRAME_START = 1
"""This frame starts a new session of its stream (the sensor restarted): its seq may be
anything, and the stream's state resets or continues as `ingest.session_start` says."""
FRAME_REPLY = 2
"""The sender reads replies: the daemon answers each rejected frame on this connection."""

# `Frame.present` carries a session start beside the presence bits (never on the wire).
SESSION_START = 1 << 8

# Moment flag bits.
FLAG_EAGER = 1
FLAG_RESTORED = 2
FLAG_ABSENT = 4
FLAG_SESSION_START = 8

REASONS = (
    "bad_magic",
    "bad_version",
    "bad_length",
    "oversize",
    "bad_stream_id",
    "dim_mismatch",
    "non_finite",
    "duplicate_seq",
    "stale_seq",
    "bad_json",
    "too_many_streams",
    "seq_jump",
    "forbidden",
)


class FrameRejected(Exception):
    """A frame broke the protocol; `reason` is one of `REASONS`.

    `stream_id` and `seq` are the frame's, when they were read (and the id is valid)
    before the rule it broke was checked, else None.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        stream_id: str | None = None,
        seq: int | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.stream_id = stream_id
        self.seq = seq


class FramingLost(FrameRejected):
    """A byte stream can no longer be split into frames (bad magic or bad length).

    `frames`: what the same read completed before the break, in order (frames, runs and
    rejections), so that nothing read before it is lost."""

    frames: list[Frame | FrameRejected | FrameRun] = []  # noqa: RUF012 - set per instance


class Dims(NamedTuple):
    """Configured sizes of the four input modalities, in payload order."""

    sensory: int
    proprio: int
    tactile: int
    motor: int

    @property
    def total(self) -> int:
        return self.sensory + self.proprio + self.tactile + self.motor


class MomentSizes(NamedTuple):
    """Sizes of the float32 vectors of a moment record, in record order."""

    moment: int
    synthesis: int
    schema: int
    motor: int
    scalars: int = 3

    @property
    def total(self) -> int:
        return self.moment + self.synthesis + self.schema + self.motor + self.scalars


@dataclasses.dataclass(slots=True)
class Frame:
    """One decoded, well-formed sensor frame.

    `payload` is float32 of shape `(dims.total,)`: sensory, proprio, tactile, motor in that
    order, zero-filled where a modality is absent; `present` holds the presence bits, and
    `SESSION_START` when the frame starts a new session of its stream.
    `received_ns` is `time.monotonic_ns()` when the bytes arrived; `source` is the metric
    label of the transport that carried it (`tcp`, `udp`, `json`, `synthetic`, ...);
    `position` is its source position, what the source needs to acknowledge it once its
    effect on state is durable (None where the transport has nothing to acknowledge:
    TCP, UDP, synthetic; see `stream.sources.base`).
    """

    stream_id: str
    seq: int
    timestamp: float
    payload: np.ndarray
    present: int
    received_ns: int
    source: str
    position: object = None


@dataclasses.dataclass(slots=True)
class FrameRun:
    """Well-formed frames decoded together from one read, as columns.

    A run's frames share their modalities (`present`), their receipt time and their
    source; row `i` is the frame `frame(i)`. The TCP reader hands whole runs to the
    pipeline, so the hot path builds no object per frame.

    - `stream_ids`, `seq`: per frame, as Python `str` and `int`.
    - `timestamp`: float64 `(n,)`; `payload`: float32 `(n, dims.total)`, zero-filled where
        a modality is absent.
    - `positions`: per frame, its source position; None when the source has none.
    """

    stream_ids: list[str]
    seq: list[int]
    timestamp: np.ndarray
    payload: np.ndarray
    present: int
    received_ns: int
    source: str
    positions: list[object] | None = None

    def __len__(self) -> int:
        return len(self.stream_ids)

    def frame(self, i: int) -> Frame:
        """Row `i` as a `Frame`."""
        return Frame(
            self.stream_ids[i],
            self.seq[i],
            float(self.timestamp[i]),
            self.payload[i],
            self.present,
            self.received_ns,
            self.source,
            None if self.positions is None else self.positions[i],
        )

    def frames(self) -> list[Frame]:
        """Every row as a `Frame`, in order."""
        return [self.frame(i) for i in range(len(self))]

    def head(self, n: int) -> FrameRun:
        """The run of the first `n` rows (views, no copy)."""
        return FrameRun(
            self.stream_ids[:n],
            self.seq[:n],
            self.timestamp[:n],
            self.payload[:n],
            self.present,
            self.received_ns,
            self.source,
            None if self.positions is None else self.positions[:n],
        )


@dataclasses.dataclass(slots=True)
class Moment:
    """One integrated moment for one frame.

    `values` is float32 of shape `(sizes.total,)`: moment, synthesis, schema, motor
    command, scalars (coherence, boundary, confidence) in that order.
    """

    stream_id: str
    seq: int
    timestamp: float
    latency_ns: int
    flags: int
    sizes: MomentSizes
    values: np.ndarray


Buffer: TypeAlias = bytes | bytearray | memoryview
"""Anything the decoders accept as input bytes."""

SCALAR_NAMES = ("coherence", "boundary", "confidence")
"""Names of the v1 moment scalars, in record order."""

_FRAME_HEADER = struct.Struct("<4sIHHHHHHHHQd")
_MOMENT_HEADER = struct.Struct("<4sIHHHHHHHHQdQ")
_PREFIX = struct.Struct("<4sI")
assert _FRAME_HEADER.size == FRAME_HEADER_BYTES
assert _MOMENT_HEADER.size == MOMENT_HEADER_BYTES

_MODALITIES = ("sensory", "proprio", "tactile", "motor")
_BITS = (SENSORY, PROPRIO, TACTILE, MOTOR)
_F32 = np.dtype("<f4")
_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")
_MAX_U64 = (1 << 64) - 1


def _pad(n: int) -> int:
    return -n & 3


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _encoded_id(stream_id: str) -> bytes:
    raw = stream_id.encode("utf-8")
    if not 1 <= len(raw) <= MAX_STREAM_ID_BYTES:
        raise ValueError(f"stream id is {len(raw)} UTF-8 bytes, expected 1..255")
    return raw
