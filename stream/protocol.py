"""Wire protocol v1: sensor frames in, integrated moments out.

The byte layout is documented in `docs/protocol.md`. All integers and floats are
little-endian. Decoding a frame never raises anything but `FrameRejected` (and its subclass
`FramingLost`), whatever the input bytes. Everything here is pure: no I/O, no clocks.

* `decode_frame` / `decode_json` / `decode_message`: one datagram or broker message.
* `FrameReader` / `LineReader`: incremental splitters for a TCP byte stream.
* `encode_frame` / `encode_json_frame`: the client side (the `send` CLI, tests).
* `encode_moment` / `moment_to_json` / `decode_moment` / `MomentReader`: records out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

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

# Moment flag bits.
FLAG_EAGER = 1
FLAG_RESTORED = 2
FLAG_ABSENT = 4

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
)


class FrameRejected(Exception):
    """A frame broke the protocol; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FramingLost(FrameRejected):
    """A byte stream can no longer be split into frames (bad magic or bad length)."""


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
    order, zero-filled where a modality is absent; `present` holds the presence bits.
    `received_ns` is `time.monotonic_ns()` when the bytes arrived; `source` is the metric
    label of the transport that carried it (`tcp`, `udp`, `json`, `synthetic`, ...).
    """

    stream_id: str
    seq: int
    timestamp: float
    payload: np.ndarray
    present: int
    received_ns: int
    source: str


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
_MOMENT_PARTS = ("moment", "synthesis", "schema", "motor", "scalars")
_F32 = np.dtype("<f4")
_NUMBER_TYPES = frozenset((int, float))
_FORBIDDEN = re.compile(r"[ *>#+/]")
_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")
_MAX_U64 = (1 << 64) - 1


def _pad(n: int) -> int:
    return -n & 3


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _clean(exc: FrameRejected) -> FrameRejected:
    # A fresh instance holds no traceback, so no frame (nor buffer) is kept alive by it.
    return type(exc)(exc.reason, exc.detail)


def check_stream_id(stream_id: str) -> None:
    """Check the stream-id rule shared by every transport.

    A stream id is 1..255 bytes of UTF-8 of printable characters (none of Unicode
    categories C*, control/format/private-use/unassigned, or Z*, separators), without
    space or any of `* > # + /`, which would break subscriber globs, NATS subjects and
    MQTT topics.

    **Arguments:**

    - `stream_id`: the candidate id.

    **Raises:**

    `FrameRejected("bad_stream_id")` when the rule is broken.
    """
    if not stream_id.isprintable() or _FORBIDDEN.search(stream_id):
        raise FrameRejected(
            "bad_stream_id",
            f"stream id {_short(stream_id)} has a space, control character or one of * > # + /",
        )
    size = len(stream_id.encode("utf-8"))
    if not 1 <= size <= MAX_STREAM_ID_BYTES:
        raise FrameRejected(
            "bad_stream_id", f"stream id is {size} UTF-8 bytes, expected 1..{MAX_STREAM_ID_BYTES}"
        )


def _check_counts(counts: Sequence[int], dims: Dims) -> int:
    present = 0
    for bit, name, n, dim in zip(_BITS, _MODALITIES, counts, dims, strict=True):
        if n:
            if n != dim:
                expected = f"0 or {dim}" if dim else "0"
                raise FrameRejected("dim_mismatch", f"N_{name}={n}, expected {expected}")
            present |= bit
    return present


def _check_finite(payload: np.ndarray) -> None:
    finite = np.isfinite(payload)
    if not finite.all():
        index = int(np.argmin(finite))
        raise FrameRejected("non_finite", f"payload[{index}]={payload[index]}, expected finite")


def decode_frame(
    buf: Buffer,
    dims: Dims,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    received_ns: int = 0,
    source: str = "",
) -> Frame:
    """Decode exactly one complete binary frame (a datagram or a broker message).

    **Arguments:**

    - `buf`: the frame's bytes, nothing before or after it.
    - `dims`: the configured modality sizes.
    - `max_frame_bytes`: the largest accepted value of the length field.
    - `received_ns`, `source`: copied into the `Frame`.

    **Returns:**

    A `Frame` whose `payload` is a new float32 array of shape `(dims.total,)`.

    **Raises:**

    `FrameRejected` with reason `bad_magic`, `oversize`, `bad_length`, `bad_version`,
    `bad_stream_id`, `dim_mismatch` or `non_finite`, checked in that order.
    """
    view = _byte_view(buf)
    size = view.nbytes
    if view[:4] != MAGIC_FRAME:
        raise FrameRejected("bad_magic", f"magic {bytes(view[:4])!r}, expected {MAGIC_FRAME!r}")
    if size < 8:
        raise FrameRejected("bad_length", f"{size} bytes, expected at least {FRAME_HEADER_BYTES}")
    _, length = _PREFIX.unpack_from(view)
    if length > max_frame_bytes:
        raise FrameRejected("oversize", f"length={length}, max_frame_bytes={max_frame_bytes}")
    if size != 8 + length:
        raise FrameRejected("bad_length", f"length={length}, but {size - 8} bytes follow it")
    if length < FRAME_HEADER_BYTES - 8:
        raise FrameRejected("bad_length", f"length={length}, expected at least 32")
    _, _, version, _, sid_len, *counts, _, seq, timestamp = _FRAME_HEADER.unpack_from(view)
    if version != VERSION:
        raise FrameRejected("bad_version", f"version={version}, expected {VERSION}")
    if not 1 <= sid_len <= MAX_STREAM_ID_BYTES:
        raise FrameRejected("bad_stream_id", f"L={sid_len}, expected 1..{MAX_STREAM_ID_BYTES}")
    offset = FRAME_HEADER_BYTES + sid_len + _pad(sid_len)
    expected = offset - 8 + 4 * sum(counts)
    if length != expected:
        raise FrameRejected(
            "bad_length", f"length={length}, expected {expected} for L={sid_len}, N={counts}"
        )
    present = _check_counts(counts, dims)
    raw_id = bytes(view[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + sid_len])
    try:
        stream_id = raw_id.decode("utf-8")
    except UnicodeDecodeError:
        stream_id = None
    if stream_id is None:
        raise FrameRejected("bad_stream_id", f"stream id {_short(raw_id)} is not valid UTF-8")
    check_stream_id(stream_id)
    if not math.isfinite(timestamp):
        raise FrameRejected("non_finite", f"timestamp={timestamp}, expected finite")
    total = dims.total
    if sum(counts) == total:
        payload = np.frombuffer(view, _F32, total, offset).astype(np.float32)
    else:
        payload = np.zeros(total, np.float32)
        start = 0
        for n, dim in zip(counts, dims, strict=True):
            if n:
                payload[start : start + n] = np.frombuffer(view, _F32, n, offset)
                offset += 4 * n
            start += dim
    _check_finite(payload)
    return Frame(stream_id, seq, timestamp, payload, present, received_ns, source)


def _reject_constant(token: str) -> Any:
    raise FrameRejected("non_finite", f"{token} in JSON, expected finite numbers")


def decode_json(
    line: Buffer | str,
    dims: Dims,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    received_ns: int = 0,
    source: str = "",
) -> Frame:
    """Decode one JSON frame object, e.g.
    `{"stream": "arm-1", "seq": 1, "t": 0.01, "sensory": [...], "proprio": [...]}`.

    `stream`, `seq` (integer 0..2**64-1) and `t` (number) are required; a missing or
    `null` modality is absent; other keys are ignored.

    **Arguments:**

    - `line`: one JSON object (UTF-8), surrounding whitespace allowed.
    - `dims`, `max_frame_bytes`, `received_ns`, `source`: as for `decode_frame`.

    **Returns:**

    A `Frame` whose `payload` is float32 of shape `(dims.total,)`.

    **Raises:**

    `FrameRejected` with reason `oversize`, `bad_json`, `bad_stream_id`, `dim_mismatch` or
    `non_finite` (`NaN`/`Infinity` tokens, or numbers beyond float32's range).
    """
    if isinstance(line, str):
        if len(line) > max_frame_bytes:
            raise FrameRejected("oversize", f"{len(line)} characters, max {max_frame_bytes}")
        try:
            data = memoryview(line.encode("utf-8"))
        except UnicodeEncodeError:
            raise FrameRejected("bad_json", "text is not encodable as UTF-8") from None
    else:
        data = _byte_view(line)
    if data.nbytes > max_frame_bytes:
        raise FrameRejected("oversize", f"{data.nbytes} bytes, max_frame_bytes={max_frame_bytes}")
    problem = ""
    try:
        obj = json.loads(str(data, "utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        problem = "not valid UTF-8"
    except (ValueError, RecursionError) as exc:
        problem = f"not JSON ({_short(str(exc), 80)})"
    if problem:
        raise FrameRejected("bad_json", problem)
    if type(obj) is not dict:
        raise FrameRejected("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    stream_id, seq, timestamp = obj.get("stream"), obj.get("seq"), obj.get("t")
    if type(stream_id) is not str:
        raise FrameRejected("bad_json", f'"stream"={_short(stream_id)}, expected a string')
    if type(seq) is not int or not 0 <= seq <= _MAX_U64:
        raise FrameRejected("bad_json", f'"seq"={_short(seq)}, expected an integer 0..2**64-1')
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise FrameRejected("bad_json", f'"t"={_short(timestamp)}, expected a number')
    check_stream_id(stream_id)
    try:
        t = float(timestamp)
    except OverflowError:
        t = math.inf
    if not math.isfinite(t):
        raise FrameRejected("non_finite", f'"t"={_short(timestamp)}, expected finite')
    payload = np.zeros(dims.total, np.float32)
    present = start = 0
    for bit, name, dim in zip(_BITS, _MODALITIES, dims, strict=True):
        values = obj.get(name)
        if values is not None:
            if type(values) is not list or not _NUMBER_TYPES.issuperset(map(type, values)):
                raise FrameRejected("bad_json", f'"{name}"={_short(values)}, expected numbers')
            if len(values) != dim:
                raise FrameRejected("dim_mismatch", f"len({name})={len(values)}, expected {dim}")
            if dim:
                try:
                    with np.errstate(over="ignore"):
                        payload[start : start + dim] = values
                except OverflowError:
                    raise FrameRejected("non_finite", f'"{name}" has a huge integer') from None
                present |= bit
        start += dim
    _check_finite(payload)
    return Frame(stream_id, seq, t, payload, present, received_ns, source)


def decode_message(
    buf: Buffer,
    dims: Dims,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    received_ns: int = 0,
    source: str = "",
) -> Frame:
    """Decode one UDP datagram or broker message: JSON if its first byte is `{`, else binary.

    Arguments, return value and rejections as for `decode_json` / `decode_frame`.
    """
    view = _byte_view(buf)
    decode = decode_json if view[:1] == b"{" else decode_frame
    return decode(
        view, dims, max_frame_bytes=max_frame_bytes, received_ns=received_ns, source=source
    )


class FrameReader:
    """Splits a TCP byte stream of binary frames, back to back, into decoded frames.

    Holds at most one incomplete frame (at most `8 + max_frame_bytes` bytes). An oversize
    frame does not lose framing: its declared bytes are skipped as they arrive, unbuffered.

    **Arguments:**

    - `dims`: the configured modality sizes.
    - `max_frame_bytes`: the largest accepted value of the length field.
    - `source`: the `Frame.source` label of decoded frames.
    """

    def __init__(
        self, dims: Dims, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, source: str = "tcp"
    ) -> None:
        self.dims = dims
        self.max_frame_bytes = max_frame_bytes
        self.source = source
        self._buf = bytearray()
        self._skip = 0
        self._lost: FramingLost | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes held for a frame that has not arrived completely."""
        return len(self._buf)

    def feed(self, data: Buffer, received_ns: int) -> list[Frame | FrameRejected]:
        """Consume the next bytes of the stream.

        **Arguments:**

        - `data`: the bytes just received (any length, including 0).
        - `received_ns`: their receipt time, copied into each completed `Frame`.

        **Returns:**

        Every frame completed by `data`, in order: a `Frame`, or the `FrameRejected` it
        earned (returned, not raised).

        **Raises:**

        `FramingLost` (reason `bad_magic` or `bad_length`) when the stream can no longer be
        split into frames: a wrong magic, a length field below 32 or inconsistent with the
        header. Frames completed earlier in the same call are discarded with it; every later
        call raises it again. The connection must be closed.
        """
        if self._lost is not None:
            raise _clean(self._lost)
        if self._skip:
            view = _byte_view(data)
            n = min(self._skip, view.nbytes)
            self._skip -= n
            data = view[n:]
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data if type(data) is bytes else bytes(data)
        out: list[Frame | FrameRejected] = []
        pos, end = 0, len(src)
        while end - pos >= 8:
            magic, length = _PREFIX.unpack_from(src, pos)
            if magic != MAGIC_FRAME:
                self._lost = FramingLost("bad_magic", f"magic {magic!r}, expected {MAGIC_FRAME!r}")
                break
            if length > self.max_frame_bytes:
                detail = f"length={length}, max_frame_bytes={self.max_frame_bytes}"
                out.append(FrameRejected("oversize", detail))
                take = min(8 + length, end - pos)
                pos += take
                self._skip = 8 + length - take
                continue
            if length < FRAME_HEADER_BYTES - 8:
                self._lost = FramingLost("bad_length", f"length={length}, expected at least 32")
                break
            if end - pos >= FRAME_HEADER_BYTES:
                self._lost = _header_inconsistency(src, pos, length)
                if self._lost is not None:
                    break
            if end - pos < 8 + length:
                break
            stop = pos + 8 + length
            # Slicing the bytearray copies, so the buffer is never exported and can shrink.
            frame = src[pos:stop] if src is self._buf else memoryview(src)[pos:stop]
            try:
                out.append(
                    decode_frame(
                        frame,
                        self.dims,
                        max_frame_bytes=self.max_frame_bytes,
                        received_ns=received_ns,
                        source=self.source,
                    )
                )
            except FrameRejected as exc:
                out.append(_clean(exc))
            pos = stop
        if self._lost is not None:
            self._buf.clear()
            raise _clean(self._lost)
        if src is self._buf:
            del self._buf[:pos]
        else:
            self._buf += memoryview(src)[pos:]
        return out


def _header_inconsistency(src: bytes | bytearray, pos: int, length: int) -> FramingLost | None:
    _, _, version, _, sid_len, *counts, _, _, _ = _FRAME_HEADER.unpack_from(src, pos)
    if version != VERSION:
        return None  # a later version may lay out its header differently; decode rejects it
    expected = 32 + sid_len + _pad(sid_len) + 4 * sum(counts)
    if length == expected:
        return None
    return FramingLost(
        "bad_length", f"length={length}, expected {expected} for L={sid_len}, N={counts}"
    )


class LineReader:
    """Splits a JSON-lines TCP stream into decoded frames; never loses framing.

    Empty lines and `\\r\\n` line ends are tolerated. Holds at most one incomplete line
    (about `max_frame_bytes` bytes): a longer line earns one `oversize` rejection and the
    rest of it is discarded up to the next newline.

    **Arguments:**

    - `dims`: the configured modality sizes.
    - `max_frame_bytes`: the longest accepted line, in bytes.
    - `source`: the `Frame.source` label of decoded frames.
    """

    def __init__(
        self, dims: Dims, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, source: str = "json"
    ) -> None:
        self.dims = dims
        self.max_frame_bytes = max_frame_bytes
        self.source = source
        self._buf = bytearray()
        self._discarding = False

    @property
    def pending_bytes(self) -> int:
        """Bytes held for a line that has not arrived completely."""
        return len(self._buf)

    def feed(self, data: Buffer, received_ns: int) -> list[Frame | FrameRejected]:
        """Consume the next bytes of the stream.

        **Arguments:**

        - `data`: the bytes just received (any length, including 0).
        - `received_ns`: their receipt time, copied into each completed `Frame`.

        **Returns:**

        For every line completed by `data`, in order: a `Frame`, or the `FrameRejected` it
        earned (returned, not raised).
        """
        out: list[Frame | FrameRejected] = []
        src = data if type(data) is bytes else bytes(data)
        start = 0
        if self._discarding:
            newline = src.find(b"\n")
            if newline < 0:
                return out
            self._discarding = False
            start = newline + 1
        while (newline := src.find(b"\n", start)) >= 0:
            if self._buf:
                self._buf += memoryview(src)[start:newline]
                line = bytes(self._buf)
                self._buf.clear()
            else:
                line = src[start:newline]
            start = newline + 1
            self._decode_line(line, received_ns, out)
        if len(self._buf) + len(src) - start > self.max_frame_bytes + 1:  # + 1 for a "\r"
            detail = f"line longer than max_frame_bytes={self.max_frame_bytes}"
            out.append(FrameRejected("oversize", detail))
            self._buf.clear()
            self._discarding = True
        else:
            self._buf += memoryview(src)[start:]
        return out

    def _decode_line(self, line: bytes, received_ns: int, out: list[Frame | FrameRejected]) -> None:
        line = line.strip()
        if not line:
            return
        try:
            frame = decode_json(
                line,
                self.dims,
                max_frame_bytes=self.max_frame_bytes,
                received_ns=received_ns,
                source=self.source,
            )
        except FrameRejected as exc:
            out.append(_clean(exc))
        else:
            out.append(frame)


def _as_f32(values: npt.ArrayLike | None) -> np.ndarray:
    if values is None:
        return np.zeros(0, _F32)
    array = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    if array.size > 0xFFFF:
        raise ValueError(f"{array.size} values in one modality, expected at most 65535")
    return array


def _encoded_id(stream_id: str) -> bytes:
    raw = stream_id.encode("utf-8")
    if not 1 <= len(raw) <= MAX_STREAM_ID_BYTES:
        raise ValueError(f"stream id is {len(raw)} UTF-8 bytes, expected 1..255")
    return raw


def encode_frame(
    stream_id: str,
    seq: int,
    timestamp: float,
    *,
    sensory: npt.ArrayLike | None = None,
    proprio: npt.ArrayLike | None = None,
    tactile: npt.ArrayLike | None = None,
    motor: npt.ArrayLike | None = None,
) -> bytes:
    """Encode one binary frame (the client side).

    Only what is needed to produce bytes is validated: the daemon rejects the rest.

    **Arguments:**

    - `stream_id`: 1..255 bytes of UTF-8.
    - `seq`: 0..2**64-1.
    - `timestamp`: seconds on the sensor's clock.
    - `sensory`, `proprio`, `tactile`, `motor`: float32 array-likes of any shape
        (flattened), or `None` / empty for an absent modality.

    **Returns:**

    The frame's bytes.

    **Raises:**

    `ValueError` for a stream id of the wrong length, `seq` out of range, or a modality of
    more than 65535 values.
    """
    raw = _encoded_id(stream_id)
    if not 0 <= seq <= _MAX_U64:
        raise ValueError(f"seq={seq}, expected 0..2**64-1")
    parts = [_as_f32(v) for v in (sensory, proprio, tactile, motor)]
    counts = [p.size for p in parts]
    pad = _pad(len(raw))
    length = 32 + len(raw) + pad + 4 * sum(counts)
    header = _FRAME_HEADER.pack(
        MAGIC_FRAME, length, VERSION, 0, len(raw), *counts, 0, seq, timestamp
    )
    return b"".join((header, raw, _PADS[pad], *(p.tobytes() for p in parts)))


def encode_json_frame(
    stream_id: str,
    seq: int,
    timestamp: float,
    *,
    sensory: npt.ArrayLike | None = None,
    proprio: npt.ArrayLike | None = None,
    tactile: npt.ArrayLike | None = None,
    motor: npt.ArrayLike | None = None,
) -> bytes:
    """Encode one JSON frame as one line ending in `\\n` (the client side).

    Arguments as for `encode_frame`; an absent modality's key is left out. Non-finite values
    are written as `NaN` / `Infinity`, which the daemon rejects (`non_finite`).

    **Returns:**

    The line's UTF-8 bytes.
    """
    _encoded_id(stream_id)
    obj: dict[str, Any] = {"stream": stream_id, "seq": seq, "t": float(timestamp)}
    for name, values in zip(_MODALITIES, (sensory, proprio, tactile, motor), strict=True):
        array = _as_f32(values)
        if array.size:
            obj[name] = array.tolist()
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def encode_moment(m: Moment) -> bytes:
    """Encode one binary moment record.

    **Arguments:**

    - `m`: the moment; `m.values` is float32 of shape `(m.sizes.total,)`.

    **Returns:**

    The record's bytes.

    **Raises:**

    `ValueError` when the stream id is not 1..255 bytes or `m.values` has the wrong size.
    """
    raw = _encoded_id(m.stream_id)
    values = np.ascontiguousarray(m.values, dtype=_F32).reshape(-1)
    if values.size != m.sizes.total:
        raise ValueError(f"{values.size} values, expected sizes.total={m.sizes.total}")
    pad = _pad(len(raw))
    length = MOMENT_HEADER_BYTES - 8 + len(raw) + pad + 4 * values.size
    header = _MOMENT_HEADER.pack(
        MAGIC_MOMENT,
        length,
        VERSION,
        m.flags,
        len(raw),
        *m.sizes,
        m.seq,
        m.timestamp,
        m.latency_ns,
    )
    return b"".join((header, raw, _PADS[pad], values.tobytes()))


def moment_fields(m: Moment) -> dict[str, np.ndarray]:
    """Slice a moment's values into its named parts.

    **Arguments:**

    - `m`: the moment.

    **Returns:**

    `{"moment", "synthesis", "schema", "motor", "scalars"}` → float32 views into `m.values`
    of shapes `(sizes.moment,)` ... `(sizes.scalars,)`.
    """
    fields = {}
    start = 0
    for name, n in zip(_MOMENT_PARTS, m.sizes, strict=True):
        fields[name] = m.values[start : start + n]
        start += n
    return fields


def moment_to_json(m: Moment) -> bytes:
    """Encode one moment as one JSON line ending in `\\n`.

    Keys: `stream`, `seq`, `t`, `latency_ns`, `flags`, `moment`, `synthesis`, `schema`,
    `motor` (lists of numbers) and `scalars` (`{"coherence", "boundary", "confidence"}`).
    A non-finite value is written as `null`, so the line is strict JSON.

    **Arguments:**

    - `m`: the moment, with `m.sizes.scalars == 3`.

    **Returns:**

    The line's UTF-8 bytes.
    """
    if m.sizes.scalars != len(SCALAR_NAMES):
        raise ValueError(f"sizes.scalars={m.sizes.scalars}, expected {len(SCALAR_NAMES)}")
    finite = bool(np.isfinite(m.values).all())
    lists = {
        name: part.tolist() if finite else [x if math.isfinite(x) else None for x in part.tolist()]
        for name, part in moment_fields(m).items()
    }
    obj = {
        "stream": m.stream_id,
        "seq": m.seq,
        "t": m.timestamp,
        "latency_ns": m.latency_ns,
        "flags": m.flags,
        "moment": lists["moment"],
        "synthesis": lists["synthesis"],
        "schema": lists["schema"],
        "motor": lists["motor"],
        "scalars": dict(zip(SCALAR_NAMES, lists["scalars"], strict=True)),
    }
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8") + b"\n"


def _parse_moment(src: Buffer, pos: int) -> tuple[Moment, int] | None:
    # One record at `pos`: (moment, bytes consumed), None while incomplete, ValueError if bad.
    available = len(src) - pos
    if available < 8:
        return None
    magic, length = _PREFIX.unpack_from(src, pos)
    if magic != MAGIC_MOMENT:
        raise ValueError(f"moment magic {magic!r}, expected {MAGIC_MOMENT!r}")
    if available < MOMENT_HEADER_BYTES:
        return None
    header = _MOMENT_HEADER.unpack_from(src, pos)
    _, _, version, flags, sid_len, *counts, seq, timestamp, latency_ns = header
    if version != VERSION:
        raise ValueError(f"moment version={version}, expected {VERSION}")
    sizes = MomentSizes(*counts)
    offset = MOMENT_HEADER_BYTES + sid_len + _pad(sid_len)
    expected = offset - 8 + 4 * sizes.total
    if length != expected:
        raise ValueError(f"moment length={length}, expected {expected}")
    if available < 8 + length:
        return None
    start = pos + MOMENT_HEADER_BYTES
    stream_id = bytes(src[start : start + sid_len]).decode("utf-8")
    values = np.frombuffer(src, _F32, sizes.total, pos + offset).astype(np.float32)
    moment = Moment(stream_id, seq, timestamp, latency_ns, flags, sizes, values)
    return moment, 8 + length


def decode_moment(buf: Buffer) -> tuple[Moment, int]:
    """Decode the binary moment record at the start of `buf`.

    **Arguments:**

    - `buf`: bytes starting with a complete record; more may follow.

    **Returns:**

    The `Moment` (its `values` a new float32 array of shape `(sizes.total,)`) and the
    number of bytes it took.

    **Raises:**

    `ValueError` for a wrong magic, version or length, bad UTF-8, or an incomplete record.
    """
    view = _byte_view(buf)
    parsed = _parse_moment(view, 0)
    if parsed is None:
        raise ValueError(f"incomplete moment record: {view.nbytes} bytes")
    return parsed


class MomentReader:
    """Splits a binary moment byte stream (a subscriber connection) into moments."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes held for a record that has not arrived completely."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Moment]:
        """Consume the next bytes of the stream.

        **Arguments:**

        - `data`: the bytes just received.

        **Returns:**

        Every moment completed by `data`, in order.

        **Raises:**

        `ValueError` for a wrong magic, version or length (the stream is then unusable).
        """
        self._buf += data
        out: list[Moment] = []
        pos = 0
        try:
            while (parsed := _parse_moment(self._buf, pos)) is not None:
                out.append(parsed[0])
                pos += parsed[1]
        except ValueError:
            self._buf.clear()
            raise
        del self._buf[:pos]
        return out
