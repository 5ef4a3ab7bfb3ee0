"""The `send` client: simulated sensor streams pushed at a daemon.

Open-loop load: every stream gets one frame per tick, ticks are due at absolute times
`start + k / rate_hz`, and a late tick is sent as soon as possible (never skipped), so
the report's `elapsed_s` shows when the daemon could not keep up. Streams are spread over
`connections` TCP connections (stream `i` on connection `i % connections`); with UDP every
frame is one datagram. Signals come from `SyntheticBodies`.

Every run is a new session of its streams: each stream's first frame carries the session
start (`FRAME_START`, JSON `"start": true`), so its seq may start at 1 again however
often `send` is run against the same daemon. Over TCP it asks for replies (`FRAME_REPLY`;
a JSON connection always gets them), reads them, and, after its last frame, half-closes
and reads until the daemon closes: the report then counts every frame the daemon
rejected, by reason. UDP gets no replies.

With an `ssl.SSLContext` every TCP connection speaks TLS (`TLSClientStream`, which can
half-close; TLS 1.3 only), and with a token it begins with the line `AUTH <token>`.
A connection the daemon closes before the half-close (refused credentials, a failed
handshake on its side, a stop) is a `SendError`.

`deliver` is that client without the simulated bodies: connections, replies, half-close,
for any sender that paces itself (`stream.replay` sends a recording with it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias

import anyio
from anyio.abc import ByteStream

from .protocol import Dims, ReplyReader, encode_frame, encode_json_frame
from .security import AUTH_PREFIX
from .synthetic import SyntheticBodies
from .tls_client import TLSClientStream

__all__ = [
    "Delivered",
    "SendError",
    "SendRecords",
    "SendReport",
    "Transport",
    "deliver",
    "run_sender",
    "send",
]

Transport = Literal["tcp", "udp", "json"]
SendRecords: TypeAlias = Callable[[list[bytes]], Awaitable[bool]]
"""`send(records)` (what `deliver` gives its producer): send encoded frames or JSON lines;
False once the daemon closed a connection (send nothing more)."""

CLOSE_TIMEOUT_S = 10.0
"""How long a TCP connection waits, after its last frame, for the daemon to read it all."""
_ERR = b"ERR "
"""How the daemon's refusal of a connection begins (`ERR unauthorized`); replies never do."""


class SendError(Exception):
    """The daemon closed a connection before the last frame was sent: it refused the
    credentials (`refused`: its line, e.g. `ERR unauthorized`), its TLS handshake failed
    (a plain client at a TLS listener, a missing client certificate), or it is stopping."""

    def __init__(self, message: str, refused: str | None = None) -> None:
        super().__init__(message)
        self.refused = refused


@dataclasses.dataclass(eq=False)
class _Link:
    """One TCP connection to the daemon, and what its reader learned."""

    stream: ByteStream
    ended: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    eof_sent: bool = False
    cut: bool = False
    """Whether a send failed: the daemon closed it."""
    early: bool = False
    """Whether the daemon closed it before the half-close."""
    refused: str | None = None
    """The daemon's `ERR ...` line, when it refused the connection."""
    garbled: str | None = None
    """Why what came back is not replies (not the daemon's ingest port?)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SendReport:
    """What one `run_sender` call sent.

    - `frames`: frames sent, `ticks * streams`.
    - `bytes`: their encoded size.
    - `ticks`: ticks sent (per stream, seq 1..ticks).
    - `elapsed_s`: seconds from the first tick's deadline to the last frame's send.
    - `transport`: how they were sent.
    - `rejected`: frames the daemon rejected, by reason (TCP and JSON: every one; UDP:
        nothing is known, always empty).
    - `complete`: whether every connection was closed by the daemon after answering all
        it read (False: it did not close within `CLOSE_TIMEOUT_S`; some replies may be
        missing). Always False for UDP.
    """

    frames: int
    bytes: int
    ticks: int
    elapsed_s: float
    transport: str = "tcp"
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    complete: bool = False

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def accepted(self) -> int | None:
        """Frames the daemon took in (passed decoding and the seq check); None for UDP."""
        return None if self.transport == "udp" else self.frames - sum(self.rejected.values())

    def summary(self) -> str:
        """One human line: what was sent, and what the daemon said of it."""
        line = (
            f"sent {self.frames} frames ({self.ticks} per stream) in {self.elapsed_s:.2f} s "
            f"over {self.transport}"
        )
        if self.transport == "udp":
            return line + "; UDP gets no replies: see enactive_frames_rejected_total"
        line += f": {self.accepted} accepted, {sum(self.rejected.values())} rejected"
        if self.rejected:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items()))
            line += f" ({reasons})"
        if not self.complete:
            line += "; the daemon did not close the connection in time, replies may be missing"
        return line

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with `accepted` and `frames_per_s`."""
        return {
            **dataclasses.asdict(self),
            "accepted": self.accepted,
            "frames_per_s": self.frames_per_s,
        }


async def run_sender(
    host: str,
    port: int,
    *,
    streams: int,
    rate_hz: float,
    duration_s: float,
    transport: Transport,
    dims: Dims,
    seed: int = 0,
    connections: int = 1,
    prefix: str = "sim",
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
) -> SendReport:
    """Send `streams` synthetic streams at `rate_hz` frames per second each.

    **Arguments:**

    - `host`, `port`: the daemon's ingest address.
    - `streams`: the number of streams, >= 1, with ids `f"{prefix}-{i:04d}"`.
    - `rate_hz`: ticks per second, > 0; every stream sends one frame per tick.
    - `duration_s`: run length; `ceil(duration_s * rate_hz)` ticks (at least one).
    - `transport`: `"tcp"` (binary frames), `"json"` (JSON lines over TCP) or `"udp"`.
    - `dims`: modality sizes; must match the daemon's or its frames are rejected.
    - `seed`: fixes the signals.
    - `connections`: TCP connections to spread the streams over (ignored for UDP).
    - `prefix`: the stream-id prefix.
    - `tls`: a client context to speak TLS 1.3 with (TCP and JSON); None: plain TCP.
    - `token`: sent first on every connection (`AUTH <token>`); None: no AUTH line.

    **Returns:**

    A `SendReport`, with the rejections the daemon answered (TCP and JSON).

    **Raises:**

    `ValueError` for an argument out of range (`tls` or `token` with UDP); `OSError`
    when the daemon cannot be reached, `ssl.SSLError` (an `OSError`) when the TLS
    handshake fails; `SendError` when the daemon closed a connection before the last
    frame, refusing the credentials among other causes.
    """
    if streams < 1 or connections < 1:
        raise ValueError(f"streams={streams}, connections={connections}; both must be >= 1")
    if rate_hz <= 0 or duration_s < 0:
        raise ValueError(f"rate_hz={rate_hz} must be > 0 and duration_s={duration_s} >= 0")
    if transport not in ("tcp", "udp", "json"):
        raise ValueError(f"transport={transport!r}, expected 'tcp', 'udp' or 'json'")
    if transport == "udp" and (tls is not None or token is not None):
        raise ValueError("UDP carries no TLS and no token; use transport 'tcp' or 'json'")
    if token is not None and not _is_token(token):
        raise ValueError("the token must be printable ASCII, without spaces")
    bodies = SyntheticBodies(streams, dims, seed=seed, prefix=prefix, dt=1.0 / rate_hz)
    ticks = max(1, math.ceil(duration_s * rate_hz - 1e-9))
    encode = encode_json_frame if transport == "json" else encode_frame
    bounds = list(itertools.pairwise(itertools.accumulate(dims, initial=0)))

    flags: dict[str, bool] = {} if transport == "json" else {"reply": transport == "tcp"}

    def encoded(k: int) -> list[bytes]:
        t = k / rate_hz
        values = bodies.tick(t)
        sensory, proprio, tactile, motor = (values[:, a:b] for a, b in bounds)
        return [
            encode(sid, k + 1, t, sensory=s, proprio=p, tactile=ta, motor=m, start=k == 0, **flags)
            for sid, s, p, ta, m in zip(
                bodies.stream_ids, sensory, proprio, tactile, motor, strict=True
            )
        ]

    elapsed = 0.0

    async def produce(send: SendRecords) -> None:
        nonlocal elapsed
        start = anyio.current_time()
        for k in range(ticks):
            await anyio.sleep_until(start + k / rate_hz)
            if not await send(encoded(k)):
                break  # the daemon closed a connection: `deliver` says why
        elapsed = anyio.current_time() - start

    delivered = await deliver(
        host,
        port,
        produce,
        transport=transport,
        connections=min(connections, streams),
        tls=tls,
        token=token,
    )
    return SendReport(
        frames=ticks * streams,
        bytes=delivered.bytes,
        ticks=ticks,
        elapsed_s=elapsed,
        transport=transport,
        rejected=delivered.rejected,
        complete=delivered.complete,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    """What `deliver` sent: `bytes`; the frames the daemon `rejected`, by reason (TCP and
    JSON; UDP: always empty); whether it was `complete` (as for `SendReport`)."""

    bytes: int
    rejected: dict[str, int]
    complete: bool


async def deliver(
    host: str,
    port: int,
    produce: Callable[[SendRecords], Awaitable[None]],
    *,
    transport: Transport,
    connections: int = 1,
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
) -> Delivered:
    """Connect to the daemon, let `produce` send, then collect every reply.

    `produce(send)` is awaited once, with the connections open; it paces itself and calls
    `send(records)` as often as it likes. Over TCP (`"tcp"`, `"json"`) record `i` of a
    call goes on connection `i % connections`, so a stream kept at the same index stays on
    one connection, in order; over UDP each record is one datagram. Then every TCP
    connection is half-closed and its replies are read until the daemon closes it (at
    most `CLOSE_TIMEOUT_S`).

    **Arguments:**

    - `host`, `port`: the daemon's ingest address.
    - `produce`: the sender's pacing and content, given `send`.
    - `transport`: `"tcp"` (binary frames, which should carry `FRAME_REPLY` to be
        answered), `"json"` (JSON lines) or `"udp"`.
    - `connections`: TCP connections (ignored for UDP), >= 1.
    - `tls`, `token`: as for `run_sender` (TCP and JSON only).

    **Returns:**

    A `Delivered`.

    **Raises:**

    As `run_sender`: `ValueError`, `OSError` (`ssl.SSLError`), `SendError`.
    """
    if connections < 1:
        raise ValueError(f"connections={connections}, expected >= 1")
    if transport == "udp" and (tls is not None or token is not None):
        raise ValueError("UDP carries no TLS and no token; use transport 'tcp' or 'json'")
    if token is not None and not _is_token(token):
        raise ValueError("the token must be printable ASCII, without spaces")
    rejected: collections.Counter[str] = collections.Counter()
    complete = False
    sent_bytes = 0

    if transport == "udp":
        async with await anyio.create_connected_udp_socket(host, port) as udp:

            async def send_datagrams(records: list[bytes]) -> bool:
                nonlocal sent_bytes
                for record in records:
                    await udp.send(record)
                    sent_bytes += len(record)
                return True

            await produce(send_datagrams)
        return Delivered(sent_bytes, {}, False)

    links: list[_Link] = []

    async def send_frames(records: list[bytes]) -> bool:
        nonlocal sent_bytes
        if any(link.ended.is_set() for link in links):
            return False  # the daemon closed one: _raise_if_cut says why
        sent = await _send_tick(links, records)
        if sent is None:
            return False
        sent_bytes += sent
        return True

    try:
        for _ in range(connections):
            links.append(_Link(await _connect(host, port, tls, token)))
        async with anyio.create_task_group() as readers:
            for link in links:
                readers.start_soon(_read_replies, link, transport, rejected)
            await produce(send_frames)
            # Half-close, then let the readers read until the daemon closes: it has
            # answered every frame by then.
            for link in links:
                await _half_close(link)
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                for link in links:
                    await link.ended.wait()
                complete = True
            readers.cancel_scope.cancel()
    finally:
        for link in links:
            await link.stream.aclose()
    _raise_if_cut(links)
    return Delivered(sent_bytes, dict(rejected), complete)


def _is_token(token: str) -> bool:
    """Whether `token` fits an AUTH line: printable ASCII, at least one character, no spaces."""
    return token.isascii() and token.isprintable() and token.split() == [token]


async def _connect(
    host: str, port: int, tls: ssl.SSLContext | None, token: str | None
) -> ByteStream:
    """A connection to the daemon: TCP, TLS over it with `tls`, its AUTH line sent with
    `token`.

    **Raises:** `OSError` (`ssl.SSLError`: the handshake failed) or `SendError`.
    """
    stream: ByteStream = await anyio.connect_tcp(host, port)
    try:
        if tls is not None:
            stream = await TLSClientStream.connect(stream, tls, host)
        if token is not None:
            await stream.send(AUTH_PREFIX + token.encode("ascii") + b"\n")
    except BaseException as e:
        await stream.aclose()
        if isinstance(e, anyio.BrokenResourceError):
            raise SendError("the daemon closed the connection before the first frame") from e
        raise
    return stream


async def _send_tick(links: list[_Link], records: list[bytes]) -> int | None:
    """Send one tick's `records`, stream `i` on link `i % len(links)`: the bytes sent, or
    None when a link is cut (the daemon closed it; it is marked `cut`)."""
    sent = 0
    for c, link in enumerate(links):
        chunk = b"".join(records[c :: len(links)])
        try:
            await link.stream.send(chunk)
        except anyio.BrokenResourceError:
            link.cut = True
            return None
        sent += len(chunk)
    return sent


async def _half_close(link: _Link) -> None:
    """Half-close `link` unless the daemon closed it already."""
    if link.ended.is_set() or link.cut:
        return
    link.eof_sent = True
    try:
        await link.stream.send_eof()
    except anyio.BrokenResourceError:
        pass  # gone: its reader sees the end


def _raise_if_cut(links: list[_Link]) -> None:
    """**Raises:** `SendError` when the daemon refused a connection, answered what is not
    replies, or closed one before the half-close."""
    for link in links:
        if link.refused is not None:
            raise SendError(
                f"the daemon refused the credentials: {link.refused}", refused=link.refused
            )
        if link.garbled is not None:
            raise SendError(f"the answer is not the daemon's replies ({link.garbled})")
    if any(link.early or link.cut for link in links):
        raise SendError("the daemon closed the connection before the last frame was sent")


async def _read_replies(
    link: _Link, transport: Transport, rejected: collections.Counter[str]
) -> None:
    """Count the daemon's replies on `link` by reason until it closes the connection;
    note an `ERR` line (a refused connection) in `link.refused` instead."""
    binary, pending = ReplyReader(), b""
    head: bytes | None = b""
    try:
        while True:
            data = await link.stream.receive()
            if head is not None:  # the first bytes: an ERR line, or replies?
                head += data
                if len(head) < len(_ERR) and _ERR.startswith(head):
                    continue
                if head.startswith(_ERR):
                    link.refused = head.partition(b"\n")[0].decode("ascii", "replace").strip()
                    continue  # the daemon closes the connection next
                data, head = head, None
            if transport == "json":
                *lines, pending = (pending + data).split(b"\n")
                rejected.update(json.loads(line)["error"] for line in lines if line.strip())
            else:
                rejected.update(reply.reason for reply in binary.feed(data))
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        link.early = not link.eof_sent
    except (ValueError, KeyError, TypeError) as e:  # (JSON lines that are not replies too)
        link.garbled = str(e)
    finally:
        link.ended.set()


def send(
    host: str,
    port: int,
    *,
    streams: int,
    rate_hz: float,
    duration_s: float,
    transport: Transport,
    dims: Dims,
    seed: int = 0,
    connections: int = 1,
    prefix: str = "sim",
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
) -> SendReport:
    """`run_sender` in a fresh event loop (the synchronous entry point for the CLI)."""
    run = functools.partial(
        run_sender,
        host,
        port,
        streams=streams,
        rate_hz=rate_hz,
        duration_s=duration_s,
        transport=transport,
        dims=dims,
        seed=seed,
        connections=connections,
        prefix=prefix,
        tls=tls,
        token=token,
    )
    return anyio.run(run)
