"""A tiny HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz`.

No framework: one anyio TCP listener, one task per connection, one request per
connection (`Connection: close`). The request head is bounded (8 KiB, else 431), every
connection has a deadline, concurrent connections are capped, and no input can bring the
server down: a malformed request gets a 400 and the next connection is served as usual; a
failed accept (out of file descriptors) is counted and retried.

The probes stay answerable while hundreds of hostile connections are open:

- the request head must arrive within `header_timeout` (5 s), so a client trickling
    bytes ("slowloris") is cut off fast;
- when all `max_connections` (64) slots are taken, a newcomer takes the slot of the
    oldest connection still reading its head (that one is answered 503): a request sent
    in one piece, as probes and scrapers send it, is read before it can be displaced;
- when every slot is busy answering, `probe_reserve` (8) more slots serve `/healthz` and
    `/readyz` only; anything else over the caps is answered 503 at once.

With a TLS context it serves HTTPS only: the handshake is part of the request head, so it
falls under the same deadline and can be displaced like a slow head; a client that fails
it (plain HTTP, an untrusted certificate) is closed without an answer (`tls_handshake`).
With identities (`stream.security`), `/metrics` answers only a request that names an
identity with `metrics = true` — by `Authorization: Bearer <token>`, else by the client
certificate's CN — and anything else 401 with `WWW-Authenticate: Bearer` (`unauthorized`);
`/healthz` and `/readyz` reveal nothing and stay open, for probes that cannot send tokens.

Each is counted in `enactive_connections_limited_total{listener="metrics.listen"}`
(`header_timeout`, `max_connections`, `accept_error`, `tls_handshake`, `unauthorized`).

| request          | response                                                       |
|------------------|----------------------------------------------------------------|
| `GET /metrics`   | 200, `text/plain; version=0.0.4`, the Prometheus exposition    |
|                  | (401 without an identity allowed to scrape, with identities)   |
| `GET /healthz`   | 200 `ok` while the event loop serves (liveness)                |
| `GET /readyz`    | 200 `ready` when `readiness()` is true (or `progress()` when it |
|                  | starts with `ready`, e.g. `ready: 3/8 buckets compiled, …`),   |
|                  | else 503 and what it is doing (`progress()`, e.g.              |
|                  | `compiling: 3/8 buckets, building the model`)                  |
| other path       | 404                                                            |
| other method     | 405 (`HEAD` is answered like `GET`, without a body)            |
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable
from functools import partial
from typing import Protocol, cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, SocketListener

from .net import accept_forever, listen_tcp
from .security import Identities, accept_tls, bearer_token, peer_identity

__all__ = ["MAX_HEAD_BYTES", "METRICS_CONTENT_TYPE", "serve_http"]

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 8192
_TEXT = "text/plain; charset=utf-8"
_LISTENER = "metrics.listen"  # the configuration key, the `listener` label of the counts
_PROBES = ("/healthz", "/readyz")  # the paths the reserve slots serve
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _Metrics(Protocol):
    """What the server needs of `stream.metrics.Metrics`."""

    def exposition(self) -> bytes: ...

    def limited(self, listener: str, reason: str) -> None: ...


class _BadRequest(Exception):
    """Internal: the request cannot be answered normally; `status` says why."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def serve_http(
    address: tuple[str, int],
    metrics: _Metrics,
    readiness: Callable[[], bool],
    *,
    progress: Callable[[], str] | None = None,
    tls: ssl.SSLContext | None = None,
    identities: Identities | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    read_timeout: float = 10.0,
    header_timeout: float = 5.0,
    max_connections: int = 64,
    probe_reserve: int = 8,
) -> None:
    """Serve the metrics and health endpoints until cancelled.

    **Arguments:**

    - `address`: `(host, port)` to bind; port 0 picks a free port.
    - `metrics`: a `stream.metrics.Metrics` (anything with `exposition() -> bytes` and
        `limited(listener, reason)`, which counts what the limits below refuse).
    - `readiness`: called per `/readyz` request; true means ready. An exception means
        not ready.
    - `progress`: called per `/readyz` request; one line for the 503 body saying why
        (`starting`, `compiling: 3/8 buckets, building the model`, `draining`), and for
        the 200 body when it starts with `ready` (`ready: 3/8 buckets compiled,
        compiling the rest`; else the body is `ready`). Default, or when it raises: `not
        ready` (and `ready`).
    - `tls`: serve HTTPS with this context (`stream.security.Security.metrics_tls`);
        None: plain HTTP.
    - `identities`: answer `/metrics` only to an identity with `metrics = true`, named by
        a bearer token or (with `tls`) a client certificate; None: to anyone.
    - `task_status`: receives the bound port (int) once listening, for `tg.start()`.
    - `read_timeout`: seconds a connection may take from accept to response sent.
    - `header_timeout`: seconds a connection may take from accept to the end of its
        request head, TLS handshake included; a slower one is closed (`header_timeout`).
    - `max_connections`: connections served at once. One more takes the place of the
        oldest still reading its request head, which is answered 503 (`max_connections`).
    - `probe_reserve`: connections over `max_connections`, when none can be displaced,
        that serve `/healthz` and `/readyz` only; other requests there, and connections
        over both, are answered 503 at once (`max_connections`).

    **Returns:**

    Nothing; it returns only by cancellation.
    """
    host, port = address
    server = _Server(
        metrics,
        readiness,
        progress,
        _Slots(max_connections, probe_reserve),
        read_timeout=read_timeout,
        header_timeout=header_timeout,
        tls=tls,
        identities=identities,
    )

    def accept_failed(error: Exception) -> None:
        metrics.limited(_LISTENER, "accept_error")

    listener = await listen_tcp(_LISTENER, host, port)
    async with listener, anyio.create_task_group() as tg:
        for each in listener.listeners:
            tg.start_soon(
                partial(accept_forever, on_error=accept_failed),
                cast(SocketListener, each),
                tg,
                server.handle,
                "HTTP",
            )
        task_status.started(listener.extra(SocketAttribute.local_port))


@dataclasses.dataclass(eq=False)
class _Slot:
    """One connection's place: a reserve one (`probe_only`) or not. `head` is the cancel
    scope around reading its request head; a newcomer that takes the slot cancels it."""

    probe_only: bool
    head: anyio.CancelScope = dataclasses.field(default_factory=anyio.CancelScope)
    evicted: bool = False


class _Slots:
    """The server's connection slots: `general` ones for any request, `reserve` ones for
    the probes only, and the connections still reading their request head, oldest first."""

    def __init__(self, general: int, reserve: int) -> None:
        self._free = {False: general, True: reserve}
        self._reading: dict[_Slot, None] = {}  # an ordered set

    def take(self) -> _Slot | None:
        """A slot for a new connection, or None when over every cap. In turn: a free
        general slot, the general slot of the oldest connection still reading its head
        (evicted), a free reserve slot, the reserve slot of the oldest one reading."""
        for probe_only in (False, True):
            if self._free[probe_only]:
                self._free[probe_only] -= 1
            else:
                oldest = next((s for s in self._reading if s.probe_only == probe_only), None)
                if oldest is None:
                    continue
                del self._reading[oldest]
                oldest.evicted = True  # its slot passes to the newcomer
                oldest.head.cancel()
            slot = _Slot(probe_only)
            self._reading[slot] = None
            return slot
        return None

    def head_read(self, slot: _Slot) -> None:
        """`slot`'s connection has finished reading its request head (or failed to)."""
        self._reading.pop(slot, None)

    def release(self, slot: _Slot) -> None:
        """`slot`'s connection has closed."""
        self._reading.pop(slot, None)
        if not slot.evicted:
            self._free[slot.probe_only] += 1


@dataclasses.dataclass
class _Server:
    """Serves one request per connection within its slot's limits."""

    metrics: _Metrics
    readiness: Callable[[], bool]
    progress: Callable[[], str] | None
    slots: _Slots
    read_timeout: float
    header_timeout: float
    tls: ssl.SSLContext | None = None
    identities: Identities | None = None

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            slot = self.slots.take()
            if slot is None:
                self.metrics.limited(_LISTENER, "max_connections")
                if self.tls is None:  # (over TLS there is no session to say it in)
                    await _busy(stream)
                return
            try:
                with anyio.move_on_after(self.read_timeout):
                    await self._serve_one(stream, slot)
            except Exception:  # one bad connection must never take the server down
                log.exception("HTTP connection failed")
            finally:
                self.slots.release(slot)

    async def _serve_one(self, stream: anyio.abc.ByteStream, slot: _Slot) -> None:
        head: bytes | None = None
        head_only = False
        extra = ""
        secured: anyio.abc.ByteStream | None = stream if self.tls is None else None
        try:
            slot.head.deadline = anyio.current_time() + self.header_timeout
            try:
                with slot.head:  # the TLS handshake is part of reading the head
                    if self.tls is not None:
                        secured = await accept_tls(stream, self.tls)
                        if secured is None:
                            self.metrics.limited(_LISTENER, "tls_handshake")
                            return
                    assert secured is not None
                    head = await _read_head(secured)
            finally:
                self.slots.head_read(slot)
            if head is None or secured is None:  # too slow, or displaced by a newcomer
                self.metrics.limited(
                    _LISTENER, "max_connections" if slot.evicted else "header_timeout"
                )
                if slot.evicted and secured is not None:
                    await _busy(secured)
                return
            method, path = _parse_head(head)
            head_only = method == "HEAD"
            if slot.probe_only and path not in _PROBES:
                self.metrics.limited(_LISTENER, "max_connections")
                status, ctype, body = 503, _TEXT, b"busy\n"
            elif path == "/metrics" and not self._may_scrape(secured, head):
                self.metrics.limited(_LISTENER, "unauthorized")
                status, ctype, body = 401, _TEXT, b"unauthorized\n"
                extra = 'WWW-Authenticate: Bearer realm="metrics"\r\n'
            else:
                status, ctype, body = _route(
                    method, path, self.metrics, self.readiness, self.progress
                )
        except _BadRequest as bad:
            status, ctype, body = bad.status, _TEXT, f"{_REASONS[bad.status].lower()}\n".encode()
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the client went away before finishing its request
        if secured is not None:
            await _answer(secured, status, ctype, body, head_only=head_only, headers=extra)

    def _may_scrape(self, stream: anyio.abc.ByteStream, head: bytes) -> bool:
        """Whether the request names an identity with `metrics = true` (always, without
        identities): its bearer token, else its client certificate."""
        if self.identities is None:
            return True
        token = bearer_token(head)
        if token is not None:
            identity = self.identities.by_token(token) if token else None
        elif self.tls is not None:
            identity = peer_identity(stream, self.identities)
        else:
            identity = None
        return identity is not None and identity.metrics


async def _busy(stream: anyio.abc.ByteStream) -> None:
    with anyio.move_on_after(1.0):
        await _answer(stream, 503, _TEXT, b"busy\n", head_only=False)


async def _read_head(stream: anyio.abc.ByteStream) -> bytes:
    buf = b""
    while True:
        for end in (b"\r\n\r\n", b"\n\n"):
            i = buf.find(end)
            if i >= 0:
                return buf[:i]
        if len(buf) > MAX_HEAD_BYTES:
            raise _BadRequest(431)
        buf += await stream.receive(4096)


def _parse_head(head: bytes) -> tuple[str, str]:
    if len(head) > MAX_HEAD_BYTES:
        raise _BadRequest(431)
    line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(400)
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise _BadRequest(505 if version.startswith("HTTP/") else 400)
    return method, target.split("?", 1)[0]


def _route(
    method: str,
    path: str,
    metrics: _Metrics,
    readiness: Callable[[], bool],
    progress: Callable[[], str] | None,
) -> tuple[int, str, bytes]:
    if method not in ("GET", "HEAD"):
        raise _BadRequest(405)
    if path == "/metrics":
        try:
            return 200, METRICS_CONTENT_TYPE, metrics.exposition()
        except Exception:
            log.exception("collecting metrics failed")
            return 500, _TEXT, b"metrics collection failed\n"
    if path == "/healthz":
        return 200, _TEXT, b"ok\n"
    if path == "/readyz":
        try:
            ready = bool(readiness())
        except Exception:
            log.exception("readiness check failed")
            ready = False
        if ready:
            return 200, _TEXT, _ready(progress)
        return 503, _TEXT, _progress(progress, "not ready")
    return 404, _TEXT, b"not found\n"


def _ready(progress: Callable[[], str] | None) -> bytes:
    """`ready`, or the progress line when it says more about being ready (`ready: 3/8
    buckets compiled, compiling the rest`)."""
    body = _progress(progress, "ready")
    return body if body.startswith(b"ready") else b"ready\n"


def _progress(progress: Callable[[], str] | None, default: str) -> bytes:
    text = default
    if progress is not None:
        try:
            text = " ".join(progress().split()) or text  # one line
        except Exception:
            log.exception("readiness progress failed")
    return f"{text}\n".encode()


async def _answer(
    stream: anyio.abc.ByteStream,
    status: int,
    ctype: str,
    body: bytes,
    *,
    head_only: bool,
    headers: str = "",
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + headers
        + "Connection: close\r\n\r\n"
    ).encode("ascii")
    try:
        await stream.send(head if head_only else head + body)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the client went away; nothing to tell it
