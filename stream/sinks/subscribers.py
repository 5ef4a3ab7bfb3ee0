"""TCP moment subscribers (default 127.0.0.1:7401).

A client connects and sends one line, `SUB <binary|json> <glob>\\n`; from then on it
receives the moments of the streams whose id matches the glob (`fnmatch` rules, case
sensitive; `*` for all): binary records back to back, or JSON lines. A missing or bad
line is answered `ERR <why>\\n` and the connection closed; so is a connection over the
listener's limits (`ERR too many subscribers`; counted in `limited("output.tcp", ...)`:
`max_connections`, `max_per_address`, and `header_timeout` for no `SUB` line in time).

With a TLS context the listener speaks TLS (a failed handshake is closed and counted
`tls_handshake`; over the connection limits a TLS client is closed without a word). With
identities (`stream.security`) a subscriber authenticates before its `SUB` line: by its
client certificate's CN, or by a first line `AUTH <token>\\n` (`AuthLine`, as the sensor
ingest); a bad or missing one, or an identity that may read nothing, is answered
`ERR unauthorized` and closed (counted `unauthorized`). Both lines must arrive within the
handshake timeout. A subscriber then receives only the moments of stream ids that match
its glob and start with one of its identity's `read` prefixes.

Subscribers with the same (glob, read prefixes) share its `Glob` (`routing`), and those
with the same format there form a group: `offer()` finds each distinct glob's rows in one
pass over the batch and encodes each group's selection once, for all its subscribers.

Each subscriber has its own `WeightedBuffer` (weight = moments, overflow `drop_newest`)
drained by its writer task, so a slow subscriber only loses its own moments (counted
`slow_subscriber`); one whose buffer stays full for `stall_timeout` seconds, or whose
socket fails, is cut off (counted `disconnected`, once). Beside the moments, the bytes it
holds (queued, and being written) are bounded by `max_pending_bytes`: a subscriber that
would go over is a slow consumer and is cut off at once (NATS's `max_pending`), its socket
reset so the kernel drops what it held. The kernel's send buffer of each subscriber
socket is capped (`SO_SNDBUF`), so unread moments cannot pile up there either.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import cast

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from ..buffers import WeightedBuffer
from ..events import PipelineEvents
from ..net import (
    NO_LIMITS,
    ConnectionGate,
    ConnectionLimits,
    accept_forever,
    listen_tcp,
    peer_address,
)
from ..protocol import MomentBatch
from ..security import AuthLine, Identities, accept_tls, peer_identity
from .base import DISCONNECTED, SLOW_SUBSCRIBER, Chunk, EncodingCache, Format, encode
from .routing import Glob, Read, Router

__all__ = ["SubscriberServer"]

log = logging.getLogger(__name__)

LISTENER = "output.tcp"
"""The listener's name in logs and in `enactive_connections_limited_total{listener}`."""
MAX_SUB_LINE = 1024
"""The longest accepted `SUB` line, in bytes."""
WRITE_BYTES = 1 << 18
"""Encoded batches are joined into socket writes of about this size: large enough to be
few, small enough that the kernel takes each at once (asyncio copies what it does not)."""
FLUSH_S = 1.0
"""How long a subscriber may take to receive what it holds at shutdown."""
REFUSE_S = 1.0
"""How long a refused client has to read its `ERR` line and close."""
TOO_MANY = "too many subscribers"
UNAUTHORIZED = "unauthorized"
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError)


class _Group:
    """The subscribers of one (format, glob): each batch's selection is encoded once."""

    __slots__ = ("fmt", "glob", "subscribers")

    def __init__(self, fmt: Format, glob: Glob[_Group]) -> None:
        self.fmt = fmt
        self.glob = glob
        self.subscribers: list[_Subscriber] = []


class _Subscriber:
    __slots__ = ("buffer", "cut_off", "full_since", "group", "pending_bytes", "scope")

    def __init__(self, group: _Group, buffer: WeightedBuffer[Chunk]) -> None:
        self.group = group
        self.buffer = buffer
        self.pending_bytes = 0  # queued in `buffer`, or being written
        self.full_since: float | None = None
        self.scope = anyio.CancelScope()
        self.cut_off = False


class SubscriberServer:
    """The TCP moment-subscriber sink (`name` `"tcp"`).

    **Arguments:**

    - `address`: `(host, port)` to listen on; port 0 picks a free port.
    - `buffer`: moments buffered per subscriber, >= 1.
    - `events`: told `emitted(name, n)`, `sink_dropped(name, reason, n)` and
        `limited("output.tcp", reason)`.
    - `on_subscribers(n)`: called with the number of subscribers whenever it changes.
    - `cache`: shared with other sinks to encode each moment once per format.
    - `limits`: subscribers at most, in all (`max_connections`) and per client address
        (`max_per_address`); 0: no limit. The timeouts there are not used.
    - `max_pending_bytes`: bytes held per subscriber at most (queued and being written),
        >= 1; a subscriber that would go over is cut off. One batch larger than this still
        goes to a subscriber that holds nothing.
    - `socket_buffer_bytes`: `SO_SNDBUF` of each subscriber socket (the kernel doubles
        it, capped by `net.core.wmem_max`); 0: the kernel's default.
    - `tls`: serve TLS with this context (`stream.security.server_context`); None: plain.
    - `identities`: require each subscriber to authenticate as one of these, and send it
        only the stream ids its `read` prefixes allow; None: anyone may read everything.
    - `handshake_timeout`: seconds a client has to complete its TLS handshake, and
        seconds it has to send its `AUTH` and `SUB` lines.
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
        limits: ConnectionLimits = NO_LIMITS,
        max_pending_bytes: int = 8 << 20,
        socket_buffer_bytes: int = 256 << 10,
        tls: ssl.SSLContext | None = None,
        identities: Identities | None = None,
        handshake_timeout: float = 10.0,
        stall_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer={buffer}, expected >= 1")
        if max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes={max_pending_bytes}, expected >= 1")
        if socket_buffer_bytes < 0:
            raise ValueError(f"socket_buffer_bytes={socket_buffer_bytes}, expected >= 0")
        self.address = address
        self.buffer = buffer
        self.max_pending_bytes = max_pending_bytes
        self.socket_buffer_bytes = socket_buffer_bytes
        self._events = events
        self._on_subscribers = on_subscribers
        self._cache = cache or EncodingCache()
        self._gate = ConnectionGate(limits)
        self._tls = tls
        self._identities = identities
        self._handshake_timeout = handshake_timeout
        self._stall_timeout = stall_timeout
        self._clock = clock
        self._router = Router[_Group]()
        self._subscribers: list[_Subscriber] = []

    @property
    def subscribers(self) -> int:
        """Subscribers connected now."""
        return len(self._subscribers)

    @property
    def connections(self) -> int:
        """Connections open now: subscribers, and those still to send their `SUB` line."""
        return self._gate.open

    @property
    def queued(self) -> int:
        """Moments held now, summed over subscribers."""
        return sum(sub.buffer.weight for sub in self._subscribers)

    @property
    def queued_bytes(self) -> tuple[int, ...]:
        """The bytes each subscriber holds now (queued, and being written)."""
        return tuple(sub.pending_bytes for sub in self._subscribers)

    @property
    def buffers(self) -> tuple[WeightedBuffer[Chunk], ...]:
        """Each subscriber's buffer now."""
        return tuple(sub.buffer for sub in self._subscribers)

    def offer(self, batch: MomentBatch) -> None:
        """Queue `batch`'s matching moments for every subscriber; never blocks."""
        if not self._subscribers:
            return
        n = len(batch)
        for group in self._router.everything.groups:
            self._deliver(group, batch, None, n)
        for glob, rows in self._router.route(batch.stream_ids).items():
            whole = len(rows) == n
            for group in glob.groups:
                self._deliver(group, batch, None if whole else rows, len(rows))

    def _deliver(self, group: _Group, batch: MomentBatch, rows: list[int] | None, n: int) -> None:
        # `rows` of `batch` (None: all, n of them) to each subscriber of `group`, encoded
        # once, and only if one of them takes it.
        chunk: Chunk | None = None
        for sub in group.subscribers:
            if sub.cut_off:
                continue
            if not sub.buffer.fits(n):
                sub.buffer.put_nowait(_DROPPED, n)  # counted `slow_subscriber` by `on_drop`
                self._stalled(sub)
                continue
            if chunk is None:
                chunk = Chunk()
                chunk.data = (
                    self._cache.get(batch, group.fmt)
                    if rows is None
                    else encode(batch, group.fmt, rows)
                )
            size = len(chunk.data)
            if sub.pending_bytes and sub.pending_bytes + size > self.max_pending_bytes:
                self._events.sink_dropped(self.name, SLOW_SUBSCRIBER, n)
                self._cut_off(sub)  # a slow consumer
                continue
            sub.buffer.put_nowait(chunk, n)
            sub.pending_bytes += size

    def _stalled(self, sub: _Subscriber) -> None:
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

    def _accept_failed(self, error: Exception) -> None:
        self._events.limited(LISTENER, "accept_error")

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve subscribers until cancelled; `started(port)` with the bound port."""
        host, port = self.address
        listener = await listen_tcp(LISTENER, host, port)
        async with listener, anyio.create_task_group() as tg:
            for each in listener.listeners:
                tg.start_soon(
                    functools.partial(accept_forever, on_error=self._accept_failed),
                    cast(SocketListener, each),
                    tg,
                    self._serve,
                    "subscriber",
                )
            task_status.started(listener.extra(SocketAttribute.local_port))

    async def _serve(self, stream: SocketStream) -> None:
        peer = peer_address(stream)
        refused = self._gate.enter(peer)
        if refused is not None:
            self._events.limited(LISTENER, refused)
            if self._tls is not None:  # (no TLS session to say it in)
                await anyio.aclose_forcefully(stream)
                return
            async with stream:
                await _refuse(stream, TOO_MANY)
            return
        try:
            secured: ByteStream = stream
            if self._tls is not None:
                tls = None
                with anyio.move_on_after(self._handshake_timeout):
                    tls = await accept_tls(stream, self._tls)
                if tls is None:
                    self._events.limited(LISTENER, "tls_handshake")
                    await anyio.aclose_forcefully(stream)
                    return
                secured = tls
            async with secured:
                await self._subscribe(secured)
        except Exception:  # a subscriber's failure is its own, never the server's
            log.warning("subscriber connection failed", exc_info=True)
        finally:
            self._gate.leave(peer)

    async def _subscribe(self, stream: ByteStream) -> None:
        _set_send_buffer(stream, self.socket_buffer_bytes)
        receive = BufferedByteReceiveStream(stream)
        wanted, error = await self._handshake(stream, receive)
        if wanted is None:
            await _refuse(stream, error)
            return
        sub = self._join(*wanted)
        try:
            with sub.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_hangup, receive, tg.cancel_scope)
                    await self._write(stream, sub)
        finally:
            self._leave(sub)
            if sub.cut_off:  # reset: the kernel drops what it still holds for it
                _set_linger_zero(stream)

    def _join(self, fmt: Format, pattern: str, read: Read) -> _Subscriber:
        glob = self._router.use(pattern, read)
        group = next((g for g in glob.groups if g.fmt == fmt), None)
        if group is None:
            group = _Group(fmt, glob)
            glob.groups.append(group)
        buffer = WeightedBuffer[Chunk](self.buffer, overflow="drop_newest", on_drop=self._slow)
        sub = _Subscriber(group, buffer)
        group.subscribers.append(sub)
        self._subscribers.append(sub)
        self._on_subscribers(len(self._subscribers))
        return sub

    def _leave(self, sub: _Subscriber) -> None:
        group = sub.group
        group.subscribers.remove(sub)
        if not group.subscribers:
            group.glob.groups.remove(group)
        self._router.release(group.glob)
        self._subscribers.remove(sub)
        self._on_subscribers(len(self._subscribers))

    async def _handshake(
        self, stream: ByteStream, receive: BufferedByteReceiveStream
    ) -> tuple[tuple[Format, str, Read] | None, str]:
        # `(format, glob, read prefixes)` of an authenticated `SUB` line, or (None, why).
        read: Read = None
        try:
            with anyio.fail_after(self._handshake_timeout):
                line = await receive.receive_until(b"\n", MAX_SUB_LINE)
                if self._identities is not None:
                    certified = None
                    if self._tls is not None:
                        certified = peer_identity(stream, self._identities)
                    outcome = AuthLine(self._identities, certified).feed(line + b"\n")
                    identity, rest = outcome or (None, b"")
                    if identity is None or not identity.read:
                        self._events.limited(LISTENER, "unauthorized")
                        log.debug("subscriber refused: unauthorized")
                        return None, UNAUTHORIZED
                    read = identity.reads
                    if not rest:  # that was the AUTH line: the SUB line follows
                        line = await receive.receive_until(b"\n", MAX_SUB_LINE)
        except TimeoutError:
            self._events.limited(LISTENER, "header_timeout")
            return None, f"no SUB line within {self._handshake_timeout:g} s"
        except anyio.DelimiterNotFound:
            return None, f"SUB line longer than {MAX_SUB_LINE} bytes"
        except (anyio.IncompleteRead, *_GONE):
            return None, "connection closed before a SUB line"
        wanted, why = _parse_sub(line)
        return (None, why) if wanted is None else ((*wanted, read), "")

    async def _watch_hangup(
        self, receive: BufferedByteReceiveStream, scope: anyio.CancelScope
    ) -> None:
        # Nothing is expected after the SUB line; end the subscription at end of stream.
        try:
            while True:
                await receive.receive()
        except _GONE:
            pass
        scope.cancel()

    async def _write(self, stream: ByteStream, sub: _Subscriber) -> None:
        try:
            while True:
                await sub.buffer.wait_readable()
                await self._send_some(stream, sub)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError):
            self._cut_off(sub)
        except anyio.get_cancelled_exc_class():
            if not sub.cut_off:  # shutting down or hung up: deliver what is held
                with anyio.move_on_after(FLUSH_S, shield=True):
                    try:
                        while len(sub.buffer):
                            await self._send_some(stream, sub)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError):
                        pass
            raise

    async def _send_some(self, stream: ByteStream, sub: _Subscriber) -> None:
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
        try:
            await stream.send(b"".join(chunk.data for chunk, _ in taken))
        finally:
            sub.pending_bytes -= size
        self._events.emitted(self.name, sum(n for _, n in taken))


_DROPPED = Chunk()
"""What a full buffer is offered (and drops) instead of an encoding nobody will read."""


async def _refuse(stream: ByteStream, why: str) -> None:
    """Answer `ERR <why>`, then wait (at most `REFUSE_S`) for the client to close, so that
    closing does not reset the connection before the client has read the answer."""
    with anyio.move_on_after(REFUSE_S):
        try:
            await stream.send(f"ERR {why}\n".encode())
            if isinstance(stream, SocketStream):  # (TLS cannot half-close)
                await stream.send_eof()
            for _ in range(MAX_SUB_LINE):  # whatever it sends meanwhile, up to a bound
                await stream.receive()
        except _GONE:
            pass


def _set_send_buffer(stream: ByteStream, size: int) -> None:
    if size:
        try:
            sock = stream.extra(SocketAttribute.raw_socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            log.debug("could not set SO_SNDBUF=%d on a subscriber socket", size, exc_info=True)


def _set_linger_zero(stream: ByteStream) -> None:
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        log.debug("could not set SO_LINGER on a subscriber socket", exc_info=True)


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
