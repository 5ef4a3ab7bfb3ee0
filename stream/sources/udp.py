"""UDP ingest: one frame per datagram (overload policy `drop_oldest`).

A datagram holds one binary frame or one JSON object (first byte `{`); either way its
source label is `udp`. A UDP sender cannot be slowed down, so datagrams go into a
bounded drop-oldest ring (`Ingest.ring`) whose pump decodes them into the ingest (like
datagrams taken together as one run, in one numpy pass); when the ring is full the oldest
datagram is dropped and counted as `overload`; so are the datagrams the kernel drops when
its receive buffer overflows (Linux reports them).
Rejections are counted, never answered. With an allow-list (`ingest.udp_allow`,
`stream.security.AddressFilter`) a datagram from a source address outside it is rejected
as `forbidden` as it is read, before the ring.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence

import anyio
from anyio.abc import TaskStatus

from ..buffers import Overflow, WeightedBuffer
from ..ingest import Ingest, Item
from ..net import naming_listener
from ..protocol import Frame, FrameRejected, decode_message
from ..protocol.runs import message_runs
from .tcp import POLL_INTERVAL_S, TcpSource

__all__ = ["UdpSource", "serve_udp"]

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 4 << 20
"""Kernel receive buffer asked for (best effort), to ride out short bursts."""
MAX_DATAGRAM_BYTES = 1 << 16
"""The largest UDP payload (anything longer is truncated by the kernel and rejected)."""
READ_BATCH = 256
"""Datagrams read per wake-up before yielding to other tasks."""
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)
"""Linux: attach the socket's count of datagrams the kernel dropped (its receive buffer
was full) to every datagram received, so that those are counted too."""
_DROPS = struct.Struct("=I")
SO_MEMINFO = 55
"""Linux: the socket's memory counters, `SK_MEMINFO_VARS` u32 values."""
SK_MEMINFO_DROPS = 8
"""The index of the drop counter among them."""
_MEMINFO = struct.Struct(f"={SK_MEMINFO_DROPS + 1}I")


class UdpSource:
    """The UDP sensor listener as a `Source` (label `udp`, policy `drop_oldest`; nothing
    to acknowledge).

    **Arguments:** `address`, `(host, port)` to bind; `buffer`, frames the drop-oldest
    ring holds, >= 1; `same_port_as`, a TCP source on the same host whose bound port to
    take when `address`'s port is 0 ("the same port number", also for ephemeral ports);
    `allow`, whether a datagram's source address may send (None: every source).
    """

    name = "udp"
    labels: tuple[str, ...] = ("udp",)
    overflow: Overflow = "drop_oldest"

    def __init__(
        self,
        address: tuple[str, int],
        *,
        buffer: int,
        same_port_as: TcpSource | None = None,
        allow: Callable[[str], bool] | None = None,
    ) -> None:
        self.address = address
        self.buffer = buffer
        self.same_port_as = same_port_as
        self.allow = allow

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        host, port = self.address
        tcp = self.same_port_as
        if port == 0 and tcp is not None and tcp.port is not None and tcp.address[0] == host:
            port = tcp.port
        await serve_udp(
            ingest, (host, port), buffer=self.buffer, allow=self.allow, task_status=task_status
        )

    def commit(self, positions: Sequence[object]) -> None:
        pass


async def serve_udp(
    ingest: Ingest,
    address: tuple[str, int],
    *,
    buffer: int,
    allow: Callable[[str], bool] | None = None,
    task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Receive frames as datagrams on `address` and feed them into `ingest`.

    Once `ingest.stopped` is set it stops receiving, hands over the frames already in
    the ring, and returns.

    **Arguments:**

    - `ingest`: the pipeline's doorway.
    - `address`: `(host, port)` to bind; port 0 picks a free port.
    - `buffer`: datagrams the drop-oldest ring holds, >= 1.
    - `allow`: called with each datagram's source address (host only); a datagram it
        refuses is counted as received and rejected (`forbidden`). None: every source.
    - `task_status`: `started(port)` with the bound port once bound.
    """
    if buffer < 1:
        raise ValueError(f"buffer={buffer}, expected >= 1")
    dims, max_frame_bytes = ingest.dims, ingest.max_frame_bytes

    def decode_one(data: bytes, received_ns: int) -> Frame | None:
        try:
            return decode_message(
                data, dims, max_frame_bytes=max_frame_bytes, received_ns=received_ns, source="udp"
            )
        except FrameRejected as exc:
            ingest.rejected("udp", exc.reason)
            return None

    def decode(items: list[tuple[bytes, int]]) -> Iterator[Item]:
        """Datagrams taken together: runs of like frames in one numpy pass each, the rest
        one by one (each rejection counted)."""
        payloads = [data for data, _ in items]
        received = [received_ns for _, received_ns in items]
        for start, end, run in message_runs(
            payloads, dims, max_frame_bytes=max_frame_bytes, received_ns=received, source="udp"
        ):
            if run is not None:
                yield run
                continue
            for data, received_ns in items[start:end]:
                frame = decode_one(data, received_ns)
                if frame is not None:
                    yield frame

    ring: WeightedBuffer[tuple[bytes, int]] = ingest.ring(buffer)
    with await _bind(address) as sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.pump, ring, decode)
            with anyio.CancelScope() as receiving:
                tg.start_soon(_cancel_when_not_accepting, ingest, receiving)
                task_status.started(sock.getsockname()[1])
                await _receive(sock, ingest, ring, allow)
            ring.close()  # the pump hands over what the ring holds, then ends


async def _bind(address: tuple[str, int]) -> socket.socket:
    host, port = address
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no address for {host}:{port}")
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        except OSError:
            log.debug("could not enlarge the UDP receive buffer", exc_info=True)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        except OSError:
            log.debug("the kernel's UDP drop counter is not available", exc_info=True)
        with naming_listener("ingest.udp", host, port):
            sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _meminfo_drops(sock: socket.socket) -> int | None:
    """The kernel's count of datagrams it dropped at `sock` (`SO_MEMINFO`'s
    `SK_MEMINFO_DROPS`, the counter `SO_RXQ_OVFL` reports), or None where not available."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return None
    return _MEMINFO.unpack_from(info)[SK_MEMINFO_DROPS] if len(info) >= _MEMINFO.size else None


async def _cancel_when_not_accepting(ingest: Ingest, scope: anyio.CancelScope) -> None:
    await ingest.stopped.wait()
    scope.cancel()


async def _receive(
    sock: socket.socket,
    ingest: Ingest,
    ring: WeightedBuffer[tuple[bytes, int]],
    allow: Callable[[str], bool] | None,
) -> None:
    # Reading the socket directly (rather than through a transport with its own queue)
    # leaves the kernel's receive buffer as the only buffer before the counted ring, and
    # the kernel's own drops are counted from the counter it attaches to each datagram.
    # Datagrams enter the ring raw: only those the pipeline takes are ever decoded.
    # Each datagram lands in one reused buffer and is copied out at its own size: `recvmsg`
    # would allocate the largest size for every datagram and shrink it, and under a flood
    # that churn fragments the heap (the RSS held its peak ~30 MiB higher).
    # The counter rides on the next datagram queued, so when the socket runs dry after a
    # backlog it is also read directly (`SO_MEMINFO`): drops at the end of a burst are
    # counted at once.
    kernel_drops = _meminfo_drops(sock) or 0

    def count_kernel_drops(total: int) -> None:
        nonlocal kernel_drops
        lost = (total - kernel_drops) % (1 << 32)
        if lost:
            kernel_drops = total
            ingest.received("udp", lost)
            ingest.dropped("overload", lost)

    ancillary = socket.CMSG_SPACE(_DROPS.size)
    buffer = memoryview(bytearray(MAX_DATAGRAM_BYTES))
    while True:
        await anyio.wait_readable(sock)
        received_ns = time.monotonic_ns()
        for i in range(READ_BATCH):
            try:
                size, cmsgs, _, sender = sock.recvmsg_into([buffer], ancillary)
            except (BlockingIOError, InterruptedError):
                # Only a backlog (more than one datagram waiting) can have overflowed.
                total = _meminfo_drops(sock) if i > 1 else None
                if total is not None:
                    count_kernel_drops(total)
                # Dry: rest a moment so that the next wake-up reads what arrives meanwhile
                # together (one pump round, runs), as the TCP poller does.
                await anyio.sleep(POLL_INTERVAL_S)
                break
            except ConnectionError:  # an ICMP error echoed back for an unrelated send
                continue
            for level, kind, value in cmsgs:
                if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
                    count_kernel_drops(_DROPS.unpack_from(value)[0])
            ingest.received("udp")
            if allow is not None and not allow(sender[0]):
                ingest.rejected("udp", "forbidden")
                continue
            ring.put_nowait((bytes(buffer[:size]), received_ns))
