"""TCP ingest: many connections, each a byte stream of frames (overload policy `block`).

The first byte of a connection decides its language: `{` means JSON lines (source label
`json`), anything else binary frames back to back (source label `tcp`). A connection's
frames go into the ingest in order; while the pipeline is full the connection stops
reading, so TCP flow control slows its sender down.

Every rejected frame is counted. A JSON connection gets one reply line per rejection,
`{"error": reason, "detail": ..., "stream": ..., "seq": ...}`, written by a separate task
from a bounded queue. When the queue is full the reader waits for room at most
`REPLY_WAIT_S`; after such a wait runs out, replies are skipped until the queue has
drained, so a client that never reads its replies only loses replies. A binary
connection gets no replies and is closed when its framing is lost. Nothing one
connection does affects another, and no connection error reaches the server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import cast

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..buffers import Overflow
from ..ingest import Ingest, frames_in
from ..net import accept_forever, listen_tcp
from ..protocol import Frame, FrameReader, FrameRejected, FrameRun, FramingLost, LineReader

__all__ = ["TcpSource", "serve_tcp"]

log = logging.getLogger(__name__)


READ_BYTES = 1 << 18
"""The most bytes taken from a connection's socket per read."""
REPLY_QUEUE = 256
"""Error replies waiting to be written to a JSON client."""
REPLY_WAIT_S = 1.0
"""How long the reader waits for room in a full reply queue before skipping replies."""
REPLY_DRAIN_S = 0.5
"""How long a closing JSON connection may spend writing its last replies."""


class TcpSource:
    """The TCP sensor listener as a `Source` (labels `tcp` and `json`, policy `block`;
    nothing to acknowledge)."""

    name = "tcp"
    labels: tuple[str, ...] = ("tcp", "json")
    overflow: Overflow = "block"

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.port: int | None = None  # once bound

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self.port = await tg.start(serve_tcp, ingest, self.address)
            task_status.started(self.port)

    def commit(self, positions: Sequence[object]) -> None:
        pass


async def serve_tcp(
    ingest: Ingest,
    address: tuple[str, int],
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept sensor connections on `address` and feed their frames into `ingest`.

    Runs until cancelled. Once `ingest.accepting` turns false it stops accepting and
    each connection stops reading after the frame in hand, then closes.

    **Arguments:**

    - `ingest`: the pipeline's doorway.
    - `address`: `(host, port)` to listen on; port 0 picks a free port.
    - `task_status`: `started(port)` with the bound port once listening.
    """
    host, port = address
    listener = await listen_tcp("ingest.tcp", host, port)
    connections: set[_Connection] = set()

    async def handle(stream: SocketStream) -> None:
        connection = _Connection(stream, ingest)
        connections.add(connection)
        try:
            await connection.run()
        except Exception:  # a connection's failure is its own, never the server's
            log.warning("TCP connection failed", exc_info=True)
        finally:
            connections.discard(connection)

    try:
        async with anyio.create_task_group() as tg:
            for each in listener.listeners:
                tg.start_soon(accept_forever, cast(SocketListener, each), tg, handle, "TCP")
            task_status.started(listener.extra(SocketAttribute.local_port))
            await ingest.stopped.wait()
            await listener.aclose()  # ends the accept loops
            for connection in list(connections):
                connection.stop_reading()  # each finishes the frames in hand, then ends
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()


class _Connection:
    """One sensor connection: read, decode, hand over, reply (JSON only)."""

    def __init__(self, stream: SocketStream, ingest: Ingest) -> None:
        self.stream = stream
        self.ingest = ingest
        self._read_scope: anyio.CancelScope | None = None
        self._stopped = False
        self._replies_stalled = False

    def stop_reading(self) -> None:
        """Stop after the frames in hand (the daemon is no longer accepting)."""
        self._stopped = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _receive(self) -> bytes | None:
        # The next bytes, or None at end of stream or once told to stop.
        if self._stopped or not self.ingest.accepting:
            return None
        with anyio.CancelScope() as self._read_scope:
            try:
                return await self.stream.receive(READ_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return None
            finally:
                self._read_scope = None
        return None  # the read was cancelled by stop_reading()

    async def run(self) -> None:
        async with self.stream:
            data = await self._receive()
            if data is None:
                return
            if data[:1] != b"{":
                await self._read_binary(data)
                return
            send, receive = anyio.create_memory_object_stream[bytes](REPLY_QUEUE)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_replies, receive)
                with send:
                    await self._read_json(data, send)
                tg.cancel_scope.deadline = anyio.current_time() + REPLY_DRAIN_S

    async def _read_binary(self, data: bytes | None) -> None:
        reader = FrameReader(
            self.ingest.dims, max_frame_bytes=self.ingest.max_frame_bytes, source="tcp", runs=True
        )
        while data is not None:
            try:
                items = reader.feed(data, time.monotonic_ns())
            except FramingLost as exc:
                self.ingest.received("tcp")
                self.ingest.rejected("tcp", exc.reason)
                log.debug("TCP framing lost, closing the connection: %s", exc)
                return
            await self._hand_over("tcp", items, None)
            data = await self._receive()

    async def _read_json(self, data: bytes | None, replies: MemoryObjectSendStream[bytes]) -> None:
        reader = LineReader(
            self.ingest.dims, max_frame_bytes=self.ingest.max_frame_bytes, source="json"
        )
        while data is not None:
            await self._hand_over("json", reader.feed(data, time.monotonic_ns()), replies)
            data = await self._receive()

    async def _hand_over(
        self,
        label: str,
        items: Sequence[Frame | FrameRejected | FrameRun],
        replies: MemoryObjectSendStream[bytes] | None,
    ) -> None:
        ingest = self.ingest
        ingest.received(label, sum(map(frames_in, items)))
        for item in items:
            if not isinstance(item, FrameRejected):
                if not ingest.put_nowait(item):
                    await ingest.put(item)
                continue
            ingest.rejected(label, item.reason)
            if replies is not None:
                await self._reply(replies, _error_line(item))

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
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the client went away; its replies go with it


def _error_line(exc: FrameRejected) -> bytes:
    """One JSON reply line for a rejected frame (`stream`/`seq` null when unknown)."""
    reply = {
        "error": exc.reason,
        "detail": exc.detail,
        "stream": exc.stream_id,
        "seq": exc.seq,
    }
    return json.dumps(reply, separators=(",", ":")).encode("utf-8") + b"\n"
