"""Incremental readers that split a TCP byte stream (binary or JSON lines) into frames."""

from __future__ import annotations

from ._types import (
    _FRAME_HEADER,
    _PREFIX,
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_HEADER_BYTES,
    FRAME_REPLY,
    MAGIC_FRAME,
    VERSION,
    Buffer,
    Dims,
    Frame,
    FrameRejected,
    FrameRun,
    FramingLost,
    _byte_view,
    _pad,
)
from .frames import decode_frame, decode_json
from .runs import MIN_RUN, decode_run


def _clean(exc: FrameRejected) -> FrameRejected:
    # A fresh instance holds no traceback, so no frame (nor buffer) is kept alive by it.
    return type(exc)(exc.reason, exc.detail, stream_id=exc.stream_id, seq=exc.seq)


class FrameReader:
    """Splits a TCP byte stream of binary frames, back to back, into decoded frames.

    Holds at most one incomplete frame (at most `8 + max_frame_bytes` bytes). An oversize
    frame does not lose framing: its declared bytes are skipped as they arrive, unbuffered.

    **Arguments:**

    - `dims`: the configured modality sizes.
    - `max_frame_bytes`: the largest accepted value of the length field.
    - `source`: the `Frame.source` label of decoded frames.
    - `runs`: hand a run of good, like frames (at least `MIN_RUN`, decoded in one pass) over
        as one `FrameRun` instead of a `Frame` each.

    `replies` turns True once a frame header with the flag `FRAME_REPLY` was read: the
    sender reads replies.
    """

    def __init__(
        self,
        dims: Dims,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        source: str = "tcp",
        runs: bool = False,
    ) -> None:
        self.dims = dims
        self.max_frame_bytes = max_frame_bytes
        self.source = source
        self.runs = runs
        self._buf = bytearray()
        self._skip = 0
        self._lost: FramingLost | None = None
        self.replies = False

    @property
    def pending_bytes(self) -> int:
        """Bytes held for a frame that has not arrived completely."""
        return len(self._buf)

    def lone_frame(self, data: bytes) -> bool:
        """Whether `data` is exactly one whole binary frame that starts where the stream
        stands and does not ask for replies: what `feed` would decode by itself, with no
        state to carry, so it may be decoded together with other connections' frames
        (`stream.protocol.runs.message_runs`) instead."""
        if self._buf or self._skip or self._lost is not None or len(data) < FRAME_HEADER_BYTES:
            return False
        magic, length = _PREFIX.unpack_from(data)
        return magic == MAGIC_FRAME and 8 + length == len(data) and not data[10] & FRAME_REPLY

    def feed(self, data: Buffer, received_ns: int) -> list[Frame | FrameRejected | FrameRun]:
        """Consume the next bytes of the stream.

        **Arguments:**

        - `data`: the bytes just received (any length, including 0).
        - `received_ns`: their receipt time, copied into each completed `Frame`.

        **Returns:**

        Every frame completed by `data`, in order: a `Frame`, or the `FrameRejected` it
        earned (returned, not raised); with `runs`, also `FrameRun`s of good frames.

        **Raises:**

        `FramingLost` (reason `bad_magic` or `bad_length`) when the stream can no longer be
        split into frames: a wrong magic, a length field below 32 or inconsistent with the
        header. What the same call completed before the break travels with it, as its
        `frames`, to be handed over; every later call raises it again (with no frames).
        The connection must be closed.
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
        out: list[Frame | FrameRejected | FrameRun] = []
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
                if src[pos + 10] & FRAME_REPLY:
                    self.replies = True
            if end - pos < 8 + length:
                break
            if end - pos >= MIN_RUN * (8 + length):
                run, pos_after = decode_run(
                    src,
                    pos,
                    end,
                    self.dims,
                    max_frame_bytes=self.max_frame_bytes,
                    received_ns=received_ns,
                    source=self.source,
                    as_run=self.runs,
                )
                if run:
                    out += run
                    pos = pos_after
                    continue
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
            lost = _clean(self._lost)
            lost.frames = out  # type: ignore[attr-defined]
            raise lost
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
