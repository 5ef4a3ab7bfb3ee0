"""The `send` client against a real `serve_tcp` / `serve_udp`."""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
from collections.abc import AsyncIterator

import anyio
import numpy as np
import pytest

from stream.buffers import WeightedBuffer
from stream.events import Listener
from stream.ingest import Ingest, Item
from stream.protocol import Dims, Frame, FrameReader, FrameRun
from stream.send import SendError, run_sender, send
from stream.sources import serve_tcp, serve_udp
from stream.synthetic import SyntheticBodies

DIMS = Dims(6, 5, 4, 3)
HOST = "127.0.0.1"


async def collect(transport: str, **kwargs: object) -> tuple[list[Frame], collections.Counter]:
    """Run the sender against a real source; every frame and the received counts."""
    buffer: WeightedBuffer[Item] = WeightedBuffer(100_000)
    received: collections.Counter[str] = collections.Counter()

    class Counts(Listener):
        def received(self, source: str, n: int) -> None:
            received.update({source: n})

        def rejected(self, source: str, reason: str) -> None:
            pytest.fail(f"rejected: {source} {reason}")

    ingest = Ingest(buffer, dims=DIMS, max_frame_bytes=4096, events=Counts())
    async with anyio.create_task_group() as tg:
        if transport == "udp":
            port = await tg.start(lambda **kw: serve_udp(ingest, (HOST, 0), buffer=1000, **kw))
        else:
            port = await tg.start(serve_tcp, ingest, (HOST, 0))
        options: dict = {"streams": 3, "rate_hz": 200.0, "duration_s": 0.05} | kwargs
        report = await run_sender(HOST, port, transport=transport, dims=DIMS, **options)  # type: ignore[arg-type]
        assert report.ticks == 10
        assert report.frames == 10 * options["streams"]
        frames: list[Frame] = []
        with anyio.fail_after(5):
            while len(frames) < report.frames:
                item = await buffer.get()
                frames += item.frames() if isinstance(item, FrameRun) else [item]
        tg.cancel_scope.cancel()
    return frames, received


def check(frames: list[Frame], streams: int, prefix: str = "sim") -> None:
    by_stream: dict[str, list[Frame]] = collections.defaultdict(list)
    for f in frames:
        by_stream[f.stream_id].append(f)
    assert sorted(by_stream) == [f"{prefix}-{i:04d}" for i in range(streams)]
    bodies = SyntheticBodies(streams, DIMS, seed=0, prefix=prefix, dt=1 / 200)
    for i, sid in enumerate(sorted(by_stream)):
        got = by_stream[sid]
        assert [f.seq for f in got] == list(range(1, 11))
        np.testing.assert_allclose([f.timestamp for f in got], np.arange(10) / 200)
        np.testing.assert_allclose(got[3].payload, bodies.tick(3 / 200)[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("connections", [1, 2, 5])
async def test_tcp_delivers_every_frame_over_several_connections(connections: int):
    frames, received = await collect("tcp", streams=4, connections=connections)
    check(frames, 4)
    assert received == {"tcp": 40}


async def test_json_lines_transport():
    frames, received = await collect("json", prefix="arm")
    check(frames, 3, prefix="arm")
    assert received == {"json": 30}
    assert {f.source for f in frames} == {"json"}


async def test_udp_transport():
    frames, received = await collect("udp")
    check(frames, 3)
    assert received == {"udp": 30}


async def test_report_counts_bytes_and_time():
    async with await anyio.create_tcp_listener(local_host=HOST, local_port=0) as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        sizes: list[int] = []

        async def drain(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                try:
                    while True:
                        sizes.append(len(await stream.receive()))
                except anyio.EndOfStream:
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, drain)
            report = await run_sender(
                HOST, port, streams=2, rate_hz=100.0, duration_s=0.1, transport="tcp", dims=DIMS
            )
            tg.cancel_scope.cancel()
    assert report.ticks == 10 and report.frames == 20
    frame_size = 40 + 8 + 4 * DIMS.total  # header, "sim-0000", payload
    assert report.bytes == sum(sizes) == 20 * frame_size
    assert 0.085 <= report.elapsed_s < 2.0  # the last tick is due at 90 ms
    assert report.frames_per_s == pytest.approx(20 / report.elapsed_s)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="streams"):
        send(HOST, 1, streams=0, rate_hz=1.0, duration_s=1.0, transport="tcp", dims=DIMS)
    with pytest.raises(ValueError, match="transport"):
        send(HOST, 1, streams=1, rate_hz=1.0, duration_s=1.0, transport="xml", dims=DIMS)  # type: ignore[arg-type]
    one = {"streams": 1, "rate_hz": 1.0, "duration_s": 1.0, "dims": DIMS}
    with pytest.raises(ValueError, match="UDP carries no TLS and no token"):
        send(HOST, 1, transport="udp", token="a-token-0123456789", **one)  # type: ignore[arg-type]
    for token in ("", "two words-0123456789", "line\nbreak-0123456789"):
        with pytest.raises(ValueError, match="printable ASCII, without spaces"):
            send(HOST, 1, transport="tcp", token=token, **one)  # type: ignore[arg-type]


def test_sync_wrapper_sends_to_a_plain_socket_server():
    with socket.create_server((HOST, 0)) as server:
        port = server.getsockname()[1]
        frames: list[Frame] = []

        def accept() -> None:
            conn, _ = server.accept()
            reader = FrameReader(DIMS)
            with conn:
                while data := conn.recv(65536):
                    frames.extend(f for f in reader.feed(data, 0) if isinstance(f, Frame))

        thread = threading.Thread(target=accept)
        thread.start()
        report = send(
            HOST, port, streams=2, rate_hz=500.0, duration_s=0.01, transport="tcp", dims=DIMS
        )
        thread.join(timeout=5)
    assert report.frames == 10 and len(frames) == 10
    assert sorted((f.stream_id, f.seq) for f in frames)[:2] == [("sim-0000", 1), ("sim-0000", 2)]


@contextlib.asynccontextmanager
async def closing_server(reply: list[bytes]) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A listener that reads a connection's first bytes (into the list), writes `reply`
    piece by piece and closes it, as the daemon does when it refuses credentials."""
    got: list[bytes] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            got.append(await stream.receive())
            for piece in reply:
                await stream.send(piece)
                await anyio.sleep(0.01)

    async with await anyio.create_tcp_listener(local_host=HOST, local_port=0) as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            yield listener.extra(anyio.abc.SocketAttribute.local_port), got
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["tcp", "json"])
async def test_a_refused_token_is_a_send_error_not_replies(transport: str):
    async with closing_server([b"E", b"RR unauth", b"orized\n"]) as (port, got):
        with pytest.raises(SendError, match="refused the credentials: ERR unauthorized") as e:
            await run_sender(
                HOST, port, streams=2, rate_hz=20.0, duration_s=0.5, transport=transport,  # type: ignore[arg-type]
                dims=DIMS, token="a-token-0123456789",
            )  # fmt: skip
    assert e.value.refused == "ERR unauthorized"
    assert got[0].startswith(b"AUTH a-token-0123456789\n")


async def test_a_connection_closed_before_the_last_frame_is_a_send_error():
    async with closing_server([]) as (port, got):  # reads the first bytes, then closes
        with pytest.raises(SendError, match="closed the connection before the last frame"):
            await run_sender(
                HOST, port, streams=1, rate_hz=20.0, duration_s=0.5, transport="tcp", dims=DIMS
            )
    assert got[0].startswith(b"ESF1")
