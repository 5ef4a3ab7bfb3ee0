"""Moment sinks: TCP subscribers over real sockets, JSON-lines file and stdout."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import numpy as np
import pytest
from anyio.abc import SocketStream

from stream.events import Listener
from stream.net import ConnectionLimits
from stream.protocol import (
    Moment,
    MomentBatch,
    MomentReader,
    MomentSizes,
    encode_moment,
    moment_to_json,
)
from stream.security import UNAUTHORIZED_REPLY, load_identities
from stream.sinks import EncodingCache, JsonlSink, StdoutSink, SubscriberServer
from stream.sinks.routing import DEAD_SLACK, Router

HOST = "127.0.0.1"
SIZES = MomentSizes(4, 3, 2, 2)


def moment(stream_id: str, seq: int, sizes: MomentSizes = SIZES) -> Moment:
    values = np.arange(sizes.total, dtype=np.float32) * 0.5 + seq
    return Moment(stream_id, seq, seq * 0.01, 1000 + seq, 0, sizes, values)


def one(stream_id: str, seq: int, sizes: MomentSizes = SIZES) -> MomentBatch:
    """A batch of one moment."""
    return MomentBatch.of([moment(stream_id, seq, sizes)])


class Counts(Listener):
    """Records the sink events (`delivered[sink]`, `lost[sink, reason]`) and the subscriber
    gauge, and wakes waiters on every change."""

    def __init__(self) -> None:
        self.delivered: collections.Counter[str] = collections.Counter()
        self.lost: collections.Counter[tuple[str, str]] = collections.Counter()
        self.limits: collections.Counter[tuple[str, str]] = collections.Counter()
        self.subscribers = 0
        self._changed = anyio.Event()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def emitted(self, sink: str, n: int) -> None:
        self.delivered[sink] += n
        self._touch()

    def sink_dropped(self, sink: str, reason: str, n: int) -> None:
        self.lost[sink, reason] += n
        self._touch()

    def limited(self, listener: str, reason: str) -> None:
        self.limits[listener, reason] += 1
        self._touch()

    def on_subscribers(self, n: int) -> None:
        self.subscribers = n
        self._touch()

    async def until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()


@pytest.fixture
async def counts() -> Counts:
    return Counts()


def server(counts: Counts, **kwargs: object) -> SubscriberServer:
    options: dict = {"buffer": 16} | kwargs
    return SubscriberServer(
        (HOST, 0),
        events=counts,
        on_subscribers=counts.on_subscribers,
        **options,
    )


@pytest.fixture
async def running(counts: Counts) -> AsyncIterator[tuple[SubscriberServer, int]]:
    sink = server(counts)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        yield sink, port
        tg.cancel_scope.cancel()


async def subscribe(port: int, line: bytes, counts: Counts, n: int = 1) -> SocketStream:
    link = await anyio.connect_tcp(HOST, port)
    await link.send(line)
    await counts.until(lambda: counts.subscribers == n)
    return link


async def read_moments(link: SocketStream, n: int) -> list[Moment]:
    reader, got = MomentReader(), []
    with anyio.fail_after(5):
        while len(got) < n:
            got += reader.feed(await link.receive())
    assert reader.pending_bytes == 0
    return got


async def read_lines(link: SocketStream, n: int) -> list[dict]:
    data = b""
    with anyio.fail_after(5):
        while data.count(b"\n") < n:
            data += await link.receive()
    return [json.loads(line) for line in data.splitlines()]


async def test_binary_subscriber_gets_matching_moments_only(
    running: tuple[SubscriberServer, int], counts: Counts
):
    sink, port = running
    async with await subscribe(port, b"SUB binary arm-*\n", counts) as link:
        sink.offer(
            MomentBatch.of(
                [moment("arm-1", 1), moment("leg-1", 1), moment("arm-2", 1), moment("xarm", 1)]
            )
        )
        sink.offer(one("arm-1", 2))
        got = await read_moments(link, 3)
    assert [(m.stream_id, m.seq) for m in got] == [("arm-1", 1), ("arm-2", 1), ("arm-1", 2)]
    np.testing.assert_array_equal(got[2].values, moment("arm-1", 2).values)
    assert got[2].latency_ns == 1002 and got[2].sizes == SIZES
    await counts.until(lambda: counts.delivered["tcp"] == 3)


async def test_json_subscriber_and_binary_subscriber_side_by_side(
    running: tuple[SubscriberServer, int], counts: Counts
):
    sink, port = running
    async with (
        await subscribe(port, b"SUB json *\n", counts, 1) as as_json,
        await subscribe(port, b"SUB binary leg-?\r\n", counts, 2) as as_binary,
    ):
        sink.offer(one("arm-1", 1))
        sink.offer(one("leg-7", 4))
        lines = await read_lines(as_json, 2)
        records = await read_moments(as_binary, 1)
    assert lines == [
        json.loads(moment_to_json(moment(s, q))) for s, q in [("arm-1", 1), ("leg-7", 4)]
    ]
    assert [(m.stream_id, m.seq) for m in records] == [("leg-7", 4)]
    await counts.until(lambda: counts.subscribers == 0)  # both hung up


async def test_shutdown_delivers_what_subscribers_hold(counts: Counts):
    sink = server(counts)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        link = await subscribe(port, b"SUB binary *\n", counts)
        for seq in range(1, 6):
            sink.offer(one("s", seq))
        tg.cancel_scope.cancel()  # before any writer ran
    async with link:
        got = await read_moments(link, 5)
        with pytest.raises(anyio.EndOfStream):
            await link.receive()
    assert [m.seq for m in got] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "line",
    [b"SUB xml *\n", b"SUBSCRIBE binary *\n", b"SUB binary\n", b"SUB json a b\n", b"\xff\n"],
)
async def test_bad_sub_line_gets_err_and_is_closed(
    running: tuple[SubscriberServer, int], counts: Counts, line: bytes
):
    _, port = running
    async with await anyio.connect_tcp(HOST, port) as link:
        await link.send(line)
        answer = b""
        with anyio.fail_after(5):
            try:
                while True:
                    answer += await link.receive()
            except anyio.EndOfStream:
                pass
    assert answer.startswith(b"ERR ") and answer.endswith(b"\n") and answer.count(b"\n") == 1
    assert counts.subscribers == 0


async def test_silent_client_gets_err_after_the_handshake_timeout(counts: Counts):
    sink = server(counts, handshake_timeout=0.05)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        async with await anyio.connect_tcp(HOST, port) as link:
            with anyio.fail_after(5):
                answer = await link.receive()
        assert answer.startswith(b"ERR no SUB line")
        assert counts.limits == {("output.tcp", "header_timeout"): 1}
        tg.cancel_scope.cancel()


TOKEN = "arm-reader-token-0123456789abcdef"
AUTH_FILE = f"""\
[identities.arm-reader]
token = "{TOKEN}"
read = ["arm-"]

[identities.sensor]
token = "sensor-only-token-0123456789abcdef"
write = ["*"]
"""


@pytest.fixture
async def guarded(counts: Counts, tmp_path: Path) -> AsyncIterator[tuple[SubscriberServer, int]]:
    (tmp_path / "identities.toml").write_text(AUTH_FILE)
    identities = load_identities(str(tmp_path / "identities.toml"))
    sink = server(counts, identities=identities)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        yield sink, port
        tg.cancel_scope.cancel()


async def test_an_authenticated_subscriber_reads_only_its_prefixes(
    guarded: tuple[SubscriberServer, int], counts: Counts
):
    sink, port = guarded
    line = b"AUTH " + TOKEN.encode() + b"\r\nSUB binary *\n"  # both lines in one write
    async with await subscribe(port, line, counts) as link:
        sink.offer(
            MomentBatch.of(
                [moment("arm-1", 1), moment("leg-1", 1), moment("arm-2", 1), moment("xarm-", 1)]
            )
        )
        sink.offer(one("leg-2", 2))
        sink.offer(one("arm-3", 3))
        got = await read_moments(link, 3)
    assert [(m.stream_id, m.seq) for m in got] == [("arm-1", 1), ("arm-2", 1), ("arm-3", 3)]
    assert counts.limits == {}


@pytest.mark.parametrize(
    "first",
    [
        b"SUB binary arm-*\n",  # no AUTH line
        b"AUTH not-the-token-0123456789abcdef\nSUB binary arm-*\n",
        b"AUTH sensor-only-token-0123456789abcdef\nSUB binary arm-*\n",  # may read nothing
    ],
)
async def test_an_unauthenticated_subscriber_is_refused_and_counted(
    guarded: tuple[SubscriberServer, int], counts: Counts, first: bytes
):
    _, port = guarded
    async with await anyio.connect_tcp(HOST, port) as link:
        await link.send(first)
        assert await read_to_end(link) == UNAUTHORIZED_REPLY
    assert counts.limits == {("output.tcp", "unauthorized"): 1}
    assert counts.subscribers == 0


async def test_full_buffer_drops_without_blocking_and_counts(counts: Counts):
    sink = server(counts, buffer=2)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        async with await subscribe(port, b"SUB binary *\n", counts) as link:
            for seq in range(1, 6):  # no await in between: the writer cannot drain
                sink.offer(one("s", seq))
            assert counts.lost == {("tcp", "slow_subscriber"): 3}
            assert sink.queued == 2
            assert [b.statistics().dropped for b in sink.buffers] == [3]
            got = await read_moments(link, 2)
            assert [m.seq for m in got] == [1, 2]
            await counts.until(lambda: counts.delivered["tcp"] == 2)
        tg.cancel_scope.cancel()


async def test_stalled_subscriber_is_cut_off_once(counts: Counts):
    now = [0.0]
    sink = server(counts, buffer=1, stall_timeout=5.0, clock=lambda: now[0])
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        async with await subscribe(port, b"SUB binary *\n", counts) as link:
            sink.offer(one("s", 1))
            sink.offer(one("s", 2))  # dropped: full since t=0
            now[0] = 4.0
            sink.offer(one("s", 3))  # dropped, still within the stall timeout
            now[0] = 5.5
            sink.offer(one("s", 4))  # dropped, and full for more than 5 s: cut off
            sink.offer(one("s", 5))  # not for it any more: not counted
            await counts.until(lambda: counts.subscribers == 0)
            assert counts.lost[("tcp", "disconnected")] == 1
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    while True:
                        await link.receive()
        sink.offer(one("s", 6))  # nobody left to offer to
        assert counts.lost[("tcp", "slow_subscriber")] == 3
        tg.cancel_scope.cancel()


async def test_slow_subscriber_never_holds_back_a_fast_one(counts: Counts):
    big = MomentSizes(16384, 0, 0, 0)  # 64 KiB records: the slow one's socket fills up
    sink = server(counts, buffer=4)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        slow = await subscribe(port, b"SUB binary *\n", counts, 1)
        fast = await subscribe(port, b"SUB binary *\n", counts, 2)
        reader, got = MomentReader(), []
        for seq in range(1, 401):  # 26 MB for each subscriber
            sink.offer(one("s", seq, big))
            with anyio.fail_after(5):
                while len(got) < seq:
                    got += reader.feed(await fast.receive())
        assert [m.seq for m in got] == list(range(1, 401))
        assert counts.lost[("tcp", "slow_subscriber")] > 0
        assert counts.subscribers == 2
        await slow.aclose()
        await fast.aclose()
        tg.cancel_scope.cancel()


async def test_subscriber_that_stops_reading_loses_exactly_what_is_counted(counts: Counts):
    big = MomentSizes(16384, 0, 0, 0)  # 64 KiB records: the slow one's socket fills up
    n = 400  # 26 MB for each subscriber
    sink = server(counts, buffer=4, clock=lambda: 0.0)  # a stalled clock: never cut off
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        slow = await subscribe(port, b"SUB binary *\n", counts, 1)
        fast = await subscribe(port, b"SUB binary *\n", counts, 2)
        slow_buffer, fast_buffer = sink.buffers
        fast_got: list[Moment] = []
        reader = MomentReader()
        for seq in range(1, n + 1):
            sink.offer(one("s", seq, big))
            with anyio.fail_after(5):
                while len(fast_got) < seq:
                    fast_got += reader.feed(await fast.receive())
        assert [m.seq for m in fast_got] == list(range(1, n + 1))
        np.testing.assert_array_equal(fast_got[-1].values, moment("s", n, big).values)
        dropped = counts.lost["tcp", "slow_subscriber"]
        assert 0 < dropped < n
        assert slow_buffer.statistics().dropped == dropped
        assert fast_buffer.statistics().dropped == 0
        # What the slow one did not lose reaches it, in order, once it reads again.
        slow_got = await read_moments(slow, n - dropped)
        seqs = [m.seq for m in slow_got]
        assert len(seqs) == n - dropped and seqs == sorted(set(seqs)) and seqs[0] == 1
        for m in slow_got:
            np.testing.assert_array_equal(m.values, moment("s", m.seq, big).values)
        await counts.until(lambda: counts.delivered["tcp"] == 2 * n - dropped)
        assert sink.queued == 0 and counts.subscribers == 2
        assert counts.lost == {("tcp", "slow_subscriber"): dropped}
        await slow.aclose()
        await fast.aclose()
        tg.cancel_scope.cancel()


async def test_batch_larger_than_the_buffer_goes_to_an_idle_subscriber(
    counts: Counts,
):
    sink = server(counts, buffer=2)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        async with await subscribe(port, b"SUB binary *\n", counts) as link:
            sink.offer(MomentBatch.of([moment("s", seq) for seq in (1, 2, 3)]))
            sink.offer(one("s", 4))  # the buffer holds 3 > 2 moments: dropped
            assert sink.queued == 3
            assert counts.lost == {("tcp", "slow_subscriber"): 1}
            got = await read_moments(link, 3)
            assert [m.seq for m in got] == [1, 2, 3]
        tg.cancel_scope.cancel()


# -- hostile subscribers -------------------------------------------------------------------


async def read_to_end(link: SocketStream) -> bytes:
    """Everything `link` receives until the server closes (or resets) it."""
    data = b""
    with anyio.fail_after(5):
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                data += await link.receive()
    return data


async def test_subscribers_over_the_limits_are_refused_and_counted(counts: Counts):
    sink = server(counts, limits=ConnectionLimits(max_connections=3, max_per_address=2))
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        first = await subscribe(port, b"SUB binary *\n", counts, 1)
        second = await subscribe(port, b"SUB binary *\n", counts, 2)
        async with await anyio.connect_tcp(HOST, port) as third:  # a third from 127.0.0.1
            await third.send(b"SUB binary *\n")
            assert await read_to_end(third) == b"ERR too many subscribers\n"
        assert counts.limits == {("output.tcp", "max_per_address"): 1}
        # One still to send its SUB line counts as well: 3 connections, the most allowed.
        silent = await anyio.connect_tcp(HOST, port, local_host="127.0.0.2")
        await anyio.wait_all_tasks_blocked()
        assert sink.connections == 3
        async with await anyio.connect_tcp(HOST, port, local_host="127.0.0.3") as fourth:
            assert await read_to_end(fourth) == b"ERR too many subscribers\n"
        assert counts.limits["output.tcp", "max_connections"] == 1
        assert counts.subscribers == 2
        # A place that frees up is taken again.
        await first.aclose()
        await counts.until(lambda: counts.subscribers == 1)
        await anyio.wait_all_tasks_blocked()
        assert sink.connections == 2
        async with await subscribe(port, b"SUB binary *\n", counts, 2) as again:
            sink.offer(one("s", 1))
            assert [m.seq for m in await read_moments(again, 1)] == [1]
        assert sum(counts.limits.values()) == 2
        await second.aclose()
        await silent.aclose()
        tg.cancel_scope.cancel()


async def test_a_subscriber_that_would_go_over_its_byte_budget_is_a_slow_consumer(
    counts: Counts,
):
    record = len(one("s", 1).encode_binary())
    sink = server(counts, buffer=1000, max_pending_bytes=3 * record)
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        async with await subscribe(port, b"SUB binary *\n", counts) as link:
            # No await in between: the writer cannot drain.
            sink.offer(MomentBatch.of([moment("s", q) for q in (1, 2, 3, 4)]))  # > budget:
            assert sink.queued_bytes == (4 * record,)  # ... but taken into an empty queue
            sink.offer(one("s", 5))  # over budget: cut off, the moment not queued
            assert counts.lost == {("tcp", "slow_subscriber"): 1, ("tcp", "disconnected"): 1}
            assert sink.queued == 4
            sink.offer(one("s", 6))  # not for it any more
            await counts.until(lambda: counts.subscribers == 0)
            assert len(await read_to_end(link)) <= 4 * record
        assert counts.lost == {("tcp", "slow_subscriber"): 1, ("tcp", "disconnected"): 1}
        assert counts.delivered["tcp"] == 0
        tg.cancel_scope.cancel()


async def not_reading(port: int, line: bytes, counts: Counts, n: int) -> SocketStream:
    """A subscriber that will not read, with a small receive buffer of its own."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect((HOST, port))
    link = await SocketStream.from_socket(raw)
    await link.send(line)
    await counts.until(lambda: counts.subscribers == n)
    return link


async def test_a_subscriber_over_its_byte_budget_is_cut_off_and_a_reader_gets_everything(
    counts: Counts,
):
    big = MomentSizes(16384, 0, 0, 0)  # 64 KiB records
    budget, n = 1 << 20, 200  # 13 MB for each subscriber
    sink = server(
        counts,
        buffer=100_000,  # moments: the byte budget is what binds
        max_pending_bytes=budget,
        socket_buffer_bytes=64 << 10,
        clock=lambda: 0.0,  # never cut off for a stall: only for the budget
    )
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        slow = await not_reading(port, b"SUB binary *\n", counts, 1)
        fast = await subscribe(port, b"SUB binary *\n", counts, 2)
        reader, got, most = MomentReader(), [], 0
        for seq in range(1, n + 1):
            sink.offer(one("s", seq, big))
            most = max(most, *sink.queued_bytes)
            with anyio.fail_after(5):
                while len(got) < seq:
                    got += reader.feed(await fast.receive())
        assert [m.seq for m in got] == list(range(1, n + 1))
        await counts.until(lambda: counts.subscribers == 1)
        assert counts.lost["tcp", "disconnected"] == 1
        assert 0 < counts.lost["tcp", "slow_subscriber"] < n
        print(f"most bytes held for one subscriber: {most} (budget {budget})")
        assert most <= budget
        # What the slow one can still read is what the kernels held: nowhere near it all.
        assert len(await read_to_end(slow)) < n * len(one("s", 1, big).encode_binary()) // 2
        await slow.aclose()
        await fast.aclose()
        tg.cancel_scope.cancel()


async def test_subscribers_with_the_same_selection_share_one_encoding(
    counts: Counts, monkeypatch: pytest.MonkeyPatch
):
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    for fmt in ("binary", "json"):
        original = getattr(MomentBatch, f"encode_{fmt}")

        def spy(self, rows=None, *, _fmt=fmt, _original=original):
            calls[_fmt, "all" if rows is None else "some"] += 1
            return _original(self, rows)

        monkeypatch.setattr(MomentBatch, f"encode_{fmt}", spy)
    sink = server(counts)
    wanted = [b"SUB binary arm-*\n"] * 4 + [b"SUB json arm-*\n"] * 3 + [b"SUB binary *\n"] * 2
    async with anyio.create_task_group() as tg, contextlib.AsyncExitStack() as stack:
        port = await tg.start(sink.run)
        links = []
        for i, line in enumerate(wanted + [b"SUB binary none-*\n"] * 2):
            links.append(
                await stack.enter_async_context(await subscribe(port, line, counts, i + 1))
            )
        sink.offer(MomentBatch.of([moment("arm-1", 1), moment("leg-1", 1), moment("arm-2", 1)]))
        assert calls == {("binary", "some"): 1, ("json", "some"): 1, ("binary", "all"): 1}
        sink.offer(MomentBatch.of([moment("arm-1", 2), moment("arm-2", 2)]))  # all of it
        assert calls == {
            ("binary", "some"): 1,
            ("json", "some"): 1,
            ("binary", "all"): 2,  # shared with `*` through the cache
            ("json", "all"): 1,
        }
        sink.offer(one("leg-1", 2))
        arms = [("arm-1", 1), ("arm-2", 1), ("arm-1", 2), ("arm-2", 2)]
        for link in links[:4]:
            assert [(m.stream_id, m.seq) for m in await read_moments(link, 4)] == arms
        for link in links[4:7]:
            assert [(d["stream"], d["seq"]) for d in await read_lines(link, 4)] == arms
        everything = [("arm-1", 1), ("leg-1", 1), ("arm-2", 1), *arms[2:], ("leg-1", 2)]
        for link in links[7:9]:
            assert [(m.stream_id, m.seq) for m in await read_moments(link, 6)] == everything
        await counts.until(lambda: counts.delivered["tcp"] == 4 * 4 + 3 * 4 + 2 * 6)
        tg.cancel_scope.cancel()


OFFERS = 300


async def test_non_matching_subscribers_cost_offer_almost_nothing(counts: Counts):
    template = MomentBatch.of([moment(f"s-{i:03d}", 1) for i in range(256)])
    batches = [dataclasses.replace(template) for _ in range(OFFERS)]  # not cached: new ones
    sink = server(counts, buffer=1 << 24, max_pending_bytes=1 << 34)

    def per_offer() -> float:
        """The seconds of one `offer()` of a 256-moment batch: the 10th percentile of
        `OFFERS`, which other work on the machine (a CI run) hardly moves."""
        times = []
        for batch in batches:
            start = time.perf_counter()
            sink.offer(batch)
            times.append(time.perf_counter() - start)
        return statistics.quantiles(times, n=10)[0]

    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        none = per_offer()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(await subscribe(port, b"SUB binary *\n", counts, 1))
            base = per_offer()  # one subscriber to everything: one encoding per batch
            async with contextlib.AsyncExitStack() as hostile:
                for i in range(200):
                    link = await subscribe(port, b"SUB binary nomatch-*\n", counts, i + 2)
                    await hostile.enter_async_context(link)
                one_glob = per_offer()
            await counts.until(lambda: counts.subscribers == 1)
            async with contextlib.AsyncExitStack() as hostile:
                for i in range(200):
                    line = f"SUB binary nomatch-{i}-*\n".encode()
                    await hostile.enter_async_context(await subscribe(port, line, counts, i + 2))
                many_globs = per_offer()
        tg.cancel_scope.cancel()
    print(
        f"offer() of a 256-moment batch, 10th percentile of {OFFERS}: "
        f"no subscribers {none * 1e6:.1f} µs; one '*' subscriber {base * 1e6:.1f} µs; "
        f"+ 200 non-matching (one glob) {one_glob * 1e6:.1f} µs; "
        f"+ 200 non-matching (200 globs) {many_globs * 1e6:.1f} µs"
    )
    assert one_glob < 2 * base and many_globs < 2 * base


def test_router_memo_is_bounded_and_shared_by_every_glob():
    router = Router[str](memo_limit=100)
    arms = router.use("arm-*")
    ids = [f"arm-{i}" for i in range(50)] + [f"leg-{i}" for i in range(50)]
    assert router.route(ids) == {arms: list(range(50))}
    legs = router.use("leg-?")  # added later: tested against ids already seen, once each
    assert router.route(ids) == {arms: list(range(50)), legs: list(range(50, 60))}
    assert router.remembered == 100
    router.route([f"other-{i}" for i in range(1000)])
    assert router.remembered <= 100
    assert router.route(ids[45:55]) == {arms: [0, 1, 2, 3, 4], legs: [5, 6, 7, 8, 9]}


def test_router_intersects_a_glob_with_read_prefixes():
    router = Router[str]()
    ids = ["arm-1", "leg-1", "fleet-a.x", "arm-2", "x-arm"]
    arms_only = router.use("*", ("arm-",))
    assert arms_only is not router.everything
    assert router.use("*", ("arm-", "arm-")) is arms_only  # normalised: one Glob, two users
    assert router.use("*", None) is router.everything
    two = router.use("*", ("fleet-a.", "arm-"))
    assert router.use("*", ("arm-", "fleet-a.")) is two
    narrow = router.use("*-1", ("arm-",))
    nothing = router.use("*", ())
    assert router.route(ids) == {arms_only: [0, 3], two: [0, 2, 3], narrow: [0]}
    assert nothing not in router.route(ids)
    assert router.globs == 4  # one per distinct (glob, read prefixes)


def test_router_forgets_globs_nobody_uses():
    router = Router[str]()
    kept = router.use("kept-*")
    for i in range(10 * DEAD_SLACK):
        router.release(router.use(f"gone-{i}-*"))
        assert router.globs <= 1 + DEAD_SLACK + 1
    assert router.route(["kept-1", "gone-3-x"]) == {kept: [0]}
    router.release(kept)
    assert router.route(["kept-1"]) == {}  # no glob in use: no pass at all


async def test_jsonl_sink_appends_lines_and_flushes_on_cancel(tmp_path: Path, counts: Counts):
    path = tmp_path / "deep" / "dir" / "moments.jsonl"
    sink = JsonlSink(path, buffer=100, events=counts)
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        sink.offer(one("a", 1))
        sink.offer(one("b", 2))
        await counts.until(lambda: counts.delivered["jsonl"] == 2)
        assert len(path.read_bytes().splitlines()) == 2  # flushed, not just buffered
        sink.offer(one("a", 3))
        tg.cancel_scope.cancel()  # before the writer ran: the cleanup writes it
    lines = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert [(d["stream"], d["seq"]) for d in lines] == [("a", 1), ("b", 2), ("a", 3)]
    assert lines[0] == json.loads(moment_to_json(moment("a", 1)))
    assert counts.delivered["jsonl"] == 3


async def test_jsonl_sink_full_buffer_drops_and_counts(tmp_path: Path, counts: Counts):
    sink = JsonlSink(tmp_path / "m.jsonl", buffer=2, events=counts)
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        for seq in range(1, 5):
            sink.offer(one("a", seq))
        assert counts.lost == {("jsonl", "slow_sink"): 2}
        assert sink.queued == 2 and sink.buffers[0].statistics().dropped == 2
        await counts.until(lambda: counts.delivered["jsonl"] == 2)
        tg.cancel_scope.cancel()
    assert len((tmp_path / "m.jsonl").read_bytes().splitlines()) == 2


async def test_stdout_sink_writes_json_lines(counts: Counts):
    out = io.BytesIO()
    sink = StdoutSink(buffer=10, events=counts, output=out)
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        sink.offer(one("a", 1))
        await counts.until(lambda: counts.delivered["stdout"] == 1)
        tg.cancel_scope.cancel()
    assert out.getvalue() == moment_to_json(moment("a", 1))
    assert not out.closed


class BrokenOutput(io.BytesIO):
    def write(self, data: object) -> int:
        raise OSError("disk full")


async def test_line_sink_counts_a_failed_write_as_error_and_goes_on(counts: Counts):
    sink = StdoutSink(buffer=10, events=counts, output=BrokenOutput())
    async with anyio.create_task_group() as tg:
        await tg.start(sink.run)
        sink.offer(MomentBatch.of([moment("a", 1), moment("a", 2)]))
        await counts.until(lambda: counts.lost["stdout", "error"] == 2)
        assert sink.queued == 0
        sink.offer(one("a", 3))
        await counts.until(lambda: counts.lost["stdout", "error"] == 3)
        tg.cancel_scope.cancel()
    assert counts.delivered["stdout"] == 0


def test_encoding_cache_encodes_once_per_format():
    cache = EncodingCache()
    batch = MomentBatch.of([moment("a", 1), moment("b", 1)])
    first = cache.get(batch, "json")
    assert first == moment_to_json(moment("a", 1)) + moment_to_json(moment("b", 1))
    assert cache.get(batch, "json") is first
    assert cache.get(batch, "binary") is cache.get(batch, "binary")
    assert cache.get(batch, "binary") == encode_moment(moment("a", 1)) + encode_moment(
        moment("b", 1)
    )
    other = MomentBatch.of([moment("a", 1), moment("b", 1)])  # equal, another object
    assert cache.get(other, "json") == first and cache.get(other, "json") is not first
