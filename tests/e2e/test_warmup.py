"""Serving while the buckets compile: the first moment before the last bucket, never a
bucket before it is compiled, never a compilation on the hot path (in the test's process,
with the compilation of every bucket but the first — the largest — held back until the
test lets go)."""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from processors import SlabStep
from stream.config import load_config
from stream.daemon import Daemon, compile_order
from stream.notify import Notifier
from stream.protocol import encode_frame

from .daemon import CONFIG, Subscriber, payload, wait_for

pytestmark = pytest.mark.timeout(300)

BUCKETS = (1, 8, 64)


@pytest.fixture
def sighup_restored() -> Iterator[None]:
    """`Daemon` ignores SIGHUP for the rest of the process; give the test run its own back."""
    before = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, before)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every bucket but the first the daemon compiles waits for this event."""
    opened = threading.Event()
    compile_bucket = SlabStep.compile_bucket

    def held(self: SlabStep, bucket: int) -> float:
        if bucket != compile_order(self.buckets)[0]:
            assert opened.wait(60), "the test never let the other buckets compile"
        return compile_bucket(self, bucket)

    monkeypatch.setattr(SlabStep, "compile_bucket", held)
    yield opened
    opened.set()  # whatever happened, let a daemon still compiling finish


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate` on the event loop for up to a minute (a readiness check, not a
    sleep)."""
    for _ in range(3000):
        if predicate():
            return
        await anyio.sleep(0.02)
    raise TimeoutError(what)


def send_burst(port: int, streams: list[str], seq: int) -> None:
    """One frame per stream, in one write: a run the batcher would take whole."""
    rng = np.random.default_rng(seq)
    data = b"".join(encode_frame(s, seq, 0.0, **payload(rng)) for s in streams)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)


def test_compile_order_is_the_largest_then_increasing() -> None:
    assert compile_order((64, 1, 8)) == (64, 1, 8)
    assert compile_order((1, 8, 32, 64, 96, 128, 192, 256)) == (256, 1, 8, 32, 64, 96, 128, 192)
    assert compile_order((4,)) == (4,)


async def test_first_moment_before_the_other_buckets_compile(
    tmp_path: Path, compilation_cache: str, sighup_restored: None, gate: threading.Event
) -> None:
    path = tmp_path / "daemon.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state", cache=compilation_cache))
    config = load_config(path)
    assert config.batching.buckets == BUCKETS and config.batching.serve_while_compiling
    daemon = Daemon(config, status=lambda line: None, notifier=Notifier(None))
    get = daemon.metrics.registry.get_sample_value

    def batches(bucket: int) -> float:
        return get("enactive_batches_total", {"bucket": str(bucket)}) or 0.0

    def compilations(phase: str) -> float:
        return get("enactive_jit_compilations_total", {"phase": phase}) or 0.0

    async with anyio.create_task_group() as tg:
        ports = await tg.start(daemon.run)
        sub = Subscriber(ports["output"], "warm-*", "binary")
        try:  # (a failure lets the held compilations go: the daemon's stop waits for them)
            # Ready, serving, with the largest bucket alone.
            assert daemon.ready and get("enactive_ready") == 1
            assert daemon.progress() == "ready: 1/3 buckets compiled, compiling the rest"
            ready = [get("enactive_bucket_ready", {"bucket": str(b)}) for b in BUCKETS]
            assert ready == [0, 0, 1]
            await anyio.to_thread.run_sync(
                wait_for, lambda: get("enactive_subscribers") == 1, "no subscriber"
            )
            streams = [f"warm-{i}" for i in range(20)]
            for seq in (1, 2, 3):  # bursts of 20, then lone frames: all through bucket 64
                await anyio.to_thread.run_sync(send_burst, ports["tcp"], streams, seq)
            await anyio.to_thread.run_sync(send_burst, ports["tcp"], streams[:1], 4)
            moments = await anyio.to_thread.run_sync(sub.read, 3 * len(streams) + 1)
            assert sorted(m.stream_id for m in moments[:20]) == sorted(streams)
            assert batches(1) == batches(8) == 0 and batches(64) >= 4
            assert not gate.is_set() and daemon.progress().startswith("ready: 1/3")
            assert compilations("runtime") == 0

            gate.set()  # let the others compile: in the background, off the hot path
            await until(lambda: daemon.progress() == "ready", "buckets still compiling")
            assert [get("enactive_bucket_ready", {"bucket": str(b)}) for b in BUCKETS] == [1, 1, 1]
            assert get("enactive_batch_max_size") == 64
            assert compilations("background") >= 2  # buckets 8 and 64
            assert compilations("warmup") > 0

            # Steady state, the whole set compiled: a lone frame takes bucket 1 now, and
            # still nothing compiles on the hot path.
            await anyio.to_thread.run_sync(send_burst, ports["tcp"], streams[:1], 5)
            await anyio.to_thread.run_sync(send_burst, ports["tcp"], streams[:5], 6)
            moments = await anyio.to_thread.run_sync(sub.read, 3 * len(streams) + 7)
            assert len(moments) == 3 * len(streams) + 7
            assert batches(1) >= 1 and batches(1) + batches(8) >= 2
            assert compilations("runtime") == 0
            assert daemon.counter is not None and daemon.counter.runtime == 0
        finally:
            sub.sock.close()
            gate.set()
            daemon.request_stop()


async def test_without_serve_while_compiling_ready_waits_for_every_bucket(
    tmp_path: Path, compilation_cache: str, sighup_restored: None, gate: threading.Event
) -> None:
    path = tmp_path / "daemon.toml"
    text = CONFIG.format(state=tmp_path / "state", cache=compilation_cache)
    path.write_text(text.replace("[batching]\n", "[batching]\nserve_while_compiling = false\n"))
    config = load_config(path)
    assert not config.batching.serve_while_compiling
    seen: list[str] = []
    daemon = Daemon(config, status=seen.append, notifier=Notifier(None))

    async def open_gate() -> None:
        try:
            await until(
                lambda: any(line.startswith("compiled bucket") for line in seen),
                "nothing compiled",
            )
            await anyio.sleep(0.3)  # long enough to see it would not become ready
            assert not daemon.ready
            assert re.fullmatch(r"compiling: 1/3 buckets(, .+)?", daemon.progress())
        finally:
            gate.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_gate)
        await tg.start(daemon.run)
        assert daemon.progress() == "ready"
        ready = next(i for i, line in enumerate(seen) if line.startswith("ready in"))
        assert any(line.startswith("all 3 buckets compiled") for line in seen[:ready])
        assert "more compiling" not in seen[ready]
        daemon.request_stop()
