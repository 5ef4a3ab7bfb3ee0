"""JSON-lines sinks: a file (`JsonlSink`) or standard output (`StdoutSink`).

`offer()` appends the moment's JSON line to a bounded buffer (full: dropped, counted
`slow_sink`); `run()` writes whatever has gathered as one batch in a worker thread and
flushes it, so the event loop never waits on the disk, and batches grow by themselves
when the disk is slow. On cancellation the rest of the buffer is written (shielded).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import sys
from pathlib import Path
from typing import BinaryIO

import anyio
from anyio.abc import TaskStatus

from ..protocol import Moment
from .base import SLOW_SINK, WRITE_ERROR, EncodingCache, OnDropped, OnEmitted

__all__ = ["JsonlSink", "StdoutSink"]

log = logging.getLogger(__name__)


class _LineSink:
    """A bounded buffer of JSON lines drained into a binary file by a worker thread."""

    name = ""

    def __init__(
        self,
        *,
        buffer: int,
        on_emitted: OnEmitted,
        on_dropped: OnDropped,
        cache: EncodingCache | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer={buffer}, expected >= 1")
        self.buffer = buffer
        self._on_emitted = on_emitted
        self._on_dropped = on_dropped
        self._cache = cache or EncodingCache()
        self._queue: collections.deque[bytes] = collections.deque()
        self._ready = anyio.Event()

    def offer(self, moment: Moment) -> None:
        """Queue `moment`'s JSON line; never blocks (a full buffer drops it, counted)."""
        if len(self._queue) >= self.buffer:
            self._on_dropped(self.name, SLOW_SINK)
            return
        self._queue.append(self._cache.get(moment, "json"))
        self._ready.set()

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
                if not self._queue:
                    self._ready = anyio.Event()
                    await self._ready.wait()
                    continue
                await self._write_batch(file)
        finally:
            with anyio.CancelScope(shield=True):
                if self._queue:
                    await self._write_batch(file)
                try:
                    await anyio.to_thread.run_sync(self._close, file)
                except OSError:
                    log.warning("%s sink: close failed", self.name, exc_info=True)

    async def _write_batch(self, file: BinaryIO) -> None:
        # The lines leave the queue only once written: a cancellation before the thread
        # starts leaves them for the shielded cleanup (once started, the thread finishes).
        n = len(self._queue)
        data = b"".join(itertools.islice(self._queue, n))
        try:
            await anyio.to_thread.run_sync(_write_and_flush, file, data)
        except OSError:
            log.warning("%s sink: write failed, %d moments lost", self.name, n, exc_info=True)
            outcome = functools.partial(self._on_dropped, self.name, WRITE_ERROR)
        else:
            outcome = functools.partial(self._on_emitted, self.name)
        for _ in range(n):
            self._queue.popleft()
            outcome()


def _write_and_flush(file: BinaryIO, data: bytes) -> None:
    file.write(data)
    file.flush()


class JsonlSink(_LineSink):
    """Appends one JSON line per moment to a file (`name` `"jsonl"`).

    **Arguments:**

    - `path`: the file; it and its parent directories are created if missing.
    - `buffer`: moments buffered, >= 1.
    - `on_emitted(sink_name)`, `on_dropped(sink_name, reason)`: counters.
    - `cache`: shared with other sinks to encode each moment once per format.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        *,
        buffer: int,
        on_emitted: OnEmitted,
        on_dropped: OnDropped,
        cache: EncodingCache | None = None,
    ) -> None:
        super().__init__(buffer=buffer, on_emitted=on_emitted, on_dropped=on_dropped, cache=cache)
        self.path = Path(path)

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("ab")

    def _close(self, file: BinaryIO) -> None:
        file.close()


class StdoutSink(_LineSink):
    """Writes one JSON line per moment to standard output (`name` `"stdout"`).

    **Arguments:**

    - `buffer`, `on_emitted`, `on_dropped`, `cache`: as for `JsonlSink`.
    - `output`: a binary file to write to instead of `sys.stdout.buffer` (left open).
    """

    name = "stdout"

    def __init__(
        self,
        *,
        buffer: int,
        on_emitted: OnEmitted,
        on_dropped: OnDropped,
        cache: EncodingCache | None = None,
        output: BinaryIO | None = None,
    ) -> None:
        super().__init__(buffer=buffer, on_emitted=on_emitted, on_dropped=on_dropped, cache=cache)
        self._output = output

    def _open(self) -> BinaryIO:
        return self._output if self._output is not None else sys.stdout.buffer

    def _close(self, file: BinaryIO) -> None:
        file.flush()
