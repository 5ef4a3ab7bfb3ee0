"""The synthetic multi-body feed: shapes, determinism, smoothness, pacing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import numpy as np

from stream.buffers import WeightedBuffer
from stream.events import Listener
from stream.ingest import Ingest, Item
from stream.protocol import ALL_PRESENT, Dims, Frame, FrameRun
from stream.sources import run_synthetic
from stream.synthetic import SyntheticBodies

DIMS = Dims(8, 12, 6, 5)
SLICES = {"sensory": slice(0, 8), "proprio": slice(8, 20), "tactile": slice(20, 26)}
SLICES["motor"] = slice(26, 31)


def test_tick_shape_dtype_and_ranges():
    bodies = SyntheticBodies(7, DIMS, seed=3)
    values = bodies.tick(12.5)
    assert values.shape == (7, DIMS.total) and values.dtype == np.float32
    assert np.isfinite(values).all()
    assert np.abs(values[:, SLICES["sensory"]]).max() <= 1.0  # tanh
    assert np.abs(values[:, SLICES["proprio"]]).max() <= 1.0  # tanh
    assert values[:, SLICES["tactile"]].min() >= 0.0  # pressure
    assert SyntheticBodies(0, DIMS).tick(1.0).shape == (0, DIMS.total)


def test_same_seed_same_signals_other_seed_other_signals():
    a = SyntheticBodies(5, DIMS, seed=1).tick(3.0)
    np.testing.assert_array_equal(a, SyntheticBodies(5, DIMS, seed=1).tick(3.0))
    assert not np.allclose(a, SyntheticBodies(5, DIMS, seed=2).tick(3.0))
    assert not np.allclose(a[0], a[1])  # bodies differ from one another


def test_signals_are_smooth_but_move():
    bodies = SyntheticBodies(16, DIMS, seed=0)
    ticks = np.stack([bodies.tick(t) for t in np.arange(0.0, 20.0, 0.01)])  # 100 Hz
    steps = np.abs(np.diff(ticks, axis=0))
    for name, cols in SLICES.items():
        assert steps[:, :, cols].max() < 1.0, name  # no jumps between successive ticks
        assert steps[:, :, cols].mean() < 0.1, name
        assert ticks[:, :, cols].std() > 0.05, name  # but the signals do move


def test_tactile_comes_in_contact_bursts():
    bodies = SyntheticBodies(32, DIMS, seed=0)
    tactile = np.stack([bodies.tick(t)[:, SLICES["tactile"]] for t in np.arange(0, 30, 0.05)])
    in_contact = (tactile > 0).any(axis=2).mean()
    assert 0.05 < in_contact < 0.95


def test_motor_is_the_difference_of_successive_targets():
    # The difference over dt, divided by dt, converges as dt shrinks: a velocity command.
    fine = SyntheticBodies(4, DIMS, seed=5, dt=1e-4).tick(2.0)[:, SLICES["motor"]]
    coarse = SyntheticBodies(4, DIMS, seed=5, dt=1e-2).tick(2.0)[:, SLICES["motor"]]
    np.testing.assert_allclose(coarse, fine, atol=0.2)
    assert np.abs(fine).max() > 0.01


def test_frames_carry_identity_and_rows():
    bodies = SyntheticBodies(3, DIMS, seed=0, prefix="arm")
    frames = bodies.frames(0.5, 7)
    assert [f.stream_id for f in frames] == ["arm-0000", "arm-0001", "arm-0002"]
    assert all(f.seq == 7 and f.timestamp == 0.5 and f.present == ALL_PRESENT for f in frames)
    assert all(f.source == "synthetic" and f.received_ns > 0 for f in frames)
    np.testing.assert_array_equal(np.stack([f.payload for f in frames]), bodies.tick(0.5))


class Sink:
    """The ingest's receiving end, holding at most `capacity` frames."""

    def __init__(self, capacity: int) -> None:
        self.buffer: WeightedBuffer[Item] = WeightedBuffer(capacity)
        self.received = 0
        self._pending: list[Frame] = []
        sink = self

        class Count(Listener):
            def received(self, source: str, n: int) -> None:
                assert source == "synthetic"
                sink.received += n

        self.ingest = Ingest(self.buffer, dims=DIMS, max_frame_bytes=4096, events=Count())

    async def receive(self) -> Frame:
        """The next frame (the feed hands each tick over as one run)."""
        if not self._pending:
            item = await self.buffer.get()
            assert isinstance(item, FrameRun)
            self._pending = item.frames()
        return self._pending.pop(0)

    async def __aiter__(self) -> AsyncIterator[Frame]:
        while True:
            try:
                yield await self.receive()
            except anyio.EndOfStream:
                return

    def close(self) -> None:
        self.buffer.close()


async def test_zero_streams_returns_after_started():
    sink = Sink(1)
    with anyio.fail_after(1):
        await run_synthetic(sink.ingest, streams=0, rate_hz=100.0)
    assert sink.received == 0
    sink.close()


async def test_paced_at_the_rate_with_increasing_seq():
    sink = Sink(10_000)
    with anyio.move_on_after(0.3):
        await run_synthetic(sink.ingest, streams=3, rate_hz=100.0)
    sink.close()
    frames = [f async for f in sink]
    assert len(frames) == sink.received and len(frames) % 3 == 0
    ticks = len(frames) // 3
    assert 15 <= ticks <= 31  # deadlines at 0, 10, ..., 300 ms: never more than 31
    seqs = [f.seq for f in frames if f.stream_id == "body-0001"]
    assert seqs == list(range(seqs[0], seqs[0] + ticks))
    # Ticks are numbered on the wall clock, so a restarted feed goes on increasing.
    assert abs(seqs[0] / 100.0 - time.time()) < 5.0
    timestamps = [f.timestamp for f in frames if f.stream_id == "body-0001"]
    np.testing.assert_allclose(np.diff(timestamps), 0.01, atol=1e-6)
    np.testing.assert_allclose(timestamps[0], seqs[0] / 100.0)
    sink.close()


async def test_falling_behind_skips_ticks_instead_of_bursting():
    sink = Sink(1)
    got: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_synthetic(sink.ingest, streams=1, rate_hz=1000.0))
        got.append((await sink.receive()).seq)
        await anyio.sleep(0.1)  # a stalled pipeline: the feed blocks in put()
        with anyio.move_on_after(0.02):
            async for frame in sink:
                got.append(frame.seq)
        tg.cancel_scope.cancel()
    # Taken: the first; then the frames in the stream and held by the blocked put; then a
    # jump to the tick due when the stall ended (~100 on), not a burst of the missed ticks.
    assert got == sorted(set(got))
    assert max(np.diff(got)) > 50
    assert len(got) < 3 + 0.02 * 1000 + 5
    sink.close()


async def test_stops_when_not_accepting():
    sink = Sink(10_000)
    sink.ingest.stop()
    with anyio.fail_after(1):
        await run_synthetic(sink.ingest, streams=2, rate_hz=100.0)
    assert sink.received == 0
    sink.close()
