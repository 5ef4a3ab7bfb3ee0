"""A tiny HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz`.

No framework: one anyio TCP listener, one task per connection, one request per
connection (`Connection: close`). The request head is bounded (8 KiB, else 431), every
connection has a deadline, concurrent connections are capped, and no input can bring the
server down: a malformed request gets a 400 and the next connection is served as usual.

| request          | response                                                       |
|------------------|----------------------------------------------------------------|
| `GET /metrics`   | 200, `text/plain; version=0.0.4`, the Prometheus exposition    |
| `GET /healthz`   | 200 `ok` while the event loop serves (liveness)                |
| `GET /readyz`    | 200 `ready` when `readiness()` is true, else 503 and what it   |
|                  | is doing (`progress()`, e.g. `compiling: 3/8 buckets`)         |
| other path       | 404                                                            |
| other method     | 405 (`HEAD` is answered like `GET`, without a body)            |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from .net import listen_tcp

__all__ = ["MAX_HEAD_BYTES", "METRICS_CONTENT_TYPE", "serve_http"]

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD_BYTES = 8192
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _Exposes(Protocol):
    def exposition(self) -> bytes: ...


class _BadRequest(Exception):
    """Internal: the request cannot be answered normally; `status` says why."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def serve_http(
    address: tuple[str, int],
    metrics: _Exposes,
    readiness: Callable[[], bool],
    *,
    progress: Callable[[], str] | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    read_timeout: float = 10.0,
    max_connections: int = 64,
) -> None:
    """Serve the metrics and health endpoints until cancelled.

    **Arguments:**

    - `address`: `(host, port)` to bind; port 0 picks a free port.
    - `metrics`: anything with `exposition() -> bytes` (a `stream.metrics.Metrics`).
    - `readiness`: called per `/readyz` request; true means ready. An exception means
        not ready.
    - `progress`: called per `/readyz` request that is not ready; one line for the 503
        body saying why (`starting`, `compiling: 3/8 buckets`, `draining`). Default, or
        when it raises: `not ready`.
    - `task_status`: receives the bound port (int) once listening, for `tg.start()`.
    - `read_timeout`: seconds a connection may take from accept to response sent.
    - `max_connections`: connections served at once; more are answered 503 at once.

    **Returns:**

    Nothing; it returns only by cancellation.
    """
    host, port = address
    limiter = anyio.CapacityLimiter(max_connections)

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                limiter.acquire_nowait()
            except anyio.WouldBlock:
                with anyio.move_on_after(1.0):
                    await _answer(stream, 503, _TEXT, b"busy\n", head_only=False)
                return
            try:
                with anyio.move_on_after(read_timeout):
                    await _serve_one(stream, metrics, readiness, progress)
            except Exception:  # one bad connection must never take the server down
                log.exception("HTTP connection failed")
            finally:
                limiter.release()

    listener = await listen_tcp("metrics.listen", host, port)
    async with listener:
        task_status.started(listener.extra(SocketAttribute.local_port))
        await listener.serve(handle)


async def _serve_one(
    stream: anyio.abc.SocketStream,
    metrics: _Exposes,
    readiness: Callable[[], bool],
    progress: Callable[[], str] | None,
) -> None:
    head_only = False
    try:
        method, path = _parse_head(await _read_head(stream))
        head_only = method == "HEAD"
        status, ctype, body = _route(method, path, metrics, readiness, progress)
    except _BadRequest as bad:
        status, ctype, body = bad.status, _TEXT, f"{_REASONS[bad.status].lower()}\n".encode()
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return  # the client went away before finishing its request
    await _answer(stream, status, ctype, body, head_only=head_only)


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
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
    metrics: _Exposes,
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
        return (200, _TEXT, b"ready\n") if ready else (503, _TEXT, _not_ready(progress))
    return 404, _TEXT, b"not found\n"


def _not_ready(progress: Callable[[], str] | None) -> bytes:
    text = "not ready"
    if progress is not None:
        try:
            text = " ".join(progress().split()) or text  # one line
        except Exception:
            log.exception("readiness progress failed")
    return f"{text}\n".encode()


async def _answer(
    stream: anyio.abc.SocketStream,
    status: int,
    ctype: str,
    body: bytes,
    *,
    head_only: bool,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + "Connection: close\r\n\r\n"
    ).encode("ascii")
    try:
        await stream.send(head if head_only else head + body)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the client went away; nothing to tell it
