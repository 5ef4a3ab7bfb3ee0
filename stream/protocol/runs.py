"""Decoding a run of like frames in one numpy pass.

A sensor connection usually sends frames of one shape back to back: the same stream-id
length and the same modalities, so the same length field. `decode_run` views such a run
as a numpy structured array and checks and decodes every frame of it at once — the
header fields, the payloads and their finiteness — so a frame costs well under a
microsecond instead of a `struct.unpack` and a few small numpy calls each. The result is
exactly what `decode_frame` gives frame by frame: the same `Frame`s, and the same
rejections with the same reasons.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import numpy as np

from ._types import (
    _F32,
    _FRAME_HEADER,
    FRAME_HEADER_BYTES,
    FRAME_START,
    MAGIC_FRAME,
    MAX_STREAM_ID_BYTES,
    VERSION,
    Dims,
    Frame,
    FrameRejected,
    FrameRun,
    _pad,
)
from .frames import _check_counts, check_stream_id, non_finite_payload

__all__ = ["MIN_RUN", "decode_messages", "decode_run", "like_messages", "message_runs"]

MIN_RUN = 4
"""Frames a run needs before the vectorised path is worth its set-up."""

_MAGIC = int.from_bytes(MAGIC_FRAME, "little")


@functools.cache
def _layout(sid_len: int, floats: int) -> np.dtype:
    """The packed layout of one frame with this stream-id length and payload size."""
    return np.dtype([
        ("magic", "<u4"), ("length", "<u4"), ("version", "<u2"), ("reserved", "<u2"),
        ("sid_len", "<u2"), ("counts", "<u2", (4,)), ("reserved2", "<u2"), ("seq", "<u8"),
        ("timestamp", "<f8"), ("id", "V", sid_len + _pad(sid_len)), ("payload", _F32, (floats,)),
    ])  # fmt: skip


@functools.lru_cache(maxsize=1 << 16)
def _stream_id(raw: bytes) -> str | FrameRejected:
    """A raw id's text, or the rejection `decode_frame` would give it (memoised: ids repeat)."""
    try:
        stream_id = raw.decode("utf-8")
    except UnicodeDecodeError:
        return FrameRejected("bad_stream_id", "stream id is not valid UTF-8")
    try:
        check_stream_id(stream_id)
    except FrameRejected as exc:
        # A fresh instance: the caught one's traceback would keep the caller's frame (and
        # the receive buffer it views) alive in this cache.
        return FrameRejected(exc.reason, exc.detail)
    return stream_id


def decode_run(
    src: bytes | bytearray,
    pos: int,
    end: int,
    dims: Dims,
    *,
    max_frame_bytes: int,
    received_ns: int,
    source: str,
    as_run: bool = False,
) -> tuple[list[Frame | FrameRejected | FrameRun], int]:
    """Decode the run of frames shaped like the one at `src[pos]`.

    **Arguments:**

    - `src`, `pos`, `end`: the buffer and the bounds of its unread bytes; a whole frame
        starts at `pos`.
    - `dims`, `max_frame_bytes`, `received_ns`, `source`: as for `decode_frame`.
    - `as_run`: a run whose frames are all good comes back as one `FrameRun` instead of
        a `Frame` each.

    **Returns:** `(items, next_pos)`: one `Frame` or `FrameRejected` per frame of the run,
    in order (or `[FrameRun]`, see `as_run`), and where the run ended. `([], pos)` when
    there is no run of at least `MIN_RUN` complete frames whose header matches the
    first's (the caller then goes on frame by frame, which also finds any framing error).
    """
    head = _FRAME_HEADER.unpack_from(src, pos)
    magic, length, version, flags, sid_len, *counts, _, _, _ = head
    size = 8 + length
    whole = (end - pos) // size
    if (
        whole < MIN_RUN
        or magic != MAGIC_FRAME
        or version != VERSION
        or length > max_frame_bytes
        or not 1 <= sid_len <= MAX_STREAM_ID_BYTES
        or flags & FRAME_START
    ):
        return [], pos
    floats = sum(counts)
    if length != FRAME_HEADER_BYTES - 8 + sid_len + _pad(sid_len) + 4 * floats:
        return [], pos
    try:
        present = _check_counts(counts, dims)
    except FrameRejected:
        return [], pos
    rows = np.frombuffer(src, _layout(sid_len, floats), whole, pos)
    same = (
        (rows["magic"] == _MAGIC)
        & (rows["length"] == length)
        & (rows["version"] == VERSION)
        & (rows["sid_len"] == sid_len)
        & (rows["counts"] == counts).all(axis=1)
        & (rows["reserved"] & FRAME_START == 0)  # a session start goes frame by frame
    )
    n = whole if same.all() else int(np.argmin(same))
    if n < MIN_RUN:
        return [], pos
    rows = rows[:n]
    if floats == dims.total:
        payload = rows["payload"].astype(np.float32)  # a copy: frames never alias `src`
    else:
        payload = np.zeros((n, dims.total), np.float32)
        start = column = 0
        for count, dim in zip(counts, dims, strict=True):
            if count:
                payload[:, start : start + count] = rows["payload"][:, column : column + count]
                column += count
            start += dim
    seq = rows["seq"].tolist()
    ids = rows["id"].tobytes()
    step = sid_len + _pad(sid_len)
    stream_ids = [_stream_id(ids[i : i + sid_len]) for i in range(0, n * step, step)]
    finite_payload = np.isfinite(payload).all(axis=1)
    finite_t = np.isfinite(rows["timestamp"])
    all_good = (finite_payload & finite_t).all() and all(type(s) is str for s in stream_ids)
    if all_good and as_run:
        timestamps = np.array(rows["timestamp"], np.float64)  # a copy, like `payload`
        good = cast(list[str], stream_ids)  # all `str`: checked just above
        run = FrameRun(good, seq, timestamps, payload, present, received_ns, source)
        return [run], pos + n * size
    timestamp = rows["timestamp"].tolist()
    if all_good:
        # The common case, every frame good: no per-frame checks.
        frames: list[Frame | FrameRejected | FrameRun] = [
            Frame(s, q, ts, row, present, received_ns, source)  # type: ignore[arg-type]
            for s, q, ts, row in zip(stream_ids, seq, timestamp, payload, strict=True)
        ]
        return frames, pos + n * size
    out: list[Frame | FrameRejected | FrameRun] = []
    for i, ok in enumerate(cast(list[bool], finite_payload.tolist())):
        stream_id = stream_ids[i]
        if isinstance(stream_id, FrameRejected):
            out.append(FrameRejected(stream_id.reason, stream_id.detail, seq=seq[i]))
        elif not finite_t[i]:
            detail = f"timestamp={timestamp[i]}, expected finite"
            out.append(FrameRejected("non_finite", detail, stream_id=stream_id, seq=seq[i]))
        elif not ok:
            rejected = cast(FrameRejected, non_finite_payload(payload[i]))
            rejected.stream_id, rejected.seq = stream_id, seq[i]
            out.append(rejected)
        else:
            out.append(
                Frame(stream_id, seq[i], timestamp[i], payload[i], present, received_ns, source)
            )
    return out, pos + n * size


def like_messages(payloads: Sequence[bytes | bytearray], start: int) -> int:
    """Where the stretch of broker messages from `payloads[start]` that may form a run
    ends: binary frames (not JSON) of the first one's size."""
    first = payloads[start]
    end = start + 1
    if first[:1] != b"{":
        while end < len(payloads) and len(payloads[end]) == len(first):
            end += 1
    return end


def decode_messages(
    payloads: Sequence[bytes | bytearray],
    dims: Dims,
    *,
    max_frame_bytes: int,
    received_ns: int,
    source: str,
) -> FrameRun | None:
    """Broker messages of one frame each (a stretch `like_messages` found, at least
    `MIN_RUN` long) decoded as one `FrameRun` at the head of them, in one numpy pass;
    None when a frame among them is rejected (the caller then goes one by one, each with
    its reason)."""
    data = b"".join(payloads)
    items, _ = decode_run(
        data,
        0,
        len(data),
        dims,
        max_frame_bytes=max_frame_bytes,
        received_ns=received_ns,
        source=source,
        as_run=True,
    )
    if len(items) != 1 or type(items[0]) is not FrameRun:
        return None
    return items[0]


def message_runs(
    payloads: Sequence[bytes | bytearray],
    dims: Dims,
    *,
    max_frame_bytes: int,
    received_ns: Sequence[int],
    source: str,
) -> list[tuple[int, int, FrameRun | None]]:
    """Messages of one frame each (datagrams; one read from each of many connections)
    split, in order, into runs decoded in one numpy pass each and what must go one by one.

    **Returns:** `(start, end, run)` for consecutive stretches covering every payload:
    `run` holds the frames of `payloads[start:end]`, received at `received_ns[start]` (the
    earliest of them); None where those payloads must be decoded one by one (fewer than
    `MIN_RUN` alike, or a frame among them rejected: each then gets its own reason).
    """
    out: list[tuple[int, int, FrameRun | None]] = []
    i, n = 0, len(payloads)
    while i < n:
        j = like_messages(payloads, i)
        run = None
        if j - i >= MIN_RUN:
            run = decode_messages(
                payloads[i:j],
                dims,
                max_frame_bytes=max_frame_bytes,
                received_ns=received_ns[i],
                source=source,
            )
        if run is not None:
            j = i + len(run)  # (a frame unlike the first ends it: the rest goes on)
        if out and run is None and out[-1][2] is None:
            out[-1] = (out[-1][0], j, None)  # one by one, after one by one: one stretch
        else:
            out.append((i, j, run))
        i = j
    return out
