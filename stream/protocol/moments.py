"""Moment codec: encode integrated moments (binary or JSON) and read them back."""

from __future__ import annotations

import json
import math

import numpy as np

from ._types import (
    _F32,
    _MOMENT_HEADER,
    _PADS,
    _PREFIX,
    MAGIC_MOMENT,
    MOMENT_HEADER_BYTES,
    SCALAR_NAMES,
    VERSION,
    Buffer,
    Moment,
    MomentSizes,
    _byte_view,
    _encoded_id,
    _pad,
)

_MOMENT_PARTS = ("moment", "synthesis", "schema", "motor", "scalars")


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
