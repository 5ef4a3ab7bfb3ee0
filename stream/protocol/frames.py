"""Frame decoding: check one binary or JSON sensor frame and turn it into a `Frame`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._types import (
    _BITS,
    _F32,
    _FRAME_HEADER,
    _MAX_U64,
    _MODALITIES,
    _PREFIX,
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_HEADER_BYTES,
    FRAME_START,
    MAGIC_FRAME,
    MAX_STREAM_ID_BYTES,
    SESSION_START,
    VERSION,
    Buffer,
    Dims,
    Frame,
    FrameRejected,
    _byte_view,
    _pad,
)

_NUMBER_TYPES = frozenset((int, float))
_FORBIDDEN = re.compile(r"[ *>#+/]")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def non_finite_payload(payload: np.ndarray) -> FrameRejected | None:
    """The `non_finite` rejection of a payload holding a NaN or an infinity (naming the
    first), or None when every value is finite."""
    finite = np.isfinite(payload)
    if finite.all():
        return None
    index = int(np.argmin(finite))
    return FrameRejected("non_finite", f"payload[{index}]={payload[index]}, expected finite")


def _check_finite(payload: np.ndarray) -> None:
    rejected = non_finite_payload(payload)
    if rejected is not None:
        raise rejected


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
    _, _, version, flags, sid_len, *counts, _, seq, timestamp = _FRAME_HEADER.unpack_from(view)
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
    raw_id = bytes(view[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + sid_len])
    try:
        present = _check_counts(counts, dims)
        stream_id = _decode_id(raw_id)
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
    except FrameRejected as exc:
        # The header is consistent: the frame's seq and (when valid) id are known.
        exc.stream_id, exc.seq = _valid_id(raw_id), seq
        raise
    if flags & FRAME_START:
        present |= SESSION_START
    return Frame(stream_id, seq, timestamp, payload, present, received_ns, source)


def _decode_id(raw_id: bytes) -> str:
    """The text of a binary frame's stream id; `FrameRejected("bad_stream_id")` if bad."""
    try:
        stream_id = raw_id.decode("utf-8")
    except UnicodeDecodeError:
        stream_id = None
    if stream_id is None:
        raise FrameRejected("bad_stream_id", f"stream id {_short(raw_id)} is not valid UTF-8")
    check_stream_id(stream_id)
    return stream_id


def _valid_id(raw_id: bytes) -> str | None:
    """The text of a binary frame's stream id, or None when it breaks the id rule."""
    try:
        return _decode_id(raw_id)
    except FrameRejected:
        return None


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
    `null` modality is absent; `"start": true` starts a new session of the stream (like the
    binary header's `FRAME_START`); other keys are ignored.

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
    try:
        return _json_frame(obj, dims, received_ns, source)
    except FrameRejected as exc:
        exc.stream_id, exc.seq = _json_identity(obj)
        raise


def _json_frame(obj: dict[str, Any], dims: Dims, received_ns: int, source: str) -> Frame:
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
    session = obj.get("start", False)
    if type(session) is not bool:
        raise FrameRejected("bad_json", f'"start"={_short(session)}, expected true or false')
    if session:
        present |= SESSION_START
    return Frame(stream_id, seq, t, payload, present, received_ns, source)


def _json_identity(obj: dict[str, Any]) -> tuple[str | None, int | None]:
    """A JSON frame object's `"stream"` and `"seq"`, each None unless valid."""
    stream_id, seq = obj.get("stream"), obj.get("seq")
    if type(stream_id) is str:
        try:
            check_stream_id(stream_id)
        except FrameRejected:
            stream_id = None
    else:
        stream_id = None
    if type(seq) is not int or not 0 <= seq <= _MAX_U64:
        seq = None
    return stream_id, seq


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
