"""Replies to senders: one per rejected frame, on the connection that sent it.

A JSON-lines connection always gets them, as one JSON line each:
`{"error": reason, "detail": text, "stream": id or null, "seq": n or null}`. A binary
connection gets them once a frame with the header flag `FRAME_REPLY` arrived on it (a
fire-and-forget sender never has to read), as binary records (docs/protocol.md):

| offset | size | type | field |
|---|---|---|---|
| 0 | 4 | bytes | magic `ESR1` |
| 4 | 4 | u32 | byte length of everything after this field |
| 8 | 2 | u16 | version = 1 |
| 10 | 2 | u16 | reason code: 1 + the reason's index in `REASONS` |
| 12 | 2 | u16 | stream id length L, 0 when not known |
| 14 | 2 | u16 | flags: bit 0 the seq is known |
| 16 | 8 | u64 | seq (0 when not known) |
| 24 | L | UTF-8 | stream id |
| 24+L | 0–3 | zero | padding to a multiple of 4 |
"""

from __future__ import annotations

import dataclasses
import json
import struct

from ._types import _PADS, REASONS, VERSION, FrameRejected, _byte_view, _pad

__all__ = [
    "MAGIC_REPLY",
    "Reply",
    "ReplyReader",
    "encode_error_line",
    "encode_reply",
    "reason_code",
]

MAGIC_REPLY = b"ESR1"
_HEADER = struct.Struct("<4sIHHHHQ")
_SEQ_KNOWN = 1
_CODES = {reason: i + 1 for i, reason in enumerate(REASONS)}


def reason_code(reason: str) -> int:
    """The wire code of a rejection reason: 1 + its index in `REASONS` (0: unknown)."""
    return _CODES.get(reason, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One decoded reply: the rejection `reason`, and the frame's `stream_id` and `seq`
    where they were known."""

    reason: str
    stream_id: str | None
    seq: int | None


def encode_reply(exc: FrameRejected) -> bytes:
    """The binary reply record for a rejected frame."""
    raw = (exc.stream_id or "").encode("utf-8")
    pad = _pad(len(raw))
    flags = _SEQ_KNOWN if exc.seq is not None else 0
    header = _HEADER.pack(
        MAGIC_REPLY,
        16 + len(raw) + pad,
        VERSION,
        reason_code(exc.reason),
        len(raw),
        flags,
        exc.seq or 0,
    )
    return header + raw + _PADS[pad]


def encode_error_line(exc: FrameRejected) -> bytes:
    """The JSON reply line for a rejected frame (`stream`/`seq` null when not known)."""
    reply = {"error": exc.reason, "detail": exc.detail, "stream": exc.stream_id, "seq": exc.seq}
    return json.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n"


class ReplyReader:
    """Splits a byte stream of binary reply records (the sender's side).

    **Raises** `ValueError` from `feed` on bytes that are not reply records.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        out: list[Reply] = []
        pos = 0
        with _byte_view(self._buf) as view:
            pos = self._split(view, out)
        del self._buf[:pos]
        return out

    def _split(self, view: memoryview, out: list[Reply]) -> int:
        pos = 0
        while len(view) - pos >= _HEADER.size:
            magic, length, version, code, sid_len, flags, seq = _HEADER.unpack_from(view, pos)
            if magic != MAGIC_REPLY or version != VERSION or length < 16 + sid_len:
                raise ValueError(f"not a reply record: magic {magic!r}, version {version}")
            if len(view) - pos < 8 + length:
                break
            start = pos + _HEADER.size
            stream_id = bytes(view[start : start + sid_len]).decode("utf-8") if sid_len else None
            reason = REASONS[code - 1] if 1 <= code <= len(REASONS) else f"code {code}"
            out.append(Reply(reason, stream_id, seq if flags & _SEQ_KNOWN else None))
            pos += 8 + length
        return pos
