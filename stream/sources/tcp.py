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
"""

from __future__ import annotations

import functools
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from typing import cast

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..buffers import Overflow
from ..ingest import Ingest, frames_in
from ..net import (
    NO_LIMITS,
    ConnectionGate,
    ConnectionLimits,
    accept_forever,
    listen_tcp,
    peer_address,
)
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
from ..security import (
    AUTH_TIMEOUT_S,
    UNAUTHORIZED_REPLY,
    AuthLine,
    Identities,
    Identity,
    accept_tls,
    peer_identity,
)

__all__ = ["TcpSource", "serve_tcp"]

log = logging.getLogger(__name__)


READ_BYTES = 1 << 18
"""The most bytes taken from a connection's socket per read."""
REPLY_QUEUE = 256
"""Error replies waiting to be written to a JSON client."""
REPLY_WAIT_S = 1.0
"""How long the reader waits for room in a full reply queue before skipping replies."""
LISTENER = "ingest.tcp"
"""The listener's name in logs and in `enactive_connections_limited_total{listener}`."""
REPLY_DRAIN_S = 0.5
"""How long a closing JSON connection may spend writing its last replies."""


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
    ) -> None:
        self.address = address
        self.limits = limits
        self.tls = tls
        self.identities = identities
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
    - `task_status`: `started(port)` with the bound port once listening.
    """
    host, port = address
    listener = await listen_tcp(LISTENER, host, port)
    connections: set[_Connection] = set()
    handshakes: set[anyio.CancelScope] = set()
    gate = ConnectionGate(limits)

    def accept_failed(error: Exception) -> None:  # out of descriptors, say: counted
        ingest.events.limited(LISTENER, "accept_error")

    async def handle(stream: SocketStream) -> None:
        peer = peer_address(stream)
        refused = gate.enter(peer)
        if refused is not None:
            ingest.events.limited(LISTENER, refused)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            secured: ByteStream | None = stream
            if tls is not None:
                secured = None  # unless the handshake completes
                with anyio.CancelScope() as handshake:
                    handshakes.add(handshake)
                    if ingest.accepting:
                        secured = await accept_tls(stream, tls)
                    else:
                        handshake.cancel()
                handshakes.discard(handshake)
                if secured is None:
                    if not handshake.cancel_called:  # (not the daemon stopping)
                        ingest.events.limited(LISTENER, "tls_handshake")
                    await anyio.aclose_forcefully(stream)
                    return
            assert secured is not None
            certified = None
            if identities is not None and tls is not None:
                certified = peer_identity(secured, identities)
            connection = _Connection(secured, ingest, limits, identities, certified)
            connections.add(connection)
            try:
                await connection.run()
            except Exception:  # a connection's failure is its own, never the server's
                log.warning("TCP connection failed", exc_info=True)
            finally:
                connections.discard(connection)
        finally:
            gate.leave(peer)

    try:
        async with anyio.create_task_group() as tg:
            for each in listener.listeners:
                tg.start_soon(
                    functools.partial(accept_forever, on_error=accept_failed),
                    cast(SocketListener, each),
                    tg,
                    handle,
                    "TCP",
                )
            task_status.started(listener.extra(SocketAttribute.local_port))
            await ingest.stopped.wait()
            await listener.aclose()  # ends the accept loops
            for handshake in list(handshakes):
                handshake.cancel()
            for connection in list(connections):
                connection.stop_reading()  # each finishes the frames in hand, then ends
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()


class _Connection:
    """One sensor connection: authenticate, read, decode, check permissions, hand over,
    reply."""

    def __init__(
        self,
        stream: ByteStream,
        ingest: Ingest,
        limits: ConnectionLimits,
        identities: Identities | None = None,
        certified: Identity | None = None,
    ) -> None:
        self.stream = stream
        self.ingest = ingest
        self.limits = limits
        self.identities = identities
        self.certified = certified
        self.identity: Identity | None = None  # once authenticated
        self.reader: FrameReader | LineReader | None = None
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
        if limits.idle_timeout_s:
            deadline, why = now + limits.idle_timeout_s, "idle_timeout"
        if self.reader is not None and self.reader.pending_bytes and limits.frame_timeout_s:
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
            finally:
                self._read_scope = None
        if not self._stopped:  # the deadline, not stop_reading(), ended the read
            self.ingest.events.limited(LISTENER, why)
            log.debug("TCP connection closed: %s", why)
        return None

    async def run(self) -> None:
        async with self.stream:
            data = await (self._receive() if self.identities is None else self._authenticate())
            while data == b"":  # the AUTH line was all of the read
                data = await self._receive()
            if data is None:
                return
            send, receive = anyio.create_memory_object_stream[bytes](REPLY_QUEUE)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_replies, receive)
                with send:
                    if data[:1] == b"{":
                        await self._read_json(data, send)
                    else:
                        await self._read_binary(data, send)
                tg.cancel_scope.deadline = anyio.current_time() + REPLY_DRAIN_S

    async def _authenticate(self) -> bytes | None:
        # What follows a good `AUTH` line (or everything, for a certified connection that
        # sent none); None once refused or gone.
        assert self.identities is not None
        auth = AuthLine(self.identities, self.certified)
        outcome: tuple[Identity | None, bytes] | None = None
        with anyio.move_on_after(AUTH_TIMEOUT_S):
            while outcome is None:
                data = await self._receive()
                if data is None:
                    return None
                outcome = auth.feed(data)
        identity, rest = outcome or (None, b"")
        if identity is None:
            self.ingest.events.limited(LISTENER, "unauthorized")
            log.debug("TCP connection refused: unauthorized")
            await self._refuse()
            return None
        self.identity = None if identity.writes_all else identity
        return rest

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

    async def _read_binary(
        self, data: bytes | None, replies: MemoryObjectSendStream[bytes]
    ) -> None:
        reader = self.reader = FrameReader(
            self.ingest.dims, max_frame_bytes=self.ingest.max_frame_bytes, source="tcp", runs=True
        )
        while data is not None:
            try:
                items = reader.feed(data, time.monotonic_ns())
            except FramingLost as exc:
                # What the read completed before the break is handed over first.
                await self._hand_over(
                    "tcp", exc.frames, replies if reader.replies else None, encode_reply
                )
                self.ingest.received("tcp")
                self.ingest.rejected("tcp", exc.reason)
                if reader.replies:
                    await self._reply(replies, encode_reply(exc))
                log.debug("TCP framing lost, closing the connection: %s", exc)
                return
            await self._hand_over("tcp", items, replies if reader.replies else None, encode_reply)
            data = await self._receive()

    async def _read_json(self, data: bytes | None, replies: MemoryObjectSendStream[bytes]) -> None:
        reader = self.reader = LineReader(
            self.ingest.dims, max_frame_bytes=self.ingest.max_frame_bytes, source="json"
        )
        while data is not None:
            items = reader.feed(data, time.monotonic_ns())
            await self._hand_over("json", items, replies, encode_error_line)
            data = await self._receive()

    async def _hand_over(
        self,
        label: str,
        items: Sequence[Frame | FrameRejected | FrameRun],
        replies: MemoryObjectSendStream[bytes] | None,
        encode: Callable[[FrameRejected], bytes],
    ) -> None:
        ingest = self.ingest
        ingest.received(label, sum(map(frames_in, items)))
        if self.identity is not None:
            items = _permitted(items, self.identity)
        for item in items:
            if isinstance(item, FrameRejected):
                ingest.rejected(label, item.reason)
                rejected: Sequence[FrameRejected] = (item,)
            else:
                admitted = ingest.put_nowait(item)
                rejected = await ingest.put(item) if admitted is None else admitted
            if replies is not None:
                for why in rejected:
                    await self._reply(replies, encode(why))

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


def _permitted(
    items: Sequence[Frame | FrameRejected | FrameRun], identity: Identity
) -> list[Frame | FrameRejected | FrameRun]:
    """`items` with each frame whose stream id `identity` may not write replaced by its
    `forbidden` rejection (a run holding such a frame is taken apart; order is kept)."""
    may = identity.may_write
    out: list[Frame | FrameRejected | FrameRun] = []
    for item in items:
        if isinstance(item, FrameRun):
            if all(map(may, item.stream_ids)):
                out.append(item)
                continue
            frames = item.frames()
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
