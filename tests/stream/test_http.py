"""The metrics/health HTTP server, over real sockets on 127.0.0.1."""

from __future__ import annotations

import errno
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import SocketListener, SocketStream
from anyio.streams.stapled import MultiListener
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import stream.http
from stream.http import MAX_HEAD_BYTES, serve_http
from stream.metrics import Metrics
from stream.security import load_identities


@asynccontextmanager
async def server(
    readiness: Callable[[], bool] = lambda: True,
    metrics: object | None = None,
    **kwargs: object,
) -> AsyncIterator[int]:
    metrics = metrics or Metrics(CollectorRegistry(), buckets=(1, 8))
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            partial(serve_http, metrics=metrics, readiness=readiness, **kwargs),
            ("127.0.0.1", 0),
        )
        yield port
        tg.cancel_scope.cancel()


async def raw(port: int, request: bytes, *, eof: bool = True) -> bytes:
    """Sends raw bytes (then EOF) and returns everything the server sends until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        if request:
            await s.send(request)
        if eof:
            await s.send_eof()
        chunks = []
        with anyio.fail_after(5):
            while True:
                try:
                    chunks.append(await s.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return b"".join(chunks)


async def get(
    port: int, path: str, method: str = "GET", headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    reply = await raw(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body) or method == "HEAD"
    return int(status_line.split(" ")[1]), headers, body


async def test_metrics_endpoint_parses_as_prometheus_text() -> None:
    m = Metrics(CollectorRegistry(), buckets=(1, 8))
    m.received("tcp", 4)
    async with server(metrics=m) as port:
        status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert headers["connection"] == "close"
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"enactive_frames_received", "enactive_ready", "enactive_build_info"} <= names
    assert b'enactive_frames_received_total{source="tcp"} 4.0' in body


async def test_urllib_client_in_a_thread() -> None:
    def fetch(url: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()

    async with server() as port:
        status, body = await anyio.to_thread.run_sync(fetch, f"http://127.0.0.1:{port}/healthz")
    assert (status, body) == (200, b"ok\n")


async def test_readyz_follows_the_readiness_callable() -> None:
    ready = anyio.Event()
    async with server(readiness=ready.is_set) as port:
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (503, b"not ready\n")
        ready.set()
        status, _, body = await get(port, "/readyz")
        assert (status, body) == (200, b"ready\n")


async def test_readyz_body_says_what_it_is_doing_until_ready() -> None:
    state = {"ready": False, "progress": "starting"}

    def readiness() -> bool:
        return bool(state["ready"])

    def progress() -> str:
        return str(state["progress"])

    async with server(readiness=readiness, progress=progress) as port:
        assert (await get(port, "/readyz"))[::2] == (503, b"starting\n")
        state["progress"] = "compiling: 3/8 buckets"
        assert (await get(port, "/readyz"))[::2] == (503, b"compiling: 3/8 buckets\n")
        state["ready"] = True
        assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")
        state.update(ready=False, progress="draining")
        assert (await get(port, "/readyz"))[::2] == (503, b"draining\n")
        status, headers, body = await get(port, "/readyz", method="HEAD")
        assert (status, headers["content-length"], body) == (503, "9", b"")


async def test_progress_is_one_line_and_falls_back_to_not_ready() -> None:
    def broken() -> str:
        raise RuntimeError("boom")

    async with server(readiness=lambda: False, progress=lambda: "two\nlines ") as port:
        assert (await get(port, "/readyz"))[::2] == (503, b"two lines\n")
    async with server(readiness=lambda: False, progress=broken) as port:
        assert (await get(port, "/readyz"))[::2] == (503, b"not ready\n")
        assert (await get(port, "/healthz"))[0] == 200


async def test_readiness_that_raises_means_not_ready() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    async with server(readiness=broken) as port:
        status, _, _ = await get(port, "/readyz")
        assert status == 503
        assert (await get(port, "/healthz"))[0] == 200


async def test_not_found_and_method_not_allowed() -> None:
    async with server() as port:
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/metrics/extra"))[0] == 404
        status, headers, _ = await get(port, "/metrics", method="POST")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert (await get(port, "/healthz?verbose=1"))[0] == 200


async def test_head_has_headers_but_no_body() -> None:
    async with server() as port:
        status, headers, body = await get(port, "/healthz", method="HEAD")
    assert status == 200
    assert headers["content-length"] == "3"
    assert body == b""


async def test_garbage_does_not_kill_the_server() -> None:
    async with server() as port:
        reply = await raw(port, b"\x00\xff\x16\x03garbage\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        reply = await raw(port, b"GET / HTTP/2.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 505 ")
        assert await raw(port, b"GET /metr") == b""  # client gives up half-way
        assert (await get(port, "/healthz"))[0] == 200


async def test_oversized_head_gets_431() -> None:
    async with server() as port:
        big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 100) + b"\r\n\r\n"
        reply = await raw(port, big)
        assert reply.startswith(b"HTTP/1.1 431 ")
        assert (await get(port, "/healthz"))[0] == 200


async def test_silent_client_is_cut_off_after_the_read_timeout() -> None:
    async with server(read_timeout=0.2) as port:
        with anyio.fail_after(2):
            assert await raw(port, b"", eof=False) == b""  # the server closed on us
        assert (await get(port, "/healthz"))[0] == 200


SCRAPER = "prometheus-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef012"
AUTH_FILE = f"""\
[identities.prometheus]
token = "{SCRAPER}"
metrics = true

[identities.reader]
token = "{READER}"
read = ["*"]
"""


async def test_metrics_needs_a_bearer_token_of_a_metrics_identity(tmp_path: Path) -> None:
    (tmp_path / "identities.toml").write_text(AUTH_FILE)
    m = Metrics(CollectorRegistry(), buckets=(1, 8))
    async with server(
        metrics=m, identities=load_identities(str(tmp_path / "identities.toml"))
    ) as port:
        for headers in (
            "",
            "Authorization: Bearer not-the-token-0123456789\r\n",
            f"Authorization: Basic {SCRAPER}\r\n",
            f"Authorization: Bearer {READER}\r\n",  # an identity without metrics = true
        ):
            status, got, body = await get(port, "/metrics", headers=headers)
            assert (status, body) == (401, b"unauthorized\n"), headers
            assert got["www-authenticate"].startswith("Bearer")
        assert limited(m, "unauthorized") == 4
        status, got, body = await get(
            port, "/metrics", headers=f"authorization: bearer {SCRAPER}\r\n"
        )
        assert status == 200 and b"enactive_ready" in body
        # The probes reveal nothing and stay open.
        assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")
        assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")
    assert limited(m, "unauthorized") == 4


def limited(m: Metrics, reason: str) -> float:
    labels = {"listener": "metrics.listen", "reason": reason}
    return m.registry.get_sample_value("enactive_connections_limited_total", labels) or 0.0


class HugeMetrics(Metrics):
    """A `/metrics` body far larger than the socket buffers: a client that sends its
    request and never reads holds its connection slot until the read timeout."""

    def exposition(self) -> bytes:
        return b"# padding\n" * 3_000_000


@asynccontextmanager
async def stuck_scrape(port: int) -> AsyncIterator[None]:
    """A connection whose `/metrics` answer is being sent and is never read."""
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        await anyio.wait_all_tasks_blocked()  # the server is blocked sending to it
        yield


async def test_a_newcomer_displaces_a_connection_still_reading_its_head() -> None:
    m = Metrics(CollectorRegistry())
    async with server(metrics=m, max_connections=1, probe_reserve=0, read_timeout=5) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as idle:
            await anyio.wait_all_tasks_blocked()  # the idle connection holds the only slot
            assert (await get(port, "/metrics"))[0] == 200
            with anyio.fail_after(2):
                assert (await idle.receive()).startswith(b"HTTP/1.1 503 ")  # displaced
    assert limited(m, "max_connections") == 1


async def test_the_reserve_serves_probes_only_and_more_get_503_at_once() -> None:
    m = HugeMetrics(CollectorRegistry())
    async with server(metrics=m, max_connections=1, probe_reserve=1, read_timeout=5) as port:
        async with stuck_scrape(port):  # the only general slot is busy answering
            assert (await get(port, "/metrics"))[::2] == (503, b"busy\n")
            assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")
            assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")
            async with await anyio.connect_tcp("127.0.0.1", port) as idle:
                await anyio.wait_all_tasks_blocked()  # it holds the reserve slot...
                assert (await get(port, "/healthz"))[0] == 200  # ...until displaced
                with anyio.fail_after(2):
                    assert (await idle.receive()).startswith(b"HTTP/1.1 503 ")
    assert limited(m, "max_connections") == 2
    async with server(metrics=m, max_connections=1, probe_reserve=0, read_timeout=5) as port:
        async with stuck_scrape(port):
            started = time.perf_counter()
            assert (await get(port, "/healthz"))[::2] == (503, b"busy\n")  # over every cap
            assert time.perf_counter() - started < 1.0
    assert limited(m, "max_connections") == 3


async def test_accept_errors_are_counted_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of file descriptors: `accept()` fails with EMFILE a few times, then works."""
    failures = 3

    class Exhausted(SocketListener):
        def __init__(self, inner: SocketListener) -> None:
            self.inner = inner

        @property
        def _raw_socket(self):  # type: ignore[no-untyped-def]
            return self.inner._raw_socket

        async def accept(self) -> SocketStream:
            nonlocal failures
            if failures:
                failures -= 1
                await anyio.lowlevel.checkpoint()
                raise OSError(errno.EMFILE, "Too many open files")
            return await self.inner.accept()

        async def aclose(self) -> None:
            await self.inner.aclose()

    real_listen = stream.http.listen_tcp

    async def listen(what: str, host: str, port: int) -> MultiListener[SocketStream]:
        multi = await real_listen(what, host, port)
        return MultiListener([Exhausted(each) for each in multi.listeners])  # type: ignore[arg-type]

    monkeypatch.setattr(stream.http, "listen_tcp", listen)
    m = Metrics(CollectorRegistry())
    async with server(metrics=m) as port:
        started = time.perf_counter()
        assert (await get(port, "/healthz"))[0] == 200
        took = time.perf_counter() - started
        assert (await get(port, "/metrics"))[0] == 200
    assert (failures, limited(m, "accept_error")) == (0, 3)
    print(f"healthz answered {took * 1e3:.0f} ms after 3 EMFILE accept failures")


async def test_a_trickling_head_is_cut_at_the_header_deadline() -> None:
    m = Metrics(CollectorRegistry())
    async with server(metrics=m, header_timeout=0.3, read_timeout=5) as port:

        async def trickle(held: list[float]) -> None:
            started = time.perf_counter()
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                with anyio.fail_after(3):
                    for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                        try:
                            await s.send(bytes([byte]))
                            with anyio.move_on_after(0.05):
                                assert await s.receive() == b""  # never an answer
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
            held.append(time.perf_counter() - started)

        held: list[float] = []
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(trickle, held)
        assert (await get(port, "/healthz"))[0] == 200
    assert len(held) == 5 and all(0.25 < t < 2.0 for t in held), held
    assert limited(m, "header_timeout") == 5
    print(f"5 trickling heads cut after {min(held):.2f}-{max(held):.2f} s (deadline 0.3 s)")


async def slowloris(port: int, until: float, interval: float, cuts: list[int]) -> None:
    """One attacker: sends a request head a byte per `interval`; reconnects when cut."""
    head = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    while anyio.current_time() < until:
        try:
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                for byte in head:
                    if anyio.current_time() >= until:
                        return
                    await s.send(bytes([byte]))
                    with anyio.move_on_after(interval):
                        await s.receive()  # an answer (503) or the end: cut
                        break
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        cuts[0] += 1


async def test_probes_and_scrapes_are_answered_under_slowloris() -> None:
    n, attack_s = 300, 3.0
    m = Metrics(CollectorRegistry())
    async with server(metrics=m, header_timeout=1.0) as port:
        cuts = [0]
        latencies: dict[str, list[float]] = {"/healthz": [], "/metrics": []}
        async with anyio.create_task_group() as tg:
            until = anyio.current_time() + attack_s
            for _ in range(n):
                tg.start_soon(slowloris, port, until, 0.25, cuts)
            await anyio.sleep(0.5)  # every attacker has connected
            while anyio.current_time() < until - 0.2:
                for path, took in latencies.items():
                    started = time.perf_counter()
                    with anyio.fail_after(2):
                        status, _, _ = await get(port, path)
                    took.append(time.perf_counter() - started)
                    assert status == 200, path
                await anyio.sleep(0.1)
    worst = {path: max(took) * 1e3 for path, took in latencies.items()}
    cut = limited(m, "max_connections") + limited(m, "header_timeout")
    assert cut >= n - 64 and cuts[0] >= n - 64
    print(
        f"{n} slow connections: healthz answered {len(latencies['/healthz'])}/"
        f"{len(latencies['/healthz'])} times, worst {worst['/healthz']:.0f} ms; metrics "
        f"worst {worst['/metrics']:.0f} ms; {cut:.0f} slow connections cut and counted"
    )


async def test_port_zero_reports_the_bound_port() -> None:
    async with server() as port:
        assert 0 < port < 65536
        status, _, _ = await get(port, "/healthz")
        assert status == 200


async def test_positional_arguments_work_with_tg_start() -> None:
    m = Metrics(CollectorRegistry())
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, ("127.0.0.1", 0), m, lambda: False)
        assert (await get(port, "/readyz"))[0] == 503
        tg.cancel_scope.cancel()
