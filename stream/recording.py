"""The recording file: every frame the daemon accepted, in the order it stepped them.

Format v1 (docs/recording.md has the byte tables), append-only, little-endian:

```
 header (32 bytes)     magic "ENREC", format version, header length, dims D P T M,
                       creation wall time
 record, record, …     u32 body length B | u32 CRC-32 of the body | body:
                         u64 receipt time (wall clock, ns) + the frame (binary protocol v1)
```

A record is one accepted frame as a sensor could have sent it: `stream.protocol.encode_frame`
of its stream id, seq, timestamp, present modalities and payload, with `FRAME_START` when it
started a session of its stream (`FRAME_REPLY` clear). Sending the frames back in file order
gives a fresh daemon the same frames in the same per-stream order (`stream.replay`).

A crash mid-write leaves a record cut short at the end: `RecordingReader` stops at the
first record that is cut short or fails its CRC and says how many bytes it ignored and why.
`Recorder.open` on an existing file checks its header against the daemon's dims, cuts such
a tail away and appends after the last whole record.

`Recorder` is the daemon's writer: the executor awaits `record(batch)` before stepping each
batch; a bounded queue of batches (`RECORD_QUEUE` of them) feeds a writer that encodes and
appends them in a worker thread, one write per round of whatever is queued. When the queue
is full, `record` waits, and so the pipeline slows down rather than leave a frame out.
Durability: each round is written to the kernel at once (a SIGKILL loses nothing written);
`fsync` at most every `FSYNC_INTERVAL_S` while frames flow, and at close (a power cut loses
at most that much).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, NamedTuple

import anyio
import numpy as np

from .batcher import Batch
from .protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_HEADER_BYTES,
    MOTOR,
    PROPRIO,
    SENSORY,
    SESSION_START,
    TACTILE,
    Dims,
    encode_frame,
)

__all__ = [
    "FORMAT_VERSION",
    "FSYNC_INTERVAL_S",
    "HEADER_BYTES",
    "MAGIC",
    "RECORD_QUEUE",
    "Record",
    "Recorder",
    "RecordingError",
    "RecordingHeader",
    "RecordingReader",
    "encode_batch",
]

log = logging.getLogger(__name__)

MAGIC = b"ENREC"
FORMAT_VERSION = 1
HEADER_BYTES = 32
RECORD_QUEUE = 64
"""Batches queued for the writer at most; beyond that `Recorder.record` waits."""
FSYNC_INTERVAL_S = 1.0
"""Seconds at most between two `fsync`s of the file while frames are being recorded."""

# magic, (pad), version, header length, reserved, D, P, T, M, (reserved), created_ns
_HEADER = struct.Struct("<5sxHHHHHHH4xQ")
_PREFIX = struct.Struct("<II")  # body length, CRC-32 of the body
_RECEIVED = struct.Struct("<Q")
MAX_BODY_BYTES = _RECEIVED.size + 8 + (64 << 20)
"""The largest record body a reader accepts: the receipt time and the largest frame any
configuration takes (`ingest.max_frame_bytes` ≤ 64 MiB, plus its 8-byte prefix)."""
_MIN_BODY = _RECEIVED.size + FRAME_HEADER_BYTES + 4  # the shortest frame: a 1-byte id, padded
_BITS = (SENSORY, PROPRIO, TACTILE, MOTOR)
assert _HEADER.size == HEADER_BYTES
assert MAX_BODY_BYTES >= _RECEIVED.size + 8 + DEFAULT_MAX_FRAME_BYTES


class RecordingError(Exception):
    """A file is not a recording this version reads, or cannot be recorded to."""


@dataclasses.dataclass(frozen=True, slots=True)
class RecordingHeader:
    """A recording's header: its format `version`, the `dims` its frames were accepted
    with, and `created_ns`, when the file was created (wall clock, ns since the epoch)."""

    version: int
    dims: Dims
    created_ns: int

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, HEADER_BYTES, 0, *self.dims, self.created_ns)


class Record(NamedTuple):
    """One recorded frame: its `offset` in the file, `received_ns` (when the recording
    daemon received it; wall clock, ns since the epoch) and `frame`, its bytes in the
    binary protocol v1 (`stream.protocol.decode_frame` reads them)."""

    offset: int
    received_ns: int
    frame: bytes


def encode_batch(batch: Batch, dims: Dims, *, clock_offset_ns: int = 0) -> bytes:
    """The records of a batch's frames, in row order.

    **Arguments:**

    - `batch`: accepted frames as columns (`stream.batcher.Batch`): their payloads are
        float32 rows of `dims.total` values, zero where a modality is absent.
    - `dims`: the modality sizes the frames were accepted with.
    - `clock_offset_ns`: added to each row's `received_ns` (`time.monotonic_ns()`) to make
        it wall-clock time.

    **Returns:**

    The records' bytes, back to back.
    """
    n = len(batch)
    if n == 0:
        return b""
    payload = np.concatenate(batch.payloads).reshape(n, dims.total)
    bounds = list(itertools.pairwise(itertools.accumulate(dims, initial=0)))
    present = batch.present.tolist()
    received = (batch.received_ns + clock_offset_ns).tolist()
    out: list[bytes] = []
    for i, (stream_id, seq, timestamp) in enumerate(
        zip(batch.stream_ids, batch.seq, batch.timestamp.tolist(), strict=True)
    ):
        bits = present[i]
        sensory, proprio, tactile, motor = (
            payload[i, a:b] if bits & bit else None
            for bit, (a, b) in zip(_BITS, bounds, strict=True)
        )
        frame = encode_frame(
            stream_id,
            seq,
            timestamp,
            sensory=sensory,
            proprio=proprio,
            tactile=tactile,
            motor=motor,
            start=bool(bits & SESSION_START),
        )
        body = _RECEIVED.pack(received[i]) + frame
        out.append(_PREFIX.pack(len(body), zlib.crc32(body)))
        out.append(body)
    return b"".join(out)


def _read_header(file: IO[bytes], path: str) -> RecordingHeader:
    """The header at the start of `file` (left positioned after it)."""
    file.seek(0)
    raw = file.read(HEADER_BYTES)
    if not (raw.startswith(MAGIC) or MAGIC.startswith(raw)):
        raise RecordingError(
            f"{path}: not a recording: it starts with {raw[:8]!r}, expected {MAGIC!r}"
        )
    if len(raw) < HEADER_BYTES:
        raise RecordingError(
            f"{path}: not a recording: {len(raw)} bytes, shorter than the "
            f"{HEADER_BYTES}-byte header"
        )
    _, version, header_bytes, _, *dims, created_ns = _HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise RecordingError(
            f"{path}: recording format version {version}; this enactive-stream reads "
            f"version {FORMAT_VERSION} (a newer one wrote it?)"
        )
    if header_bytes != HEADER_BYTES:
        raise RecordingError(
            f"{path}: header length {header_bytes}, expected {HEADER_BYTES} in version 1"
        )
    return RecordingHeader(version, Dims(*dims), created_ns)


class RecordingReader:
    """Reads a recording: `header`, then its records in order (iterate over it, once).

    Reading stops at the first record that is cut short (a crash mid-write: `cut_short`),
    has an impossible length or fails its CRC; then `problem` says why, `end` is the
    offset just past the last good record and `ignored` is how many bytes follow it (0,
    and `problem` empty, for a whole file). `records` counts those read. All are final
    once the iteration is over.

    **Arguments:**

    - `path`: the file.

    **Raises:**

    `OSError` when it cannot be opened; `RecordingError` (one line naming the file) when
    its header is not a v1 recording's.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self.header = _read_header(self._file, self.path)
            self.size = os.fstat(self._file.fileno()).st_size
        except BaseException:
            self._file.close()
            raise
        self.end = HEADER_BYTES
        self.ignored = 0
        self.problem = ""
        self.cut_short = False
        self.records = 0

    def __iter__(self) -> Iterator[Record]:
        file, offset = self._file, self.end
        file.seek(offset)
        while True:
            prefix = file.read(_PREFIX.size)
            if not prefix:
                break
            if len(prefix) < _PREFIX.size:
                self._stop(offset, f"the record at offset {offset} is cut short", cut=True)
                return
            length, crc = _PREFIX.unpack(prefix)
            if not _MIN_BODY <= length <= MAX_BODY_BYTES:
                self._stop(offset, f"the record at offset {offset} has length {length}")
                return
            body = file.read(length)
            if len(body) < length:
                self._stop(offset, f"the record at offset {offset} is cut short", cut=True)
                return
            if zlib.crc32(body) != crc:
                self._stop(offset, f"the record at offset {offset} fails its CRC")
                return
            (received_ns,) = _RECEIVED.unpack_from(body)
            yield Record(offset, received_ns, body[_RECEIVED.size :])
            offset += _PREFIX.size + length
            self.end = offset
            self.records += 1
        self.end, self.ignored, self.problem, self.cut_short = offset, 0, "", False

    def _stop(self, offset: int, problem: str, *, cut: bool = False) -> None:
        self.end = offset
        self.ignored = self.size - offset
        self.problem = problem
        self.cut_short = cut

    def tail(self) -> str:
        """One line on what was ignored at the end ("" when nothing was)."""
        if not self.ignored:
            return ""
        return f"{self.path}: ignored the last {self.ignored} bytes: {self.problem}"

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Recorder:
    """Appends every batch the executor steps to a recording file.

    Open it with `Recorder.open`; while `async with recorder.writing():` runs, the
    executor awaits `record(batch)` before stepping each batch.

    - `path`, `dims`, `header`: the file, the daemon's modality sizes, the file's header.
    - `frames`, `size`: frames in the file (those appended before included) and its size
        in bytes, as of the last write.
    - `on_written(frames, size)`: called after each write (from the writer thread).
    """

    def __init__(
        self,
        file: IO[bytes],
        path: str,
        dims: Dims,
        header: RecordingHeader,
        *,
        frames: int,
        queue: int = RECORD_QUEUE,
        fsync_interval_s: float = FSYNC_INTERVAL_S,
        on_written: Callable[[int, int], None] | None = None,
    ) -> None:
        self.path = path
        self.dims = dims
        self.header = header
        self.frames = frames
        self.size = file.seek(0, os.SEEK_END)
        self._file = file
        self._fsync_interval_s = fsync_interval_s
        self._on_written = on_written
        self._clock_offset_ns = time.time_ns() - time.monotonic_ns()
        self._synced = time.monotonic()
        self._send, self._receive = anyio.create_memory_object_stream[Batch](queue)
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        dims: Dims,
        *,
        queue: int = RECORD_QUEUE,
        fsync_interval_s: float = FSYNC_INTERVAL_S,
        on_written: Callable[[int, int], None] | None = None,
    ) -> Recorder:
        """Create the recording, or open an existing one to append to it (blocking).

        An existing file must be a v1 recording of the same `dims`; a tail cut short by a
        crash (or zero bytes after the last whole record) is cut away first, with a
        warning. The file is locked (`flock`) while the recorder has it open.

        **Raises:**

        `RecordingError` (one line naming the file) for a file that is not a recording,
        one of other dims, one damaged before its end, or one another process records
        to; `OSError` when the file cannot be created or opened.
        """
        name = os.fspath(path)
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
        file = open(fd, "r+b", buffering=0)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RecordingError(f"{name}: another process is recording to it") from None
            if os.fstat(fd).st_size == 0:
                header = RecordingHeader(FORMAT_VERSION, dims, time.time_ns())
                file.write(header.encode())
                os.fsync(fd)
                _sync_directory(name)
                frames = 0
            else:
                header, frames = _prepare_append(file, name, dims)
            return cls(
                file,
                name,
                dims,
                header,
                frames=frames,
                queue=queue,
                fsync_interval_s=fsync_interval_s,
                on_written=on_written,
            )
        except BaseException:
            file.close()
            raise

    async def record(self, batch: Batch) -> None:
        """Queue `batch` (every row an accepted frame, in the order they are stepped) to
        be appended; wait while the queue is full. The batch is kept as it is, not
        copied: batches are never changed once the batcher has handed them out."""
        try:
            self._send.send_nowait(batch)
        except anyio.WouldBlock:
            await self._send.send(batch)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[Recorder]:
        """Run the writer while the body runs. On the way out, what is queued is written,
        the file is `fsync`ed and closed (shielded); a write that fails raises
        `RecordingError` out of the body."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drain)
                try:
                    yield self
                finally:
                    self._send.close()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.close, limiter=self._limiter)

    async def _drain(self) -> None:
        async with self._receive:
            while True:
                try:
                    batches = [await self._receive.receive()]
                except anyio.EndOfStream:
                    return
                while True:  # one write for everything queued meanwhile
                    try:
                        batches.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await anyio.to_thread.run_sync(self._write, batches, limiter=self._limiter)

    def _write(self, batches: list[Batch]) -> None:
        """In the writer thread: encode and append `batches`, fsync when one is due."""
        offset = self._clock_offset_ns
        data = b"".join(encode_batch(b, self.dims, clock_offset_ns=offset) for b in batches)
        view = memoryview(data)
        try:
            while view:
                view = view[self._file.write(view) :]
            if time.monotonic() - self._synced >= self._fsync_interval_s:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()
        except OSError as e:
            raise RecordingError(f"{self.path}: cannot write: {e.strerror or e}") from None
        self.frames += sum(len(b) for b in batches)
        self.size += len(data)
        if self._on_written is not None:
            self._on_written(sum(len(b) for b in batches), self.size)

    def close(self) -> None:
        """`fsync` and close the file (what `writing` does on its way out)."""
        self._send.close()
        self._receive.close()
        if self._file.closed:
            return
        try:
            os.fsync(self._file.fileno())
        except OSError as e:
            raise RecordingError(f"{self.path}: cannot fsync: {e.strerror or e}") from None
        finally:
            self._file.close()


def _prepare_append(file: IO[bytes], path: str, dims: Dims) -> tuple[RecordingHeader, int]:
    """Check an existing recording before appending to it: the header, the dims, every
    record; cut away a tail a crash left. Returns the header and the records kept."""
    with RecordingReader(path) as reader:
        header = reader.header
        if header.dims != dims:
            raise RecordingError(
                f"{path}: recorded with dims (D, P, T, M) = {tuple(header.dims)}, the "
                f"daemon has {tuple(dims)}: record to another file"
            )
        for _ in reader:
            pass
    if reader.ignored:
        if not (reader.cut_short or _zeros(file, reader.end)):
            raise RecordingError(
                f"{path}: damaged at offset {reader.end} ({reader.problem}), with "
                f"{reader.ignored} bytes after it; not appending to it (replay reads it up "
                "to the damage): record to another file"
            )
        log.warning(
            "%s: cut away the last %d bytes (%s), left by a crash; appending after the "
            "%d whole records",
            path,
            reader.ignored,
            reader.problem,
            reader.records,
        )
        file.truncate(reader.end)
        os.fsync(file.fileno())
    file.seek(0, os.SEEK_END)
    return header, reader.records


def _zeros(file: IO[bytes], offset: int) -> bool:
    """Whether `file` holds nothing but zero bytes from `offset` on (what a crash can
    leave when the file grew but its data never reached the disk)."""
    file.seek(offset)
    while chunk := file.read(1 << 20):
        if chunk.strip(b"\0"):
            return False
    return True


def _sync_directory(path: str) -> None:
    """`fsync` the directory holding `path`, so that a new file's entry is durable."""
    with contextlib.suppress(OSError):
        fd = os.open(Path(path).resolve().parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
