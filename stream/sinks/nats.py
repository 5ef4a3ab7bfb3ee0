"""Moments published to NATS JetStream, each exactly once in the moments stream.

Each moment goes to `moments.<stream id>` as its binary record (docs/protocol.md), with
the header `Nats-Msg-Id: <stream id>:<seq>`: a moment re-emitted after a crash (its frame
redelivered and applied again from the restored state) carries the id of the one already
stored, and the server drops it (counted, `enactive_sink_duplicates_total`) as long as it
comes within the stream's duplicate window.

Unlike the other sinks this one is **reliable**: it never drops. The integrator waits
for room in its buffer before offering a batch (`wait_room`), so a slow or absent server
slows the pipeline — and, through it, the sources — instead of growing memory; and the
executor writes a checkpoint only once every moment of the batches the checkpoint
covers is confirmed by the server (`published`). That is the order that makes a crash
lose nothing: a frame's effect is in a checkpoint only if its moment is stored, and its
message is acknowledged only once that checkpoint is durable.

Publishing is asynchronous and bounded: up to `in_flight` moments await the server's
confirmation at once; one not confirmed within `PUBLISH_TIMEOUT_S` (the server
restarting, say) is published again with the same id.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import struct
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from ..buffers import WeightedBuffer
from ..events import PipelineEvents
from ..jetstream import MOMENT_SUBJECT_PREFIX, NatsSettings, connect, ensure_stream
from ..protocol import MOMENT_HEADER_BYTES, MomentBatch
from .base import Chunk

if TYPE_CHECKING:
    import asyncio

    from nats.js import JetStreamContext

__all__ = ["NatsMomentSink", "split_records"]

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
"""How long a moment waits for the server's confirmation before it is published again."""
RETRY_WAIT_S = 0.1
"""The first pause before publishing again what the server did not store; doubled up to
`MAX_RETRY_WAIT_S` while it keeps failing."""
MAX_RETRY_WAIT_S = 2.0
MSG_ID = "Nats-Msg-Id"
_LENGTH = struct.Struct("<I")
_ID_LENGTH = struct.Struct("<H")
_SEQ = struct.Struct("<Q")


def split_records(data: bytes) -> list[tuple[str, int, bytes]]:
    """Binary moment records back to back → `(stream id, seq, record)` each."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        (length,) = _LENGTH.unpack_from(data, pos + 4)
        (id_length,) = _ID_LENGTH.unpack_from(data, pos + 12)
        (seq,) = _SEQ.unpack_from(data, pos + 24)
        stop = pos + 8 + length
        start = pos + MOMENT_HEADER_BYTES
        out.append((data[start : start + id_length].decode(), seq, data[pos:stop]))
        pos = stop
    return out


class NatsMomentSink:
    """The NATS JetStream moments sink (`name` `"nats"`).

    **Arguments:**

    - `connection`: how to connect; `stream`: the moments stream (created if absent).
    - `buffer`: moments waiting to be published, >= 1 (the integrator waits beyond it).
    - `in_flight`: moments published and not yet confirmed, at most.
    - `events`: told `emitted`, `sink_duplicates`.
    """

    name = "nats"
    reliable = True

    def __init__(
        self,
        connection: NatsSettings,
        *,
        stream: str,
        buffer: int,
        in_flight: int,
        events: PipelineEvents,
    ) -> None:
        self.connection = connection
        self.stream = stream
        self.in_flight = in_flight
        self._events = events
        self._buffer: WeightedBuffer[tuple[int, MomentBatch]] = WeightedBuffer(buffer)
        self._offered = 0  # batches offered so far
        self._confirmed = 0  # batches whose every moment the server confirmed, in order
        self._progress = anyio.Event()
        self._unconfirmed = 0  # moments published, not yet confirmed
        self.duplicates = 0
        self.published_moments = 0

    @property
    def queued(self) -> int:
        return self._buffer.weight + self._unconfirmed

    @property
    def buffers(self) -> tuple[WeightedBuffer[Chunk], ...]:
        return ()

    async def wait_room(self, n: int) -> None:
        """Return once a batch of `n` moments fits (one larger than the whole buffer fits
        an empty one)."""
        while not self._buffer.fits(n):
            await self._buffer.wait_room()

    def offer(self, batch: MomentBatch) -> None:
        """Queue `batch` (after `wait_room`: it fits)."""
        self._offered += 1
        self._buffer.push((self._offered, batch), len(batch))

    def offered(self) -> int:
        """Batches offered so far (what a checkpoint taken now covers)."""
        return self._offered

    async def published(self, batches: int) -> None:
        """Return once every moment of the first `batches` batches offered is stored."""
        while self._confirmed < batches:
            await self._progress.wait()

    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        nc = await connect(self.connection, name="enactive-stream moments")
        try:
            # (nats-py's own window never binds: ours is `in_flight`, retries come on top)
            js = nc.jetstream(publish_async_max_pending=2 * self.in_flight + 1)
            await ensure_stream(
                js,
                self.stream,
                [MOMENT_SUBJECT_PREFIX + ">"],
                self.connection,
                check_duplicate_window=True,
            )
            task_status.started()
            await self._publish_all(js)
        finally:
            with anyio.move_on_after(2, shield=True):
                await nc.close()

    async def _publish_all(self, js: JetStreamContext) -> None:
        """Publish batch after batch, at most `in_flight` moments unconfirmed; a confirmer
        takes the confirmations batch by batch, in order."""
        window: collections.deque[tuple[int, list[_Moment]]] = collections.deque()
        published = anyio.Event()  # a batch joined the window
        confirmed = anyio.Event()  # a batch left it
        async with anyio.create_task_group() as tg:

            async def confirm() -> None:
                nonlocal published, confirmed
                while True:
                    while not window:
                        await published.wait()
                        published = anyio.Event()
                    number, moments = window[0]
                    await self._confirm(js, moments)
                    window.popleft()
                    self._unconfirmed -= len(moments)
                    self._confirmed = number
                    self._progress.set()
                    self._progress = anyio.Event()
                    confirmed.set()
                    confirmed = anyio.Event()

            tg.start_soon(confirm)
            while True:
                try:
                    number, batch = self._buffer.get_nowait()
                except anyio.WouldBlock:
                    await self._buffer.wait_readable()
                    continue
                moments = [_Moment(*m) for m in split_records(batch.encode_binary())]
                while window and self._unconfirmed + len(moments) > self.in_flight:
                    await confirmed.wait()
                for moment in moments:
                    moment.future = await self._send(js, moment)
                self._unconfirmed += len(moments)
                window.append((number, moments))
                published.set()

    async def _send(self, js: JetStreamContext, moment: _Moment) -> asyncio.Future[Any] | None:
        """Publish one moment; its confirmation's future (None: the publish failed)."""
        import nats.errors

        try:
            return await js.publish_async(
                MOMENT_SUBJECT_PREFIX + moment.stream_id,
                moment.record,
                wait_stall=PUBLISH_TIMEOUT_S,
                headers={MSG_ID: f"{moment.stream_id}:{moment.seq}"},
            )
        except (nats.errors.Error, OSError) as e:
            log.debug("nats publish: %s", e)
            return None

    async def _confirm(self, js: JetStreamContext, moments: list[_Moment]) -> None:
        """Wait for every moment's confirmation, publishing again (same id) what failed
        or was not confirmed in time, until all are stored."""
        import asyncio

        todo, wait = moments, RETRY_WAIT_S
        while True:
            futures = [m.future for m in todo if m.future is not None]
            if futures:
                await asyncio.wait(futures, timeout=PUBLISH_TIMEOUT_S)
            failed, stored, duplicates = [], 0, 0
            for moment in todo:
                future = moment.future
                if future is None or not future.done() or future.exception() is not None:
                    if future is not None:
                        future.cancel()  # (its slot in nats-py's window is released)
                    failed.append(moment)
                elif getattr(future.result(), "duplicate", False):
                    duplicates += 1
                else:
                    stored += 1
            if stored:
                self.published_moments += stored
                self._events.emitted(self.name, stored)
            if duplicates:
                self.duplicates += duplicates
                self._events.sink_duplicates(self.name, duplicates)
            if not failed:
                return
            log.debug("nats: %d moments not stored; publishing them again", len(failed))
            await anyio.sleep(wait)
            wait = min(wait * 2, MAX_RETRY_WAIT_S)
            for moment in failed:
                moment.future = await self._send(js, moment)
            todo = failed


@dataclasses.dataclass(slots=True)
class _Moment:
    """One moment on its way: its id, its record, the future of its confirmation."""

    stream_id: str
    seq: int
    record: bytes
    future: asyncio.Future[Any] | None = None
