"""JSON-lines sinks: a file (`JsonlSink`) or standard output (`StdoutSink`).

`offer()` appends a batch's JSON lines to a `WeightedBuffer` (weight = moments, overflow
`drop_newest`: when full the batch is dropped, counted `slow_sink`); `run()` writes whatever
has gathered in one go in a worker thread and flushes it, so the event loop never waits on
the disk, and writes grow by themselves when the disk is slow. On cancellation the rest of
the buffer is written (shielded).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import BinaryIO

import anyio
from anyio.abc import TaskStatus

from ..buffers import WeightedBuffer
from ..events import PipelineEvents
from ..protocol import MomentBatch
from .base import SLOW_SINK, WRITE_ERROR, Chunk, EncodingCache

__all__ = ["JsonlSink", "StdoutSink"]

log = logging.getLogger(__name__)


class _LineSink:
    """A bounded buffer of JSON lines drained into a binary file by a worker thread."""

    name = ""

    def __init__(
        self,
        *,
        buffer: int,
        events: PipelineEvents,
        cache: EncodingCache | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer={buffer}, expected >= 1")
        self.buffer = buffer
        self._events = events
        self._cache = cache or EncodingCache()
        self._buffer = WeightedBuffer[Chunk](buffer, overflow="drop_newest", on_drop=self._slow)

    @property
    def queued(self) -> int:
        """Moments held now."""
        return self._buffer.weight

    @property
    def buffers(self) -> tuple[WeightedBuffer[Chunk], ...]:
        """The one buffer."""
        return (self._buffer,)

    def offer(self, batch: MomentBatch) -> None:
        """Queue `batch`'s JSON lines; never blocks (a full buffer drops them, counted)."""
        chunk = Chunk()
        if self._buffer.put_nowait(chunk, len(batch)):
            chunk.data = self._cache.get(batch, "json")

    def _slow(self, chunk: Chunk, n: int) -> None:
        self._events.sink_dropped(self.name, SLOW_SINK, n)

    def _open(self) -> BinaryIO:
        raise NotImplementedError

    def _close(self, file: BinaryIO) -> None:
        raise NotImplementedError

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write moments until cancelled; `started()` once the output is open."""
        file = await anyio.to_thread.run_sync(self._open)
        try:
            task_status.started()
            while True:
                await self._buffer.wait_readable()
                await self._write_batch(file)
        finally:
            with anyio.CancelScope(shield=True):
                if len(self._buffer):
                    await self._write_batch(file)
                try:
                    await anyio.to_thread.run_sync(self._close, file)
                except OSError:
                    log.warning("%s sink: close failed", self.name, exc_info=True)

    async def _write_batch(self, file: BinaryIO) -> None:
        # The lines leave the buffer only once written: a cancellation before the thread
        # starts leaves them for the shielded cleanup (once started, the thread finishes).
        held = self._buffer.peek_all()
        data = b"".join(chunk.data for chunk, _ in held)
        n = sum(count for _, count in held)
        try:
            await anyio.to_thread.run_sync(_write_and_flush, file, data)
        except OSError:
            log.warning("%s sink: write failed, %d moments lost", self.name, n, exc_info=True)
            self._events.sink_dropped(self.name, WRITE_ERROR, n)
        else:
            self._events.emitted(self.name, n)
        self._buffer.take(len(held))


def _write_and_flush(file: BinaryIO, data: bytes) -> None:
    file.write(data)
    file.flush()


class JsonlSink(_LineSink):
    """Appends one JSON line per moment to a file (`name` `"jsonl"`).

    **Arguments:**

    - `path`: the file; it and its parent directories are created if missing.
    - `buffer`: moments buffered, >= 1.
    - `events`: told `emitted(name, n)` and `sink_dropped(name, reason, n)`.
    - `cache`: shared with other sinks to encode each moment once per format.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        *,
        buffer: int,
        events: PipelineEvents,
        cache: EncodingCache | None = None,
    ) -> None:
        super().__init__(buffer=buffer, events=events, cache=cache)
        self.path = Path(path)

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("ab")

    def _close(self, file: BinaryIO) -> None:
        file.close()


class StdoutSink(_LineSink):
    """Writes one JSON line per moment to standard output (`name` `"stdout"`).

    **Arguments:**

    - `buffer`, `events`, `cache`: as for `JsonlSink`.
    - `output`: a binary file to write to instead of `sys.stdout.buffer` (left open).
    """

    name = "stdout"

    def __init__(
        self,
        *,
        buffer: int,
        events: PipelineEvents,
        cache: EncodingCache | None = None,
        output: BinaryIO | None = None,
    ) -> None:
        super().__init__(buffer=buffer, events=events, cache=cache)
        self._output = output

    def _open(self) -> BinaryIO:
        return self._output if self._output is not None else sys.stdout.buffer

    def _close(self, file: BinaryIO) -> None:
        file.flush()
