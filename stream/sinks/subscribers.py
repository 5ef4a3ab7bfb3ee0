"""TCP moment subscribers (default 127.0.0.1:7401).

A client connects and sends one line, `SUB <binary|json> <glob>\\n`; from then on it
receives the moments of the streams whose id matches the glob (`fnmatch` rules, case
sensitive; `*` for all): binary records back to back, or JSON lines. A missing or bad
line is answered `ERR <why>\\n` and the connection closed.

Each subscriber has its own `WeightedBuffer` (weight = moments, overflow `drop_newest`)
filled by `offer()` with the encoded rows of each batch it matches, and drained by its
writer task, so a slow subscriber only loses its own moments (counted `slow_subscriber`);
one whose buffer stays full for `stall_timeout` seconds, or whose socket fails, is cut off
(counted `disconnected`, once).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections.abc import Callable
from typing import cast

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from ..buffers import WeightedBuffer
from ..events import PipelineEvents
from ..net import accept_forever, listen_tcp
from ..protocol import MomentBatch
from .base import DISCONNECTED, SLOW_SUBSCRIBER, Chunk, EncodingCache, Format, encode

__all__ = ["SubscriberServer"]

log = logging.getLogger(__name__)

MAX_SUB_LINE = 1024
"""The longest accepted `SUB` line, in bytes."""
WRITE_BYTES = 1 << 18
"""Encoded batches are joined into socket writes of about this size: large enough to be
few, small enough that the kernel takes each at once (asyncio copies what it does not)."""
FLUSH_S = 1.0
"""How long a subscriber may take to receive what it holds at shutdown."""
_MEMO_LIMIT = 1 << 16  # per-subscriber memo of stream-id matches


class _Subscriber:
    def __init__(self, fmt: Format, glob: str, buffer: WeightedBuffer[Chunk]) -> None:
        self.fmt = fmt
        self.glob = glob
        self.buffer = buffer
        self.everything = glob == "*"
        self.full_since: float | None = None
        self.scope = anyio.CancelScope()
        self.cut_off = False
        self._match = re.compile(fnmatch.translate(glob)).match
        self._memo: dict[str, bool] = {}

    def matches(self, stream_id: str) -> bool:
        hit = self._memo.get(stream_id)
        if hit is None:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            hit = self._memo[stream_id] = self._match(stream_id) is not None
        return hit

    def rows(self, batch: MomentBatch) -> list[int] | None:
        """The rows of `batch` this subscriber wants: None for all of them."""
        if self.everything:
            return None
        matches = self.matches
        wanted = [i for i, stream_id in enumerate(batch.stream_ids) if matches(stream_id)]
        return None if len(wanted) == len(batch) else wanted


class SubscriberServer:
    """The TCP moment-subscriber sink (`name` `"tcp"`).

    **Arguments:**

    - `address`: `(host, port)` to listen on; port 0 picks a free port.
    - `buffer`: moments buffered per subscriber, >= 1.
    - `events`: told `emitted(name, n)` and `sink_dropped(name, reason, n)`.
    - `on_subscribers(n)`: called with the number of subscribers whenever it changes.
    - `cache`: shared with other sinks to encode each moment once per format.
    - `handshake_timeout`: seconds a client has to send its `SUB` line.
    - `stall_timeout`: seconds a subscriber's buffer may stay full before it is cut off.
    - `clock`: seconds, for `stall_timeout`.
    """

    name = "tcp"

    def __init__(
        self,
        address: tuple[str, int] = ("127.0.0.1", 7401),
        *,
        buffer: int,
        events: PipelineEvents,
        on_subscribers: Callable[[int], None] = lambda n: None,
        cache: EncodingCache | None = None,
        handshake_timeout: float = 10.0,
        stall_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer={buffer}, expected >= 1")
        self.address = address
        self.buffer = buffer
        self._events = events
        self._on_subscribers = on_subscribers
        self._cache = cache or EncodingCache()
        self._handshake_timeout = handshake_timeout
        self._stall_timeout = stall_timeout
        self._clock = clock
        self._subscribers: list[_Subscriber] = []

    @property
    def subscribers(self) -> int:
        """Subscribers connected now."""
        return len(self._subscribers)

    @property
    def queued(self) -> int:
        """Moments held now, summed over subscribers."""
        return sum(sub.buffer.weight for sub in self._subscribers)

    @property
    def buffers(self) -> tuple[WeightedBuffer[Chunk], ...]:
        """Each subscriber's buffer now."""
        return tuple(sub.buffer for sub in self._subscribers)

    def offer(self, batch: MomentBatch) -> None:
        """Queue `batch`'s matching moments for every subscriber; never blocks."""
        now: float | None = None
        for sub in self._subscribers:
            rows = sub.rows(batch)
            n = len(batch) if rows is None else len(rows)
            if n == 0:
                continue
            chunk = Chunk()
            if sub.buffer.put_nowait(chunk, n):
                chunk.data = (
                    self._cache.get(batch, sub.fmt)
                    if rows is None
                    else encode(batch, sub.fmt, rows)
                )
                continue
            # Dropped, and counted `slow_subscriber` by the buffer's `on_drop`.
            if now is None:
                now = self._clock()
            if sub.full_since is None:
                sub.full_since = now
            elif now - sub.full_since > self._stall_timeout:
                self._cut_off(sub)

    def _cut_off(self, sub: _Subscriber) -> None:
        if not sub.cut_off:
            sub.cut_off = True
            self._events.sink_dropped(self.name, DISCONNECTED, 1)
            sub.scope.cancel()

    def _slow(self, chunk: Chunk, n: int) -> None:
        self._events.sink_dropped(self.name, SLOW_SUBSCRIBER, n)

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve subscribers until cancelled; `started(port)` with the bound port."""
        host, port = self.address
        listener = await listen_tcp("output.tcp", host, port)
        async with listener, anyio.create_task_group() as tg:
            for each in listener.listeners:
                tg.start_soon(
                    accept_forever, cast(SocketListener, each), tg, self._serve, "subscriber"
                )
            task_status.started(listener.extra(SocketAttribute.local_port))

    async def _serve(self, stream: SocketStream) -> None:
        async with stream:
            receive = BufferedByteReceiveStream(stream)
            wanted, error = await self._handshake(receive)
            if wanted is None:
                with anyio.move_on_after(1.0):
                    try:
                        await stream.send(f"ERR {error}\n".encode())
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                return
            fmt, glob = wanted
            buffer = WeightedBuffer[Chunk](self.buffer, overflow="drop_newest", on_drop=self._slow)
            sub = _Subscriber(fmt, glob, buffer)
            self._subscribers.append(sub)
            self._on_subscribers(len(self._subscribers))
            try:
                with sub.scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._watch_hangup, receive, tg.cancel_scope)
                        await self._write(stream, sub)
            finally:
                self._subscribers.remove(sub)
                self._on_subscribers(len(self._subscribers))

    async def _handshake(
        self, receive: BufferedByteReceiveStream
    ) -> tuple[tuple[Format, str] | None, str]:
        try:
            with anyio.fail_after(self._handshake_timeout):
                line = await receive.receive_until(b"\n", MAX_SUB_LINE)
        except TimeoutError:
            return None, f"no SUB line within {self._handshake_timeout:g} s"
        except anyio.DelimiterNotFound:
            return None, f"SUB line longer than {MAX_SUB_LINE} bytes"
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            return None, "connection closed before a SUB line"
        return _parse_sub(line)

    async def _watch_hangup(
        self, receive: BufferedByteReceiveStream, scope: anyio.CancelScope
    ) -> None:
        # Nothing is expected after the SUB line; end the subscription at end of stream.
        try:
            while True:
                await receive.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        scope.cancel()

    async def _write(self, stream: SocketStream, sub: _Subscriber) -> None:
        try:
            while True:
                await sub.buffer.wait_readable()
                await self._send_some(stream, sub)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._cut_off(sub)
        except anyio.get_cancelled_exc_class():
            if not sub.cut_off:  # shutting down or hung up: deliver what is held
                with anyio.move_on_after(FLUSH_S, shield=True):
                    try:
                        while len(sub.buffer):
                            await self._send_some(stream, sub)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
            raise

    async def _send_some(self, stream: SocketStream, sub: _Subscriber) -> None:
        # Past this check `send()` writes before it can be cancelled, so nothing taken off
        # the queue is lost to a cancellation, nor sent twice by the shutdown flush.
        await anyio.lowlevel.checkpoint_if_cancelled()
        held = sub.buffer.peek_all()
        count, size = 1, len(held[0][0].data)
        while count < len(held) and size + len(held[count][0].data) <= WRITE_BYTES:
            size += len(held[count][0].data)
            count += 1
        sub.buffer.take(count)
        sub.full_since = None
        taken = held[:count]
        await stream.send(b"".join(chunk.data for chunk, _ in taken))
        self._events.emitted(self.name, sum(n for _, n in taken))


def _parse_sub(line: bytes) -> tuple[tuple[Format, str] | None, str]:
    """`((format, glob), "")` for a `SUB <binary|json> <glob>` line, or `(None, why)`."""
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "SUB line is not UTF-8"
    parts = text.split()
    if len(parts) != 3 or parts[0] != "SUB":
        return None, f"expected 'SUB <binary|json> <glob>', got {text[:80]!r}"
    _, fmt, glob = parts
    if fmt not in ("binary", "json"):
        return None, f"format {fmt[:20]!r}, expected 'binary' or 'json'"
    return (cast(Format, fmt), glob), ""
