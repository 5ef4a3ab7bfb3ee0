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
confirmation at once (`_Publisher`: the confirmations come to one inbox); one not
confirmed within `PUBLISH_TIMEOUT_S` (the server restarting, say), or refused (a full
stream), is published again with the same id after a backoff.
"""

from __future__ import annotations

import collections
import itertools
import logging
import struct
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..buffers import WeightedBuffer
from ..events import PipelineEvents
from ..jetstream import MOMENT_SUBJECT_PREFIX, NatsSettings, connect, ensure_stream
from ..protocol import MOMENT_HEADER_BYTES, MomentBatch
from .base import Chunk

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
            await ensure_stream(
                nc.jetstream(),
                self.stream,
                [MOMENT_SUBJECT_PREFIX + ">"],
                self.connection,
                check_duplicate_window=True,
            )
            publisher = await _Publisher.open(nc)
            task_status.started()
            await self._publish_all(publisher)
        finally:
            with anyio.move_on_after(2, shield=True):
                await nc.close()

    async def _publish_all(self, publisher: _Publisher) -> None:
        """Publish batch after batch, at most `in_flight` moments unconfirmed; a confirmer
        takes the confirmations batch by batch, in order."""
        window: collections.deque[tuple[int, _Batch]] = collections.deque()
        published = anyio.Event()  # a batch joined the window
        confirmed = anyio.Event()  # a batch left it
        async with anyio.create_task_group() as tg:

            async def confirm() -> None:
                nonlocal published, confirmed
                while True:
                    while not window:
                        await published.wait()
                        published = anyio.Event()
                    number, batch = window[0]
                    await self._confirm(publisher, batch)
                    window.popleft()
                    self._unconfirmed -= batch.size
                    self._confirmed = number
                    self._progress.set()
                    self._progress = anyio.Event()
                    confirmed.set()
                    confirmed = anyio.Event()

            tg.start_soon(confirm)
            while True:
                try:
                    number, moments = self._buffer.get_nowait()
                except anyio.WouldBlock:
                    await self._buffer.wait_readable()
                    continue
                batch = _Batch(split_records(moments.encode_binary()))
                while window and self._unconfirmed + batch.size > self.in_flight:
                    await confirmed.wait()
                await publisher.publish(batch, batch.moments)
                self._unconfirmed += batch.size
                window.append((number, batch))
                published.set()

    async def _confirm(self, publisher: _Publisher, batch: _Batch) -> None:
        """Wait until every moment of `batch` is stored, publishing again (same id) what
        failed or was not confirmed in time."""
        wait = RETRY_WAIT_S
        while True:
            with anyio.move_on_after(PUBLISH_TIMEOUT_S):
                await batch.answered.wait()
            failed = batch.failed + publisher.forget(batch)
            stored, duplicates = batch.stored, batch.duplicates
            batch.stored = batch.duplicates = 0
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
            await publisher.publish(batch, failed)


class _Batch:
    """One batch of moments on its way: `(stream id, seq, record)` each, and what the
    server answered so far."""

    def __init__(self, moments: list[tuple[str, int, bytes]]) -> None:
        self.moments = moments
        self.size = len(moments)
        self.waiting = 0  # published, not answered
        self.stored = self.duplicates = 0
        self.failed: list[tuple[str, int, bytes]] = []
        self.answered = anyio.Event()


class _Publisher:
    """Publishes to JetStream with confirmations through one subscription: each message
    carries a reply subject `<inbox>.<n>`, to which the server answers with its
    acknowledgement (stored, duplicate, or an error). nats-py's `publish_async` costs a
    random token and a future per message, ~2x the CPU."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.count = itertools.count()
        self.waiting: dict[str, tuple[_Batch, tuple[str, int, bytes]]] = {}

    @classmethod
    async def open(cls, nc: Any) -> _Publisher:
        publisher = cls(nc)
        await nc.subscribe(publisher.inbox + ".*", cb=publisher._answered)
        return publisher

    async def publish(self, batch: _Batch, moments: list[tuple[str, int, bytes]]) -> None:
        import nats.errors

        batch.failed = []
        batch.answered = anyio.Event()
        for moment in moments:
            stream_id, seq, record = moment
            token = str(next(self.count))
            try:
                await self.nc.publish(
                    MOMENT_SUBJECT_PREFIX + stream_id,
                    record,
                    reply=f"{self.inbox}.{token}",
                    headers={MSG_ID: f"{stream_id}:{seq}"},
                )
            except (nats.errors.Error, OSError) as e:  # disconnected: published again later
                log.debug("nats publish: %s", e)
                batch.failed.append(moment)
                continue
            self.waiting[token] = (batch, moment)
            batch.waiting += 1
        if not batch.waiting:
            batch.answered.set()

    def forget(self, batch: _Batch) -> list[tuple[str, int, bytes]]:
        """The moments of `batch` still unanswered, no longer awaited (a late answer is
        ignored; a moment published again is stored once all the same)."""
        late = [token for token, (owner, _) in self.waiting.items() if owner is batch]
        batch.waiting = 0
        return [self.waiting.pop(token)[1] for token in late]

    async def _answered(self, message: Any) -> None:
        entry = self.waiting.pop(message.subject.rpartition(".")[2], None)
        if entry is None:
            return
        batch, moment = entry
        data = message.data
        if b'"error"' in data or not data:  # e.g. the stream is full (discard new)
            batch.failed.append(moment)
        elif b'"duplicate":true' in data:
            batch.duplicates += 1
        else:
            batch.stored += 1
        batch.waiting -= 1
        if not batch.waiting:
            batch.answered.set()
