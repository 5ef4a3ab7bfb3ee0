"""The LSL source: samples to frames against a scripted inlet (exact values, no liblsl),
and the whole source against real pylsl outlets in this process (resolving, refusals,
loss and return, many outlets, stop)."""

from __future__ import annotations

import collections
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import numpy as np
import pytest

from stream.admission import Admission
from stream.buffers import WeightedBuffer
from stream.commits import CommitLog
from stream.events import Listener
from stream.freshness import Freshness
from stream.ingest import Ingest, Item
from stream.lsl import LslError, OutletLost
from stream.protocol import MOTOR, PROPRIO, SENSORY, SESSION_START, TACTILE, Dims, Frame
from stream.sources.lsl import LslSettings, LslSource, OutletMapping
from stream.sources.lsl_frames import Framer, LastSeq, Placement
from stream.streams import StreamTable

DIMS = Dims(4, 3, 2, 2)
ALL4 = SENSORY | PROPRIO | TACTILE | MOTOR
IN_CI = os.environ.get("CI", "").lower() == "true"


def need_pylsl() -> Any:
    """pylsl (the lsl extra), or skip — fail in CI, which installs it."""
    try:
        import pylsl
    except (ImportError, RuntimeError) as e:
        message = f"pylsl (the lsl extra, with its liblsl) is needed: {e}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: CI must install it)")
        pytest.skip(message)
    return pylsl


# -- samples to frames, against a scripted inlet ----------------------------------------------


class ScriptedInlet:
    """What `Framer` pulls from: each `pull` takes the next scripted chunk (values
    `(n, channels)`, timestamps `(n,)`) into the buffers, or raises what is scripted."""

    def __init__(self, channels: int, chunks: list[Any], capacity: int = 16) -> None:
        self.capacity = capacity
        self.samples = np.zeros((capacity, channels), np.float32)
        self.timestamps = np.zeros(capacity, np.float64)
        self.chunks = collections.deque(chunks)

    def pull(self, wait_s: float, interval_s: float = 0.0) -> int:
        if not self.chunks:
            return 0
        chunk = self.chunks.popleft()
        if isinstance(chunk, Exception):
            raise chunk
        values, ts = chunk
        n = len(ts)
        self.samples[:n] = values
        self.timestamps[:n] = ts
        return n


def framer(
    chunks: list[Any],
    *,
    modalities: tuple[str, ...] = ("sensory", "proprio", "tactile", "motor"),
    freshness: str = "all",
    seq: LastSeq | None = None,
    daemon_clock: bool = True,
    capacity: int = 16,
) -> Framer:
    placement = Placement.of(modalities, DIMS)
    return Framer(
        ScriptedInlet(placement.channels, chunks, capacity),  # type: ignore[arg-type]
        "s",
        placement,
        seq or LastSeq(),
        Freshness.parse(freshness),
        DIMS.total,
        daemon_clock=daemon_clock,
        interval_s=0.0,
        rewind_s=360.0,
    )


def chunk(ts: list[float], channels: int = DIMS.total) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose values are their index in the chunk times 100 plus the channel."""
    values = np.arange(channels, dtype=np.float32) + 100 * np.arange(len(ts))[:, None]
    return values.astype(np.float32), np.asarray(ts, np.float64)


def now_s() -> float:
    return time.monotonic()


def test_a_sample_becomes_a_frame_with_every_modality() -> None:
    t = now_s() - 0.01
    pulled = framer([chunk([t, t + 0.001])]).pull()
    assert pulled is not None
    assert (pulled.received, pulled.stale, pulled.non_finite) == (2, 0, 0)
    a, b = pulled.frames
    assert (a.stream_id, a.source, a.present) == ("s", "lsl", ALL4)
    assert a.timestamp == t and b.timestamp == t + 0.001
    assert a.seq == round(t * 1e6) and b.seq == round((t + 0.001) * 1e6)
    np.testing.assert_array_equal(a.payload, np.arange(DIMS.total, dtype=np.float32))
    np.testing.assert_array_equal(b.payload, np.arange(DIMS.total, dtype=np.float32) + 100)
    assert a.payload.dtype == np.float32 and a.payload.shape == (DIMS.total,)
    assert a.received_ns == int(t * 1e9)  # its capture time, on the daemon's clock


def test_mapped_channels_fill_their_modalities_in_order_and_the_rest_is_absent() -> None:
    t = now_s()
    pulled = framer([chunk([t], channels=5)], modalities=("motor", "proprio")).pull()
    assert pulled is not None
    (frame,) = pulled.frames
    assert frame.present == MOTOR | PROPRIO  # sensory and tactile absent
    # payload order: sensory 0..3, proprio 4..6, tactile 7..8, motor 9..10
    expected = np.zeros(DIMS.total, np.float32)
    expected[9:11] = [0, 1]  # the first two channels: motor
    expected[4:7] = [2, 3, 4]  # the next three: proprio
    np.testing.assert_array_equal(frame.payload, expected)


def test_placement_says_what_it_needs() -> None:
    p = Placement.of(("tactile", "sensory"), DIMS)
    assert (p.channels, p.layout, p.present, p.whole) == (6, "tactile 2 + sensory 4", 5, False)
    assert p.columns.tolist() == [7, 8, 0, 1, 2, 3]
    assert Placement.of(("sensory", "proprio", "tactile", "motor"), DIMS).whole


def test_seqs_are_microseconds_forced_strictly_increasing_across_inlets() -> None:
    seq = LastSeq()
    t = 1000.0
    # equal and backwards timestamps (no dejitter) still get increasing seqs
    first = framer([chunk([t, t, t - 0.5, t + 0.001])], seq=seq).pull()
    assert first is not None
    seqs = [f.seq for f in first.frames]
    assert seqs == [1_000_000_000, 1_000_000_001, 1_000_000_002, 1_000_001_000]
    # a new inlet of the same stream (the outlet came back, its buffer reaching back
    # before the old one's last sample) goes on above
    again = framer([chunk([t + 0.0005, t + 0.002])], seq=seq).pull()
    assert again is not None
    assert [f.seq for f in again.frames] == [1_000_001_001, 1_000_002_000]


def test_an_inlet_whose_clock_went_back_restarts_the_seqs() -> None:
    """(Admission then sees a seq not above its last: a new session, `_admissible`.)"""
    seq = LastSeq()
    assert framer([chunk([500.0])], seq=seq).pull() is not None  # > 360 s after 3.5
    restarted = framer([chunk([3.0, 3.5])], seq=seq).pull()
    assert restarted is not None
    assert [f.seq for f in restarted.frames] == [3_000_000, 3_500_000]
    assert seq.last == 3_500_000


def test_non_finite_samples_are_rejected_and_the_rest_go_on() -> None:
    t = now_s()
    values, ts = chunk([t, t + 0.001, t + 0.002, t + 0.003])
    values[1, 3] = np.nan
    values[2, 0] = np.inf
    pulled = framer([(values, ts)]).pull()
    assert pulled is not None
    assert (pulled.received, pulled.non_finite, pulled.stale) == (4, 2, 0)
    assert [f.timestamp for f in pulled.frames] == [t, t + 0.003]
    np.testing.assert_array_equal(pulled.frames[1].payload, values[3])
    # a non-finite timestamp too
    values, ts = chunk([t, np.inf])
    pulled = framer([(values, ts)]).pull()
    assert pulled is not None and (pulled.non_finite, len(pulled.frames)) == (1, 1)


def test_latest_keeps_a_chunks_newest_sample() -> None:
    t = now_s()
    pulled = framer([chunk([t, t + 0.001, t + 0.002])], freshness="latest").pull()
    assert pulled is not None
    assert (pulled.received, pulled.stale, len(pulled.frames)) == (3, 2, 1)
    assert pulled.frames[0].timestamp == t + 0.002
    np.testing.assert_array_equal(
        pulled.frames[0].payload, np.arange(DIMS.total, dtype=np.float32) + 200
    )


def test_latest_sheds_a_full_chunk_with_more_behind_it() -> None:
    t = now_s()
    full = chunk([t + i * 0.001 for i in range(4)])
    rest = chunk([t + 0.004, t + 0.005])
    pulled = framer([full, rest], freshness="latest", capacity=4).pull()
    assert pulled is not None
    assert (pulled.received, pulled.stale) == (6, 5)
    assert [f.timestamp for f in pulled.frames] == [t + 0.005]


def test_max_age_sheds_what_was_captured_too_long_ago() -> None:
    t = now_s()
    pulled = framer([chunk([t - 5.0, t - 2.0, t - 0.01])], freshness="max_age_ms=1000").pull()
    assert pulled is not None
    assert (pulled.received, pulled.stale) == (3, 2)
    assert [f.timestamp for f in pulled.frames] == [t - 0.01]


def test_without_clock_sync_age_counts_from_receipt() -> None:
    """`clock_sync = "none"`: the outlet's clock is not the daemon's, so the capture time
    is not known: a sample is as old as its receipt (here 'an hour old' is not shed)."""
    t = now_s() - 3600
    before = time.monotonic_ns()
    pulled = framer([chunk([t])], freshness="max_age_ms=1000", daemon_clock=False).pull()
    assert pulled is not None and len(pulled.frames) == 1
    assert pulled.frames[0].received_ns >= before
    assert pulled.frames[0].timestamp == t  # carried as the outlet stamped it


def test_a_capture_time_in_the_future_is_now() -> None:
    t = now_s() + 10.0
    before = time.monotonic_ns()
    pulled = framer([chunk([t])]).pull()
    assert pulled is not None
    assert before <= pulled.frames[0].received_ns <= time.monotonic_ns()


def test_nothing_pulled_and_a_lost_outlet() -> None:
    f = framer([])
    assert f.pull() is None
    with pytest.raises(OutletLost):
        framer([OutletLost("gone")]).pull()


class Events(Listener):
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.states: list[bool] = []

    def received(self, source: str, n: int) -> None:
        assert source == "lsl"
        self.counts["received"] += n

    def rejected(self, source: str, reason: str) -> None:
        self.counts[f"rejected {reason}"] += 1

    def dropped(self, reason: str, n: int) -> None:
        self.counts[f"dropped {reason}"] += n

    def source_state(self, source: str, up: bool) -> None:
        assert source == "lsl"
        self.states.append(up)


def admitting(events: Events, max_seq_jump: int = 0) -> Ingest:
    table = StreamTable(64, 64, max_seq_jump=max_seq_jump)
    buffer: WeightedBuffer[Item] = WeightedBuffer(1 << 16)
    return Ingest(
        buffer,
        dims=DIMS,
        max_frame_bytes=1 << 20,
        events=events,
        admission=Admission(table, events, CommitLog(lambda label, positions: None)),
    )


def test_a_frame_admission_would_refuse_starts_a_session() -> None:
    events = Events()
    ingest = admitting(events, max_seq_jump=10_000_000)
    source = LslSource(LslSettings("type='x'"), dims=DIMS)
    source._ingest = ingest

    def frame(seq: int) -> Frame:
        return Frame("s", seq, seq / 1e6, np.zeros(DIMS.total, np.float32), ALL4, 0, "lsl")

    def admit(seq: int) -> int:
        f = source._admissible(frame(seq))
        assert ingest.put_nowait(f) == ()
        return f.present & SESSION_START

    assert admit(5_000_000) == 0  # the first: nothing to compare with
    assert admit(5_000_100) == 0
    assert admit(1_000) == SESSION_START  # the clock restarted (a reboot)
    assert admit(2_000) == 0
    assert admit(2_000 + 10_000_001) == SESSION_START  # back after too long
    assert events.counts["rejected stale_seq"] == events.counts["rejected seq_jump"] == 0


def test_settings_refuse_clashing_tables() -> None:
    class Config:
        predicate = "type='x'"
        freshness = "max_age_ms=250"
        clock_sync = "time_correction"
        dejitter = False
        chunk_samples = 64
        max_buflen_s = 30
        resolve_interval_s = 0.5
        outlets: tuple[dict[str, Any], ...] = ()

    c = Config()
    c.outlets = ({"name": "imu", "stream_id": "arm-1", "modalities": ("proprio",)}, {"name": "eeg"})
    s = LslSettings.of(c)
    assert s.freshness == Freshness("max_age", 250_000_000)
    assert s.outlets == (OutletMapping("imu", "arm-1", ("proprio",)), OutletMapping("eeg"))
    assert (s.clock_sync, s.dejitter, s.chunk_samples) == ("time_correction", False, 64)
    c.outlets = ({"name": "imu"}, {"name": "imu", "stream_id": "b"})
    with pytest.raises(LslError, match="two tables for the outlet 'imu'"):
        LslSettings.of(c)
    c.outlets = ({"name": "a", "stream_id": "x"}, {"name": "x"})
    with pytest.raises(LslError, match="both map to stream 'x'"):
        LslSettings.of(c)
    c.outlets = ({"name": "a", "stream_id": "has space"},)
    with pytest.raises(LslError, match="stream_id = 'has space'"):
        LslSettings.of(c)


# -- the whole source, against real outlets ----------------------------------------------------


class Recorder(Events):
    """An `Ingest` without admission over a buffer, and what the source reported."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer: WeightedBuffer[Item] = WeightedBuffer(1 << 20)
        self.ingest = Ingest(self.buffer, dims=DIMS, max_frame_bytes=1 << 20, events=self)
        self.frames: list[Frame] = []

    def take(self) -> list[Frame]:
        while True:
            try:
                item = self.buffer.get_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return self.frames
            assert isinstance(item, Frame)
            self.frames.append(item)

    def of(self, stream_id: str) -> list[Frame]:
        return [f for f in self.take() if f.stream_id == stream_id]

    async def until(self, predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {self.counts}, {len(self.take())} frames")
            await anyio.sleep(0.02)


@pytest.fixture
def kind() -> str:
    """A stream type of this test's own: its outlets are seen by its source only."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pylsl() -> Any:
    return need_pylsl()


class Outlets:
    """pylsl outlets made in the test (closed at its end), each pushing from a thread."""

    def __init__(self, pylsl: Any, kind: str) -> None:
        self.pylsl = pylsl
        self.kind = kind
        self.outlets: dict[str, Any] = {}

    def open(
        self, name: str, channels: int = DIMS.total, fmt: str = "float32", rate: float = 100.0
    ) -> Any:
        info = self.pylsl.StreamInfo(name, self.kind, channels, rate, fmt, f"{name}-{self.kind}")
        outlet = self.outlets[name] = self.pylsl.StreamOutlet(info)
        return outlet

    def close(self, name: str) -> None:
        del self.outlets[name]  # liblsl destroys it: its inlets see it lost


@pytest.fixture
def outlets(pylsl: Any, kind: str) -> Iterator[Outlets]:
    o = Outlets(pylsl, kind)
    yield o
    o.outlets.clear()


@pytest.fixture
async def running(kind: str, outlets: Outlets) -> AsyncIterator[tuple[LslSource, Recorder]]:
    rec = Recorder()
    source = LslSource(
        LslSettings(
            f"type='{kind}'",
            freshness=Freshness.parse("all"),
            resolve_interval_s=0.1,
            outlets=(OutletMapping("pm", "pm-stream", ("motor", "proprio")),),
        ),
        dims=DIMS,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(source.run, rec.ingest)
        yield source, rec
        rec.ingest.stop()


async def push_until(
    outlet: Any, rec: Recorder, stream_id: str, n: int, value: float = 1.0, within: float = 10.0
) -> list[Frame]:
    """Push a sample every 5 ms until `n` frames of `stream_id` arrived."""
    deadline = time.monotonic() + within
    sample = np.full(outlet.channel_count, value, np.float32)
    while len(rec.of(stream_id)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(rec.of(stream_id))} of {n} frames of {stream_id}")
        outlet.push_sample(sample)
        await anyio.sleep(0.005)
    return rec.of(stream_id)


async def test_outlets_flow_as_their_streams(
    running: tuple[LslSource, Recorder], outlets: Outlets
) -> None:
    _, rec = running
    full, pm = outlets.open("full"), outlets.open("pm", channels=5, fmt="double64")
    got = await push_until(full, rec, "full", 20, value=3.0)
    assert all(f.present == ALL4 and (f.payload == 3.0).all() for f in got)
    got = await push_until(pm, rec, "pm-stream", 20, value=7.0)
    expected = np.zeros(DIMS.total, np.float32)
    expected[[4, 5, 6, 9, 10]] = 7.0
    assert all(f.present == PROPRIO | MOTOR for f in got)
    np.testing.assert_array_equal(got[-1].payload, expected)
    seqs = [f.seq for f in rec.of("full")]
    assert seqs == sorted(set(seqs))
    now = time.monotonic()
    assert abs(got[-1].timestamp - now) < 1.0  # the same host: the daemon's clock
    assert rec.states == [True]


async def test_misshapen_outlets_are_refused_once_and_the_others_flow(
    running: tuple[LslSource, Recorder], outlets: Outlets, caplog: pytest.LogCaptureFixture
) -> None:
    _, rec = running
    caplog.set_level(logging.WARNING, "stream.sources.lsl")
    outlets.open("short", channels=DIMS.total - 1)
    outlets.open("words", channels=DIMS.total, fmt="string")
    await push_until(outlets.open("good"), rec, "good", 30)  # resolved many times meanwhile
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 2, refusals
    (short,) = [m for m in refusals if "'short'" in m]
    assert f"{DIMS.total - 1} channels, expected {DIMS.total} " in short
    (words,) = [m for m in refusals if "'words'" in m]
    assert "channel format string, expected a numeric one" in words
    assert {f.stream_id for f in rec.take()} == {"good"}


async def test_a_lost_outlet_is_reported_and_its_return_continues_the_stream(
    running: tuple[LslSource, Recorder], outlets: Outlets
) -> None:
    _, rec = running
    before = await push_until(outlets.open("arm"), rec, "arm", 10)
    outlets.close("arm")
    await rec.until(lambda: rec.states == [True, False], "the source down")
    outlets.open("arm")  # the same name, a new uid
    after = await push_until(outlets.outlets["arm"], rec, "arm", len(before) + 10)
    await rec.until(lambda: rec.states == [True, False, True], "the source up again")
    seqs = [f.seq for f in after]
    assert seqs == sorted(set(seqs))  # the stream goes on, above what it had


async def test_many_outlets_at_once(running: tuple[LslSource, Recorder], outlets: Outlets) -> None:
    _, rec = running
    names = [f"body-{i:02d}" for i in range(24)]
    for name in names:
        outlets.open(name)
    sample = np.ones(DIMS.total, np.float32)
    deadline = time.monotonic() + 30
    while {f.stream_id for f in rec.take()} != set(names):
        assert time.monotonic() < deadline, sorted({f.stream_id for f in rec.take()})
        for outlet in outlets.outlets.values():
            outlet.push_sample(sample)
        await anyio.sleep(0.02)


async def test_a_stop_is_prompt_with_outlets_idle_and_gone(kind: str, outlets: Outlets) -> None:
    rec = Recorder()
    source = LslSource(LslSettings(f"type='{kind}'", resolve_interval_s=0.1), dims=DIMS)
    async with anyio.create_task_group() as tg:
        await tg.start(source.run, rec.ingest)
        await push_until(outlets.open("idle"), rec, "idle", 1)
        await push_until(outlets.open("gone"), rec, "gone", 1)
        outlets.close("gone")
        await rec.until(lambda: rec.states == [True, False], "the source down")
        # An outlet that never returns: the source waits without busy work.
        cpu = time.process_time()
        await anyio.sleep(1.0)
        assert time.process_time() - cpu < 0.3
        started = time.monotonic()
        rec.ingest.stop()
    assert time.monotonic() - started < 1.0


async def test_a_predicate_liblsl_refuses_fails_the_start(pylsl: Any) -> None:
    source = LslSource(LslSettings("type=='x' and ("), dims=DIMS)
    with pytest.raises(LslError, match=r"lsl.predicate = .*liblsl refused it"):
        await source.run(Recorder().ingest)
