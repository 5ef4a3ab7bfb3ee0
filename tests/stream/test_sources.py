"""TCP and UDP ingest over real loopback sockets, into a recording `Ingest`."""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable

import anyio
import numpy as np
import pytest
from anyio.abc import SocketStream

from stream.admission import Admission
from stream.buffers import WeightedBuffer
from stream.commits import CommitLog
from stream.events import Listener
from stream.ingest import Ingest, Item
from stream.net import ConnectionLimits
from stream.protocol import (
    SESSION_START,
    Dims,
    Frame,
    FrameRun,
    ReplyReader,
    encode_frame,
    encode_json_frame,
)
from stream.sources import serve_tcp, serve_udp
from stream.streams import StreamTable

DIMS = Dims(4, 3, 2, 2)
HOST = "127.0.0.1"


class Recorder(Listener):
    """An `Ingest` over a buffer that records every event a source reports."""

    def __init__(self, capacity: int = 10_000, max_frame_bytes: int = 4096) -> None:
        self.buffer: WeightedBuffer[Item] = WeightedBuffer(capacity)
        self._taken: list[Frame] = []  # received, not returned by `frames()` yet
        self.counts: collections.Counter[str] = collections.Counter()
        self.reasons: list[tuple[str, str]] = []
        self.drops: collections.Counter[str] = collections.Counter()
        self.limits: list[tuple[str, str]] = []
        self._changed = anyio.Event()
        self.ingest = Ingest(self.buffer, dims=DIMS, max_frame_bytes=max_frame_bytes, events=self)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.buffer.close()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def received(self, source: str, n: int) -> None:
        self.counts[source] += n
        self._touch()

    def rejected(self, source: str, reason: str) -> None:
        self.reasons.append((source, reason))
        self._touch()

    def dropped(self, reason: str, n: int) -> None:
        self.drops[reason] += n
        self._touch()

    def limited(self, listener: str, reason: str) -> None:
        self.limits.append((listener, reason))
        self._touch()

    async def until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    async def frames(self, n: int, within: float = 5.0) -> list[Frame]:
        """The next `n` frames off the stream (runs taken apart), as the batcher takes them."""
        with anyio.fail_after(within):
            while len(self._taken) < n:
                item = await self.buffer.get()
                self._taken += item.frames() if isinstance(item, FrameRun) else [item]
        out, self._taken = self._taken[:n], self._taken[n:]
        return out


def payload(seq: int) -> dict[str, np.ndarray]:
    base = np.arange(DIMS.total, dtype=np.float32) + seq
    return {"sensory": base[:4], "proprio": base[4:7], "tactile": base[7:9], "motor": base[9:]}


def frame_bytes(stream_id: str, seq: int) -> bytes:
    return encode_frame(stream_id, seq, seq * 0.01, **payload(seq))


def json_line(stream_id: str, seq: int) -> bytes:
    return encode_json_frame(stream_id, seq, seq * 0.01, **payload(seq))


async def read_until_closed(stream: SocketStream, within: float = 5.0) -> bytes:
    data = b""
    with anyio.fail_after(within):
        try:
            while True:
                data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


@pytest.fixture
async def tcp() -> AsyncIterator[tuple[Recorder, int]]:
    with Recorder() as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_tcp, rec.ingest, (HOST, 0))
            yield rec, port
            tg.cancel_scope.cancel()


async def test_tcp_binary_frames_arrive_in_order_per_connection(tcp: tuple[Recorder, int]):
    rec, port = tcp
    links = [await anyio.connect_tcp(HOST, port) for _ in range(3)]
    blobs = [b"".join(frame_bytes(f"s-{c}", seq) for seq in range(1, 21)) for c in range(3)]
    # Connection 0 in 7-byte pieces (frames split anywhere), the others in one write.
    for i in range(0, len(blobs[0]), 7):
        await links[0].send(blobs[0][i : i + 7])
    for link, blob in zip(links[1:], blobs[1:], strict=True):
        await link.send(blob)
    frames = await rec.frames(60)
    by_stream: dict[str, list[int]] = collections.defaultdict(list)
    for f in frames:
        by_stream[f.stream_id].append(f.seq)
        assert f.source == "tcp"
        assert f.received_ns > 0
        np.testing.assert_array_equal(f.payload, np.arange(DIMS.total, dtype=np.float32) + f.seq)
    assert by_stream == {f"s-{c}": list(range(1, 21)) for c in range(3)}
    assert rec.counts == {"tcp": 60}
    assert rec.reasons == []
    for link in links:
        await link.aclose()


async def test_tcp_json_connection_gets_error_replies_and_stays_usable(tcp: tuple[Recorder, int]):
    rec, port = tcp
    async with await anyio.connect_tcp(HOST, port) as link:
        bad_dims = json.dumps({"stream": "j", "seq": 3, "t": 0.0, "motor": [1.0]}).encode()
        await link.send(json_line("j", 1) + b"not json\n" + bad_dims + b"\n" + json_line("j", 2))
        frames = await rec.frames(2)
        assert [(f.stream_id, f.seq, f.source) for f in frames] == [
            ("j", 1, "json"),
            ("j", 2, "json"),
        ]
        replies = b""
        with anyio.fail_after(5):
            while replies.count(b"\n") < 2:
                replies += await link.receive()
        first, second = (json.loads(line) for line in replies.splitlines())
        assert first["error"] == "bad_json" and first["detail"]
        assert set(first) == {"error", "detail", "stream", "seq"}
        assert second["error"] == "dim_mismatch"
        assert rec.reasons == [("json", "bad_json"), ("json", "dim_mismatch")]
        assert rec.counts == {"json": 4}
        await link.send(json_line("j", 3))  # still open and decoding
        assert (await rec.frames(1))[0].seq == 3


async def test_tcp_json_error_reply_names_the_frames_stream_and_seq(tcp: tuple[Recorder, int]):
    _, port = tcp
    wrong_dims = {"stream": "arm-1", "seq": 7, "t": 0.0, "motor": [1.0]}  # motor has 2
    async with await anyio.connect_tcp(HOST, port) as link:
        await link.send(json.dumps(wrong_dims).encode() + b"\n" + b"not json\n")
        replies = b""
        with anyio.fail_after(5):
            while replies.count(b"\n") < 2:
                replies += await link.receive()
    named, unknown = (json.loads(line) for line in replies.splitlines())
    assert named == {
        "error": "dim_mismatch",
        "detail": "len(motor)=1, expected 2",
        "stream": "arm-1",
        "seq": 7,
    }
    assert (unknown["error"], unknown["stream"], unknown["seq"]) == ("bad_json", None, None)


async def test_tcp_binary_sender_that_asks_gets_reply_records_for_every_rejection() -> None:
    # With admission, the seq check's rejections are answered too; after the sender
    # half-closes, the daemon answers what it read and closes: every reply is there.
    buffer: WeightedBuffer[Item] = WeightedBuffer(1000)
    events = Listener()
    admission = Admission(StreamTable(8, 8), events, CommitLog(lambda s, p: None))
    ingest = Ingest(buffer, dims=DIMS, max_frame_bytes=4096, events=events, admission=admission)
    good = encode_frame("b", 5, 0.0, reply=True, **payload(5))
    stale = encode_frame("b", 4, 0.0, reply=True, **payload(4))
    wrong = encode_frame("b", 6, 0.0, reply=True, motor=[1.0])  # motor has 2
    restart = encode_frame("b", 1, 0.0, reply=True, start=True, **payload(1))
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_tcp, ingest, (HOST, 0))
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(good + stale + wrong + restart + good)
            await link.send_eof()
            data = b""
            with anyio.fail_after(5):
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        data += await link.receive()
        tg.cancel_scope.cancel()
    replies = ReplyReader().feed(data)
    assert [(r.reason, r.stream_id, r.seq) for r in replies] == [
        ("stale_seq", "b", 4),
        ("dim_mismatch", "b", 6),
    ]
    taken = [buffer.get_nowait() for _ in range(len(buffer))]
    assert [(f.seq, bool(f.present & SESSION_START)) for f in taken] == [  # type: ignore[union-attr]
        (5, False),
        (1, True),
        (5, False),
    ]


async def test_tcp_one_frame_from_each_of_many_connections_goes_over_as_runs():
    # A fleet: 30 connections each sending one frame per send. What one pass of the poller
    # reads alone from each is decoded together: runs across connections, the same frames
    # as one by one; a bad frame among them is rejected alone, a sender that reads
    # replies still gets its own.
    with Recorder() as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_tcp, rec.ingest, (HOST, 0))
            links = [await anyio.connect_tcp(HOST, port) for _ in range(30)]
            for i, link in enumerate(links):  # a first frame each: the connection's language
                await link.send(frame_bytes(f"s{i}", 1))
            await rec.until(lambda: rec.counts["tcp"] == 30)
            first = await rec.frames(30)
            assert sorted(f.stream_id for f in first) == sorted(f"s{i}" for i in range(30))
            items: list[Item] = []
            for seq in range(2, 6):
                for i, link in enumerate(links):
                    if (i, seq) == (7, 3):  # NaN in a payload: rejected, counted, unanswered
                        await link.send(encode_frame("s7", 3, 0.0, sensory=[np.nan] * 4))
                    elif (i, seq) == (9, 4):  # asks for replies: that one is answered
                        await link.send(encode_frame("s9", 4, 0.0, reply=True, motor=[1.0]))
                    else:
                        await link.send(frame_bytes(f"s{i}", seq))
                await rec.until(lambda seq=seq: rec.counts["tcp"] == 30 * seq)
                while len(rec.buffer):
                    items.append(rec.buffer.get_nowait())
            reply = await links[9].receive()
            for link in links:
                await link.aclose()
            tg.cancel_scope.cancel()
    runs = [item for item in items if isinstance(item, FrameRun)]
    assert runs and max(len(set(run.stream_ids)) for run in runs) >= 10  # across connections
    got = [f for item in items for f in (item.frames() if isinstance(item, FrameRun) else [item])]
    by_stream: dict[str, list[int]] = collections.defaultdict(list)
    for f in got:
        by_stream[f.stream_id].append(f.seq)
        assert f.source == "tcp"
        np.testing.assert_array_equal(f.payload, np.arange(DIMS.total, dtype=np.float32) + f.seq)
    expected = {f"s{i}": [2, 3, 4, 5] for i in range(30)}
    expected["s7"], expected["s9"] = [2, 4, 5], [2, 3, 5]
    assert by_stream == expected
    assert sorted(rec.reasons) == [("tcp", "dim_mismatch"), ("tcp", "non_finite")]
    assert [(r.reason, r.stream_id, r.seq) for r in ReplyReader().feed(reply)] == [
        ("dim_mismatch", "s9", 4)
    ]


async def test_tcp_binary_sender_that_does_not_ask_is_never_written_to(
    tcp: tuple[Recorder, int],
):
    rec, port = tcp
    async with await anyio.connect_tcp(HOST, port) as link:
        await link.send(encode_frame("b", 1, 0.0, motor=[1.0]) + frame_bytes("b", 2))
        await link.send_eof()
        with anyio.fail_after(5):
            with pytest.raises(anyio.EndOfStream):  # closed without a byte
                await link.receive()
    assert rec.reasons == [("tcp", "dim_mismatch")]


async def test_tcp_json_client_that_reads_gets_every_reply(tcp: tuple[Recorder, int]):
    rec, port = tcp
    async with await anyio.connect_tcp(HOST, port) as link:
        await link.send(b'{"stream": "j", "seq": 1}\n' * 2000)  # more than the reply queue
        replies = b""
        with anyio.fail_after(5):
            while replies.count(b"\n") < 2000:
                replies += await link.receive()
        assert {json.loads(line)["error"] for line in replies.splitlines()} == {"bad_json"}
        assert len(rec.reasons) == 2000


async def test_tcp_json_client_that_never_reads_replies_is_not_blocked(
    tcp: tuple[Recorder, int],
):
    rec, port = tcp
    async with await anyio.connect_tcp(HOST, port) as link:
        bad = b'{"stream": "j", "seq": 1}\n' * 20_000  # 20,000 replies of ~90 bytes, unread
        await link.send(bad + json_line("j", 2))
        assert (await rec.frames(1, within=5))[0].seq == 2
        assert len(rec.reasons) == 20_000


async def test_tcp_frames_read_before_a_framing_error_are_all_handed_over(
    tcp: tuple[Recorder, int],
):
    rec, port = tcp
    async with await anyio.connect_tcp(HOST, port) as link:
        good = b"".join(frame_bytes("v", seq) for seq in range(1, 11))
        await link.send(good + b"garbage!" * 8)  # one write: ten frames, then no framing
        frames = await rec.frames(10)
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await link.receive()  # and the connection is closed
    assert [f.seq for f in frames] == list(range(1, 11))
    assert rec.counts == {"tcp": 11} and rec.reasons == [("tcp", "bad_magic")]


async def test_tcp_bad_magic_closes_only_that_connection(tcp: tuple[Recorder, int]):
    rec, port = tcp
    good = await anyio.connect_tcp(HOST, port)
    bad = await anyio.connect_tcp(HOST, port)
    await good.send(frame_bytes("good", 1))
    await bad.send(frame_bytes("bad", 1))
    frames = await rec.frames(2)
    await bad.send(b"XXXX" + bytes(60))
    assert await read_until_closed(bad) == b""  # closed, and binary clients get no replies
    await rec.until(lambda: ("tcp", "bad_magic") in rec.reasons)
    await good.send(frame_bytes("good", 2))
    frames += await rec.frames(1)
    assert sorted((f.stream_id, f.seq) for f in frames) == [("bad", 1), ("good", 1), ("good", 2)]
    assert rec.counts == {"tcp": 4}
    assert rec.reasons == [("tcp", "bad_magic")]
    await good.aclose()
    await bad.aclose()


async def test_tcp_reset_connection_does_not_disturb_the_server(tcp: tuple[Recorder, int]):
    rec, port = tcp
    broken = await anyio.connect_tcp(HOST, port)
    await broken.send(frame_bytes("x", 1)[:20])  # half a frame, then a reset
    raw = broken.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await broken.aclose()
    async with await anyio.connect_tcp(HOST, port) as link:
        await link.send(frame_bytes("y", 1))
        assert (await rec.frames(1))[0].stream_id == "y"


async def test_tcp_block_policy_loses_nothing_when_the_pipeline_is_full():
    with Recorder(capacity=1) as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_tcp, rec.ingest, (HOST, 0))
            async with await anyio.connect_tcp(HOST, port) as link:
                await link.send(b"".join(frame_bytes("s", seq) for seq in range(1, 301)))
                frames = await rec.frames(300)
            assert [f.seq for f in frames] == list(range(1, 301))
            assert rec.drops == {}
            tg.cancel_scope.cancel()


async def test_tcp_many_connections_waiting_for_room_lose_nothing_and_keep_order():
    # 40 sensors, one stream each, against a pipeline that holds 2 frames: each connection
    # stops being read while it waits for room, then is read again.
    with Recorder(capacity=2) as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_tcp, rec.ingest, (HOST, 0))
            links = [await anyio.connect_tcp(HOST, port) for _ in range(40)]
            for seq in range(1, 11):
                for i, link in enumerate(links):
                    await link.send(frame_bytes(f"s{i}", seq))
            frames = await rec.frames(400, within=20)
            by_stream: dict[str, list[int]] = {}
            for f in frames:
                by_stream.setdefault(f.stream_id, []).append(f.seq)
            assert by_stream == {f"s{i}": list(range(1, 11)) for i in range(40)}
            assert rec.counts["tcp"] == 400 and rec.drops == {}
            await links[0].send(frame_bytes("late", 1))  # and they are read as before
            assert (await rec.frames(1))[0].stream_id == "late"
            for link in links:
                await link.aclose()
            tg.cancel_scope.cancel()


async def test_tcp_frames_read_while_waiting_for_room_are_handed_over_at_stop():
    with Recorder(capacity=1) as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_tcp, rec.ingest, (HOST, 0))
            link = await anyio.connect_tcp(HOST, port)
            await link.send(frame_bytes("s", 1))
            await rec.until(lambda: rec.counts["tcp"] == 1)  # the pipeline is full now
            await link.send(b"".join(frame_bytes("s", seq) for seq in range(2, 201)))
            await rec.until(lambda: rec.counts["tcp"] == 200)  # read, waiting for room
            rec.ingest.stop()
            frames = await rec.frames(200)  # what it read is handed over ...
            assert [f.seq for f in frames] == list(range(1, 201))
            assert await read_until_closed(link) == b""  # ... then it ends
            await link.aclose()
            tg.cancel_scope.cancel()


async def test_tcp_stops_reading_and_accepting_once_not_accepting(tcp: tuple[Recorder, int]):
    rec, port = tcp
    link = await anyio.connect_tcp(HOST, port)
    await link.send(frame_bytes("s", 1))
    await rec.frames(1)
    rec.ingest.stop()
    assert await read_until_closed(link) == b""  # closed by the server
    await link.aclose()
    with pytest.raises(OSError):
        await anyio.connect_tcp(HOST, port)


@pytest.fixture
async def udp() -> AsyncIterator[tuple[Recorder, int]]:
    with Recorder() as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(lambda **kw: serve_udp(rec.ingest, (HOST, 0), buffer=64, **kw))
            yield rec, port
            tg.cancel_scope.cancel()


async def test_udp_binary_and_json_datagrams_arrive(udp: tuple[Recorder, int]):
    rec, port = udp
    async with await anyio.create_connected_udp_socket(HOST, port) as sock:
        await sock.send(frame_bytes("b", 1))
        await sock.send(json_line("j", 1))
        await sock.send(b"garbage!")
        await sock.send(frame_bytes("b", 2))
        frames = await rec.frames(3)
    assert [(f.stream_id, f.seq, f.source) for f in frames] == [
        ("b", 1, "udp"),
        ("j", 1, "udp"),
        ("b", 2, "udp"),
    ]
    np.testing.assert_array_equal(frames[1].payload, np.arange(DIMS.total, dtype=np.float32) + 1)
    await rec.until(lambda: rec.counts["udp"] == 4)
    assert rec.reasons == [("udp", "bad_magic")]


async def test_udp_like_datagrams_go_over_as_runs_and_a_bad_one_alone(udp: tuple[Recorder, int]):
    rec, port = udp
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        datagrams = [frame_bytes(f"u{i % 5}", 1 + i // 5) for i in range(40)]
        datagrams[23] = encode_frame("u3", 5, 0.0, sensory=[np.nan] * 4)
        for data in datagrams:  # sent while the event loop is not reading: one backlog
            sock.sendto(data, (HOST, port))
        await rec.until(lambda: rec.counts["udp"] == 40)
    items = []
    with anyio.fail_after(5):
        while sum(len(i) if isinstance(i, FrameRun) else 1 for i in items) < 39:
            items.append(await rec.buffer.get())
    assert any(isinstance(item, FrameRun) and len(item) >= 8 for item in items)
    got = [f for item in items for f in (item.frames() if isinstance(item, FrameRun) else [item])]
    assert [(f.stream_id, f.seq) for f in got] == [
        (f"u{i % 5}", 1 + i // 5) for i in range(40) if i != 23
    ]
    assert rec.reasons == [("udp", "non_finite")]


async def test_udp_overload_drops_the_oldest_and_counts_it():
    with Recorder(capacity=1) as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(lambda **kw: serve_udp(rec.ingest, (HOST, 0), buffer=4, **kw))
            async with await anyio.create_connected_udp_socket(HOST, port) as sock:
                for seq in range(1, 11):
                    await sock.send(frame_bytes("u", seq))
            await rec.until(lambda: rec.counts["udp"] == 10)
            await anyio.wait_all_tasks_blocked()
            dropped = rec.drops["overload"]
            # 1 in the stream, 1 held by the blocked pump, 4 in the ring: at least 4 dropped.
            assert 4 <= dropped <= 9
            frames = await rec.frames(10 - dropped)
            seqs = [f.seq for f in frames]
            assert seqs == sorted(seqs) and seqs[-1] == 10  # the newest survive, in order
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.WouldBlock):
                rec.buffer.get_nowait()
            assert rec.reasons == []
            tg.cancel_scope.cancel()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_RXQ_OVFL is Linux's")
async def test_udp_datagrams_the_kernel_drops_are_counted_too():
    with Recorder(capacity=100_000) as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda **kw: serve_udp(rec.ingest, (HOST, 0), buffer=100_000, **kw)
            )
            sent = 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                # The event loop is busy with this burst, not reading: the kernel's receive
                # buffer (4 MiB at most) overflows with 20 MiB of datagrams.
                for seq in range(1, 30_001):
                    sock.sendto(frame_bytes("k", seq) + bytes(600), (HOST, port))
                    sent += 1
            # Every datagram is counted once the reader ran dry, those dropped at the end
            # of the burst too (no later datagram has to bring the kernel's count).
            await rec.until(lambda: rec.counts["udp"] == sent, within=10)
            assert rec.drops["overload"] > 0  # the kernel dropped some, and they count
            tg.cancel_scope.cancel()


async def test_ingest_bounds_its_buffer_in_frames_not_items():
    buffer: WeightedBuffer[Item] = WeightedBuffer(4)
    ingest = Ingest(buffer, dims=DIMS, max_frame_bytes=4096, events=Listener())
    one = Frame("s", 1, 0.0, np.zeros(DIMS.total, np.float32), 15, 0, "tcp")
    run = FrameRun(["a", "b", "c"], [1, 1, 1], np.zeros(3), np.zeros((3, DIMS.total)), 15, 0, "tcp")
    assert ingest.put_nowait(run) == () and buffer.weight == 3  # taken, nothing rejected
    assert ingest.put_nowait(one) == () and buffer.weight == 4
    assert ingest.put_nowait(one) is None  # full: nothing taken, nothing counted
    assert len(buffer) == 2
    async with anyio.create_task_group() as tg:
        tg.start_soon(ingest.put, one)
        await anyio.wait_all_tasks_blocked()
        assert len(buffer) == 2  # waiting for room
        assert buffer.get_nowait() is run
    assert buffer.weight == 2 and len(buffer) == 2


async def closed_by_peer(link: SocketStream, within: float = 5.0) -> bool:
    """Read until the daemon closes the connection; True once it has."""
    with anyio.fail_after(within):
        try:
            while await link.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True
    return False


async def test_tcp_connections_over_the_limit_are_refused_and_counted():
    limits = ConnectionLimits(max_connections=3, max_per_address=2)
    with Recorder() as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: serve_tcp(
                    rec.ingest, (HOST, 0), limits=limits, task_status=task_status
                )
            )
            first = await anyio.connect_tcp(HOST, port)
            second = await anyio.connect_tcp(HOST, port)
            await first.send(frame_bytes("a", 1))
            await second.send(frame_bytes("b", 1))
            await rec.frames(2)  # both let in (and so counted open)
            third = await anyio.connect_tcp(HOST, port)  # a third from 127.0.0.1
            assert await closed_by_peer(third)
            assert rec.limits == [("ingest.tcp", "max_per_address")]
            await first.send(frame_bytes("a", 2))  # the others are untouched
            assert (await rec.frames(1))[0].seq == 2
            await first.send_eof()
            assert await closed_by_peer(first)  # the daemon has closed its side (and let go)
            again = await anyio.connect_tcp(HOST, port)  # room again once one closed
            await again.send(frame_bytes("c", 1))
            assert (await rec.frames(1))[0].stream_id == "c"
            for link in (first, second, third, again):
                await link.aclose()
            tg.cancel_scope.cancel()


async def test_tcp_idle_and_trickling_connections_are_closed_and_counted():
    limits = ConnectionLimits(idle_timeout_s=0.3, frame_timeout_s=0.3)
    with Recorder() as rec:
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: serve_tcp(
                    rec.ingest, (HOST, 0), limits=limits, task_status=task_status
                )
            )
            idle = await anyio.connect_tcp(HOST, port)
            await idle.send(frame_bytes("i", 1))
            assert await closed_by_peer(idle)  # sent nothing more for 0.3 s
            trickle = await anyio.connect_tcp(HOST, port)
            frame = frame_bytes("t", 1)
            with anyio.fail_after(5):
                try:
                    for byte in frame[:-1]:  # a byte every 50 ms: never idle, never done
                        await trickle.send(bytes([byte]))
                        await anyio.sleep(0.05)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            assert await closed_by_peer(trickle)
            assert sorted(reason for _, reason in rec.limits) == ["frame_timeout", "idle_timeout"]
            assert [f.stream_id for f in await rec.frames(1)] == ["i"]
            await idle.aclose()
            await trickle.aclose()
            tg.cancel_scope.cancel()
