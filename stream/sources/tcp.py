"""TCP ingest: many connections, each a byte stream of frames (overload policy `block`).

The first byte of a connection decides its language: `{` means JSON lines (source label
`json`), anything else binary frames back to back (source label `tcp`). A connection's
frames go into the ingest in order; while the pipeline is full the connection stops
reading, so TCP flow control slows its sender down.

Every rejected frame is counted — at decoding, or at admission (a stale or repeated seq)
— and answered on its connection (`stream.protocol.replies`): a JSON connection always
gets one JSON line per rejection, `{"error": reason, "detail": ..., "stream": ...,
"seq": ...}`; a binary connection gets one binary `ESR1` record per rejection once a frame
with the header flag `FRAME_REPLY` arrived (a sender that never reads is never answered).
Replies are written by a separate task from a bounded queue. When the queue is full the
reader waits for room at most `REPLY_WAIT_S`; after such a wait runs out, replies are
skipped until the queue has drained, so a client that never reads its replies only
loses replies. A binary connection is closed when its framing is lost. After the sender
half-closes, the connection answers what it read, then closes: a sender that reads until
then has every reply. Nothing one connection does affects another, and no connection
error reaches the server.

With a TLS context the listener speaks TLS (a failed handshake is counted as
`tls_handshake`). With identities (`stream.security`), a connection must authenticate
before its first frame: by its client certificate's CN, or by a first line
`AUTH <token>` (its `A` is neither `{` nor a binary frame's `E`; the language rule above
holds for what follows); otherwise it is told `ERR unauthorized` and closed (counted as
`unauthorized`). Its frames of stream ids outside the identity's `write` prefixes are
rejected as `forbidden`, counted and answered like every rejection.

How connections are read. A plain connection is not a task: its socket sits in one
selector that a single poller task reads, at most once per `poll_interval_s` (1 ms by
default), taking what every ready connection has in that pass. A fleet of sensors each
sending a frame now and then so costs one wake-up per pass, not one per frame (and no task
switch, no per-read registration with the event loop). The poller decodes, checks and
hands over without waiting; the moment a connection needs to wait — the pipeline is full,
a reply must be written, its framing was lost, its credentials were refused — it leaves
the selector for a task of its own that carries on with the same state over an anyio
stream, and stays there. When a pass reads one whole binary frame from each of several
connections (a fleet sending a frame per send), those frames are decoded together as
runs of like frames — one numpy pass and one admission per run, received at the pass's
start — rather than connection by connection (`_Poller.hand_over_lone_frames`). TLS
connections are such tasks from the start. The wire logic (authentication, language,
decoding, permissions, counting) is one sans-I/O object, `_Wire`, shared by both.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import math
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..buffers import Overflow, WeightedBuffer
from ..ingest import Ingest, Item, frames_in
from ..net import ACCEPT_RETRY_S, NO_LIMITS, ConnectionGate, ConnectionLimits, listen_tcp
from ..protocol import (
    Frame,
    FrameReader,
    FrameRejected,
    FrameRun,
    FramingLost,
    LineReader,
    encode_error_line,
    encode_reply,
)
from ..protocol.runs import message_runs
from ..security import (
    AUTH_TIMEOUT_S,
    UNAUTHORIZED_REPLY,
    AuthLine,
    Identities,
    Identity,
    accept_tls,
    peer_identity,
)

__all__ = ["POLL_INTERVAL_S", "TcpSource", "serve_tcp"]

log = logging.getLogger(__name__)


READ_BYTES = 1 << 18
"""The most bytes taken from a connection's socket per read."""
POLL_INTERVAL_S = 0.001
"""The default shortest time between two passes of the poller over ready connections."""
REPLY_QUEUE = 256
"""Error replies waiting to be written to a client."""
REPLY_WAIT_S = 1.0
"""How long the reader waits for room in a full reply queue before skipping replies."""
LISTENER = "ingest.tcp"
"""The listener's name in logs and in `enactive_connections_limited_total{listener}`."""
REPLY_DRAIN_S = 0.5
"""How long a closing connection may spend writing its last replies."""


class TcpSource:
    """The TCP sensor listener as a `Source` (labels `tcp` and `json`, policy `block`;
    nothing to acknowledge)."""

    name = "tcp"
    labels: tuple[str, ...] = ("tcp", "json")
    overflow: Overflow = "block"

    def __init__(
        self,
        address: tuple[str, int],
        *,
        limits: ConnectionLimits = NO_LIMITS,
        tls: ssl.SSLContext | None = None,
        identities: Identities | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.address = address
        self.limits = limits
        self.tls = tls
        self.identities = identities
        self.poll_interval_s = poll_interval_s
        self.port: int | None = None  # once bound

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self.port = await tg.start(
                lambda task_status: serve_tcp(
                    ingest,
                    self.address,
                    limits=self.limits,
                    tls=self.tls,
                    identities=self.identities,
                    poll_interval_s=self.poll_interval_s,
                    task_status=task_status,
                )
            )
            task_status.started(self.port)

    def commit(self, positions: Sequence[object]) -> None:
        pass


async def serve_tcp(
    ingest: Ingest,
    address: tuple[str, int],
    *,
    limits: ConnectionLimits = NO_LIMITS,
    tls: ssl.SSLContext | None = None,
    identities: Identities | None = None,
    poll_interval_s: float = POLL_INTERVAL_S,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sensor connections on `address` and feed their frames into `ingest`.

    Runs until cancelled. Once `ingest.accepting` turns false it stops accepting and
    each connection stops reading after the frame in hand, then closes.

    **Arguments:**

    - `ingest`: the pipeline's doorway.
    - `address`: `(host, port)` to listen on; port 0 picks a free port.
    - `limits`: connections at most (in all, per client address), idle and frame
        timeouts; what they refuse or close is counted (`PipelineEvents.limited`).
    - `tls`: serve TLS with this context (`stream.security.server_context`); None: plain.
    - `identities`: require each connection to authenticate as one of these, and accept
        only the stream ids its `write` prefixes allow; None: anyone may write anything.
    - `poll_interval_s`: the shortest time between two passes over the plain
        connections that have data (0: a pass as soon as one has).
    - `task_status`: `started(port)` with the bound port once listening.
    """
    host, port = address
    listener = await listen_tcp(LISTENER, host, port)
    selector = selectors.DefaultSelector()
    try:
        async with anyio.create_task_group() as tg:
            server = _Server(ingest, limits, tls, identities, tg)
            poller = server.poller = _Poller(server, selector, poll_interval_s)
            try:
                async with anyio.create_task_group() as serving:
                    for each in listener.listeners:
                        listening = each.extra(SocketAttribute.raw_socket)
                        serving.start_soon(server.accept_forever, listening)
                    serving.start_soon(poller.run)
                    serving.start_soon(poller.sweep)
                    task_status.started(listener.extra(SocketAttribute.local_port))
                    await ingest.stopped.wait()
                    serving.cancel_scope.cancel()  # no more accepting, no more polling
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
                server.stop()
    finally:
        selector.close()


class _Server:
    """What the connections of one listener share: the ingest, the limits and the gate,
    the task group their tasks run in, the poller, and who is connected."""

    def __init__(
        self,
        ingest: Ingest,
        limits: ConnectionLimits,
        tls: ssl.SSLContext | None,
        identities: Identities | None,
        tg: TaskGroup,
    ) -> None:
        self.ingest = ingest
        self.limits = limits
        self.tls = tls
        self.identities = identities
        self.tg = tg
        self.gate = ConnectionGate(limits)
        self.poller: _Poller
        self.tasks: set[_Connection] = set()
        self.handshakes: set[anyio.CancelScope] = set()

    def wire(self, certified: Identity | None = None) -> _Wire:
        return _Wire(self.ingest, self.identities, certified)

    async def accept_forever(self, listening: socket.socket) -> None:
        """Accept connections until cancelled. A failed accept (out of descriptors, say)
        is counted as `accept_error` and retried after `ACCEPT_RETRY_S`; it never stops
        the listener."""
        while True:
            await anyio.wait_readable(listening)
            try:
                sock, remote = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                log.warning("TCP accept failed; retrying: %s", e)
                self.ingest.events.limited(LISTENER, "accept_error")
                await anyio.sleep(ACCEPT_RETRY_S)
                continue
            self.admit(sock, str(remote[0]) if isinstance(remote, tuple) else "")

    def admit(self, sock: socket.socket, peer: str) -> None:
        refused = self.gate.enter(peer)
        if refused is not None:
            self.ingest.events.limited(LISTENER, refused)
            sock.close()
            return
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies go at once
        if self.tls is None:
            self.poller.add(_Polled(self, sock, peer))
        else:
            self.tg.start_soon(self._serve_tls, sock, peer)

    async def _serve_tls(self, sock: socket.socket, peer: str) -> None:
        try:
            stream = await SocketStream.from_socket(sock)
            assert self.tls is not None
            with anyio.CancelScope() as handshake:
                self.handshakes.add(handshake)
                secured = await accept_tls(stream, self.tls) if self.ingest.accepting else None
            self.handshakes.discard(handshake)
            if secured is None:
                if not handshake.cancel_called and self.ingest.accepting:
                    self.ingest.events.limited(LISTENER, "tls_handshake")
                await anyio.aclose_forcefully(stream)
                return
            certified = None
            if self.identities is not None:
                certified = peer_identity(secured, self.identities)
            await self.serve(_Connection(secured, self, self.wire(certified)), _Resume())
        finally:
            self.gate.leave(peer)

    async def serve(self, connection: _Connection, resume: _Resume) -> None:
        self.tasks.add(connection)
        try:
            await connection.run(resume)
        except Exception:  # a connection's failure is its own, never the server's
            log.warning("TCP connection failed", exc_info=True)
        finally:
            self.tasks.discard(connection)

    def stop(self) -> None:
        """The daemon stops accepting: polled connections close (they hold nothing), the
        others finish the frames in hand, then end."""
        self.poller.close_all()
        for handshake in list(self.handshakes):
            handshake.cancel()
        for connection in list(self.tasks):
            connection.stop_reading()


@dataclasses.dataclass(slots=True)
class _Decoded:
    """What one read came to: `items` to hand over in order; `lost`, the framing error
    that ends the connection after them; `refused`: the credentials were refused."""

    items: Sequence[Item | FrameRejected]
    lost: FramingLost | None = None
    refused: bool = False


class _Wire:
    """Sans I/O: one sensor connection's authentication, language, decoding,
    permissions and counting — and handing its items over without waiting."""

    def __init__(
        self, ingest: Ingest, identities: Identities | None, certified: Identity | None = None
    ) -> None:
        self.ingest = ingest
        self.auth = AuthLine(identities, certified) if identities is not None else None
        self.identity: Identity | None = None  # a restricted identity, once authenticated
        self.reader: FrameReader | LineReader | None = None
        self.label = "tcp"
        self.encode: Callable[[FrameRejected], bytes] = encode_reply

    @property
    def authenticating(self) -> bool:
        return self.auth is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes of a frame (or line) begun but not complete."""
        return self.reader.pending_bytes if self.reader is not None else 0

    @property
    def replies(self) -> bool:
        """Whether the sender reads replies (JSON: always; binary: once it said so)."""
        reader = self.reader
        return isinstance(reader, LineReader) or (reader is not None and reader.replies)

    def lone_frame(self, data: bytes) -> bool:
        """Whether `data` is one whole binary frame that may be decoded together with
        other connections' frames: nothing of the connection's state would change but the
        counts, no reply is ever owed (the sender does not read them), and no permission
        applies (`FrameReader.lone_frame`)."""
        reader = self.reader
        return (
            type(reader) is FrameReader
            and self.identity is None
            and not reader.replies
            and reader.lone_frame(data)
        )

    def decode(self, data: bytes) -> _Decoded:
        """Everything one read of `data` completes, counted as received (and the framing
        error, as rejected)."""
        if self.auth is not None:
            outcome = self.auth.feed(data)
            if outcome is None:
                return _Decoded(())
            self.auth = None
            identity, data = outcome
            if identity is None:
                self.ingest.events.limited(LISTENER, "unauthorized")
                log.debug("TCP connection refused: unauthorized")
                return _Decoded((), refused=True)
            self.identity = None if identity.writes_all else identity
            if not data:
                return _Decoded(())
        reader = self.reader
        if reader is None:
            dims, largest = self.ingest.dims, self.ingest.max_frame_bytes
            if data[:1] == b"{":
                self.label, self.encode = "json", encode_error_line
                reader = self.reader = LineReader(dims, max_frame_bytes=largest, source="json")
            else:
                reader = self.reader = FrameReader(
                    dims, max_frame_bytes=largest, source="tcp", runs=True
                )
        lost = None
        try:
            items: Sequence[Item | FrameRejected] = reader.feed(data, time.monotonic_ns())
        except FramingLost as exc:  # what the read completed before the break comes first
            items, lost = exc.frames, exc
        self.ingest.received(self.label, sum(map(frames_in, items)) + (lost is not None))
        if lost is not None:
            self.ingest.rejected(self.label, lost.reason)
            log.debug("TCP framing lost, closing the connection: %s", lost)
        if self.identity is not None:
            items = _permitted(items, self.identity)
        return _Decoded(items, lost)

    def hand_over_nowait(self, items: Sequence[Item | FrameRejected], replies: list[bytes]) -> int:
        """Hand `items` over, in order, while the pipeline has room; the rejections to
        answer are appended to `replies` (encoded). **Returns** how many were handed over."""
        ingest, answer = self.ingest, self.replies
        for i, item in enumerate(items):
            if isinstance(item, FrameRejected):
                ingest.rejected(self.label, item.reason)
                rejected: Sequence[FrameRejected] = (item,)
            else:
                taken = ingest.put_nowait(item)
                if taken is None:
                    return i
                rejected = taken
            if answer and rejected:
                replies += map(self.encode, rejected)
        return len(items)


@dataclasses.dataclass(slots=True)
class _Resume:
    """Where a connection taken over by a task of its own stands: `items` not yet handed
    over (the pipeline was full), `replies` not yet written, `lost` (answer it, then
    close), `refused` (say so, then close)."""

    items: Sequence[Item | FrameRejected] = ()
    replies: Sequence[bytes] = ()
    lost: FramingLost | None = None
    refused: bool = False


class _Polled:
    """A plain connection read by the poller. While the pipeline is full it stops
    reading (a task waits for room, then it is read again); the moment it has replies to
    write, lost its framing or was refused, it leaves the poller for a task of its own
    (`_Connection`) for good."""

    def __init__(self, server: _Server, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.wire = server.wire()
        self.opened = self.last_read = time.monotonic()
        self.partial_since: float | None = None  # when a frame begun is still incomplete
        self.paused = False  # waiting for room in the pipeline
        self.waiting: Sequence[Item | FrameRejected] = ()  # what waits for that room

    def readable(self, now: float, lone: list[tuple[_Polled, bytes]]) -> None:
        """Read what the connection has: decode it and hand it over, or, when it is one
        frame alone (`_Wire.lone_frame`), append it to `lone` for the pass to decode."""
        try:
            data = self.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer: the same as its end
            data = b""
        if not data:  # the sender is done; every frame it sent was handed over
            self.close()
            return
        self.last_read = now
        if self.wire.lone_frame(data):
            self.partial_since = None
            lone.append((self, data))
        else:
            self.consume(data, now)

    def consume(self, data: bytes, now: float) -> None:
        """Decode `data` read from the connection and hand what it completes over."""
        decoded = self.wire.decode(data)
        self.partial_since = (self.partial_since or now) if self.wire.pending_bytes else None
        self._hand_over(decoded)

    def _hand_over(self, decoded: _Decoded) -> None:
        replies: list[bytes] = []
        done = self.wire.hand_over_nowait(decoded.items, replies)
        if replies or decoded.lost or decoded.refused:
            self.take_over(_Resume(decoded.items[done:], replies, decoded.lost, decoded.refused))
        elif done < len(decoded.items):  # the pipeline is full: read nothing until it has room
            self.server.poller.pause(self)
            self.waiting = decoded.items[done:]
            self.server.poller.wait_for_room(self)

    def go_on(self) -> bool:
        """Hand over what waits for room while there is some (called by the poller's
        queue of waiting connections); False while the first item still does not fit.
        Once all is handed over it is read again (or, the daemon stopping, closed)."""
        replies: list[bytes] = []
        done = self.wire.hand_over_nowait(self.waiting, replies)
        self.waiting = rest = self.waiting[done:]
        if replies:
            self.take_over(_Resume(rest, replies))
        elif rest and done:  # some went in: the rest may wait for another buffer
            self.server.poller.wait_for_room(self)
        elif rest:
            return False
        elif self.server.ingest.accepting:
            self.server.poller.resume(self)
        else:  # the daemon stopped meanwhile: what it held is handed over, now it ends
            self.close()
        return True

    def take_over(self, resume: _Resume) -> None:
        """Leave the poller for a task of its own, which carries on from `resume`."""
        self.server.poller.remove(self)
        self.server.tg.start_soon(self._run_as_task, resume)

    async def _run_as_task(self, resume: _Resume) -> None:
        server = self.server
        try:
            try:
                stream = await SocketStream.from_socket(self.sock)
            except OSError:
                self.sock.close()
                return
            await server.serve(_Connection(stream, server, self.wire, self.opened), resume)
        finally:
            server.gate.leave(self.peer)

    def expired(self, now: float) -> str | None:
        """Which limit this connection has outlived, if any (none while paused)."""
        limits = self.server.limits
        if self.paused:
            return None
        if self.wire.authenticating and now - self.opened > AUTH_TIMEOUT_S:
            return "unauthorized"
        if limits.idle_timeout_s and now - self.last_read > limits.idle_timeout_s:
            return "idle_timeout"
        since = self.partial_since
        if since is not None and limits.frame_timeout_s and now - since > limits.frame_timeout_s:
            return "frame_timeout"
        return None

    def close(self) -> None:
        self.server.poller.remove(self)
        self.sock.close()
        self.server.gate.leave(self.peer)


class _RoomQueue:
    """Connections waiting, in order, for room in one of the pipeline's buffers. One task
    lets them go on one by one as room appears, so a thousand waiting connections are not
    all woken by every frame taken, and none is passed over for ever."""

    def __init__(self, buffer: WeightedBuffer[Any]) -> None:
        self.buffer = buffer
        self.waiting: collections.deque[_Polled] = collections.deque()
        self.running = False

    def add(self, connection: _Polled, tg: TaskGroup) -> None:
        self.waiting.append(connection)
        if not self.running:
            self.running = True
            tg.start_soon(self._run)

    async def _run(self) -> None:
        try:
            while self.waiting:
                if self.waiting[0].go_on():
                    self.waiting.popleft()
                else:
                    await self.buffer.wait_room()
        except anyio.ClosedResourceError:  # the pipeline is gone: nothing will take them
            while self.waiting:
                self.waiting.popleft().close()
        finally:
            self.running = False


class _Poller:
    """Reads every plain connection that has data, in passes at most `interval_s` apart,
    and closes those past a limit."""

    def __init__(
        self, server: _Server, selector: selectors.DefaultSelector, interval_s: float
    ) -> None:
        self.server = server
        self.interval_s = interval_s
        self.selector = selector
        self.connections: set[_Polled] = set()  # read here (or paused)
        self.queues: dict[WeightedBuffer[Any], _RoomQueue] = {}

    def add(self, connection: _Polled) -> None:
        self.selector.register(connection.sock, selectors.EVENT_READ, connection)
        self.connections.add(connection)

    def pause(self, connection: _Polled) -> None:
        self.selector.unregister(connection.sock)
        connection.paused = True

    def resume(self, connection: _Polled) -> None:
        self.selector.register(connection.sock, selectors.EVENT_READ, connection)
        connection.paused = False

    def wait_for_room(self, connection: _Polled) -> None:
        """Queue a paused connection for room in the buffer its next item goes to."""
        item = connection.waiting[0]
        assert not isinstance(item, FrameRejected)  # (those never wait)
        buffer = self.server.ingest.target(item)
        queue = self.queues.get(buffer)
        if queue is None:
            queue = self.queues[buffer] = _RoomQueue(buffer)
        queue.add(connection, self.server.tg)

    def remove(self, connection: _Polled) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            if not connection.paused:
                self.selector.unregister(connection.sock)

    async def run(self) -> None:
        """Wait until some connection has data, read all that have, then rest for the
        interval, so that frames arriving meanwhile are read together."""
        ready = self.selector.fileno()  # the selector itself is readable then
        while True:
            await anyio.wait_readable(ready)
            now, received_ns = time.monotonic(), time.monotonic_ns()
            lone: list[tuple[_Polled, bytes]] = []
            for key, _ in self.selector.select(0):
                connection: _Polled = key.data
                if connection in self.connections and not connection.paused:
                    connection.readable(now, lone)  # (not handed over earlier in this pass)
            if lone:
                self.hand_over_lone_frames(lone, now, received_ns)
            await anyio.sleep(self.interval_s)

    def hand_over_lone_frames(
        self, lone: list[tuple[_Polled, bytes]], now: float, received_ns: int
    ) -> None:
        """Hand over one frame read alone from each of many connections: runs of like
        frames decoded in one numpy pass and admitted at once, each frame received at
        the pass's start; the rest — too few alike, a rejection among them, no room for
        a run — connection by connection, as they would have gone."""
        ingest = self.server.ingest
        lone.sort(key=lambda read: len(read[1]))  # like frames together (stable: in order)
        payloads = [data for _, data in lone]
        for start, end, run in message_runs(
            payloads,
            ingest.dims,
            max_frame_bytes=ingest.max_frame_bytes,
            received_ns=[received_ns] * len(payloads),
            source="tcp",
        ):
            if run is not None and ingest.put_nowait(run) is not None:
                ingest.received("tcp", len(run))  # (rejections at admission: counted)
                continue
            for connection, data in lone[start:end]:
                connection.consume(data, now)

    async def sweep(self) -> None:
        """Close the connections past a limit, checking a few times per shortest limit."""
        limits = self.server.limits
        timeouts = (limits.idle_timeout_s, limits.frame_timeout_s, AUTH_TIMEOUT_S)
        shortest = min(t for t in timeouts if t)
        period = min(max(shortest / 8, 0.01), 1.0)
        events = self.server.ingest.events
        while True:
            await anyio.sleep(period)
            now = time.monotonic()
            for connection in list(self.connections):
                why = connection.expired(now)
                if why is None:
                    continue
                log.debug("TCP connection closed: %s", why)
                if why == "unauthorized":  # too slow to authenticate: refused like a bad token
                    events.limited(LISTENER, why)
                    connection.take_over(_Resume(refused=True))
                else:
                    events.limited(LISTENER, why)
                    connection.close()

    def close_all(self) -> None:
        """Close every polled connection but those waiting for room (they close once
        they have handed over what they hold)."""
        for connection in list(self.connections):
            if not connection.paused:
                connection.close()


class _Connection:
    """A sensor connection served by a task of its own: a TLS connection from the start,
    a plain one from the moment it had to wait. Reads, decodes (its `_Wire`), hands over
    — waiting while the pipeline is full — and replies from a bounded queue."""

    def __init__(
        self,
        stream: ByteStream,
        server: _Server,
        wire: _Wire,
        opened: float | None = None,
    ) -> None:
        self.stream = stream
        self.wire = wire
        self.ingest = server.ingest
        self.limits = server.limits
        self.auth_deadline = (opened or time.monotonic()) + AUTH_TIMEOUT_S
        self._partial_since: float | None = None  # when a frame begun is still incomplete
        self._read_scope: anyio.CancelScope | None = None
        self._stopped = False
        self._replies_stalled = False

    def stop_reading(self) -> None:
        """Stop after the frames in hand (the daemon is no longer accepting)."""
        self._stopped = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    def _deadline(self) -> tuple[float, str]:
        """When the next read must have returned, and which limit that is (`inf`: none)."""
        now, limits = anyio.current_time(), self.limits
        deadline, why = math.inf, ""
        if self.wire.authenticating:
            deadline = now + max(self.auth_deadline - time.monotonic(), 0.0)
            why = "unauthorized"
        elif limits.idle_timeout_s:
            deadline, why = now + limits.idle_timeout_s, "idle_timeout"
        if self.wire.pending_bytes and limits.frame_timeout_s:
            if self._partial_since is None:
                self._partial_since = now
            if self._partial_since + limits.frame_timeout_s < deadline:
                deadline, why = self._partial_since + limits.frame_timeout_s, "frame_timeout"
        else:
            self._partial_since = None
        return deadline, why

    async def _receive(self) -> bytes | None:
        # The next bytes, or None at end of stream, once told to stop, or past a timeout.
        if self._stopped or not self.ingest.accepting:
            return None
        deadline, why = self._deadline()
        with anyio.CancelScope(deadline=deadline) as self._read_scope:
            try:
                return await self.stream.receive(READ_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            except ssl.SSLError as e:  # a TLS client that broke the protocol: its own loss
                log.debug("TLS connection failed: %s", e)
                return None
            except OSError as e:  # reset by the peer
                if e.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                    raise
                return None
            finally:
                self._read_scope = None
        if not self._stopped:  # the deadline, not stop_reading(), ended the read
            self.ingest.events.limited(LISTENER, why)
            log.debug("TCP connection closed: %s", why)
        return None

    async def run(self, resume: _Resume) -> None:
        async with self.stream:
            if resume.refused:
                await self._refuse()
                return
            send, receive = anyio.create_memory_object_stream[bytes](REPLY_QUEUE)
            refused = False
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_replies, receive)
                with send:
                    for reply in resume.replies:
                        await self._reply(send, reply)
                    decoded = _Decoded(resume.items, resume.lost)
                    while True:
                        await self._hand_over(decoded.items, send)
                        if decoded.lost is not None:
                            if self.wire.replies:
                                await self._reply(send, self.wire.encode(decoded.lost))
                            break
                        data = await self._receive()
                        if data is None:
                            if self.wire.authenticating and not self._stopped:
                                refused = True  # too slow to authenticate (counted)
                            break
                        decoded = self.wire.decode(data)
                        if decoded.refused:
                            refused = True
                            break
                tg.cancel_scope.deadline = anyio.current_time() + REPLY_DRAIN_S
            if refused:
                await self._refuse()

    async def _refuse(self) -> None:
        # Say why, then read (and drop) what the client still sends for a moment: closing
        # with unread bytes would reset the connection and could lose the line.
        with anyio.move_on_after(REPLY_DRAIN_S, shield=True):
            try:
                await self.stream.send(UNAUTHORIZED_REPLY)
                while await self.stream.receive(READ_BYTES):
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            except OSError:  # (a TLS error, a reset)
                pass

    async def _hand_over(
        self, items: Sequence[Item | FrameRejected], replies: MemoryObjectSendStream[bytes]
    ) -> None:
        wire = self.wire
        while items:
            answers: list[bytes] = []
            done = wire.hand_over_nowait(items, answers)
            for answer in answers:
                await self._reply(replies, answer)
            if done == len(items):
                return
            item = items[done]  # the pipeline is full: wait for room for it
            assert not isinstance(item, FrameRejected)
            rejected = await self.ingest.put(item)
            if wire.replies:
                for why in rejected:
                    await self._reply(replies, wire.encode(why))
            items = items[done + 1 :]

    async def _reply(self, replies: MemoryObjectSendStream[bytes], line: bytes) -> None:
        if self._replies_stalled:
            if replies.statistics().current_buffer_used:
                return  # the client is not reading its replies: skip until they drain
            self._replies_stalled = False
        try:
            replies.send_nowait(line)
        except anyio.WouldBlock:
            with anyio.move_on_after(REPLY_WAIT_S) as waited:
                await replies.send(line)
            self._replies_stalled = waited.cancelled_caught

    async def _write_replies(self, replies: MemoryObjectReceiveStream[bytes]) -> None:
        with replies:
            try:
                async for line in replies:
                    await self.stream.send(line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError):
                pass  # the client went away; its replies go with it
            except OSError:  # reset by the peer
                pass


def _permitted(
    items: Sequence[Item | FrameRejected], identity: Identity
) -> list[Item | FrameRejected]:
    """`items` with each frame whose stream id `identity` may not write replaced by its
    `forbidden` rejection (a run holding such a frame is taken apart; order is kept)."""
    may = identity.may_write
    out: list[Item | FrameRejected] = []
    for item in items:
        if isinstance(item, FrameRun):
            if all(map(may, item.stream_ids)):
                out.append(item)
                continue
            frames: Sequence[Frame] = item.frames()
        elif isinstance(item, Frame):
            frames = [item]
        else:
            out.append(item)
            continue
        out += [f if may(f.stream_id) else _forbidden(f, identity) for f in frames]
    return out


def _forbidden(frame: Frame, identity: Identity) -> FrameRejected:
    return FrameRejected(
        "forbidden",
        f"identity {identity.name!r} may not write {frame.stream_id!r}",
        stream_id=frame.stream_id,
        seq=frame.seq,
    )
