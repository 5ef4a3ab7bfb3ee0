"""Multi-rate alignment (`stream.alignment`): which samples join which frame, presence,
late samples, the wait bound, determinism across interleavings."""

from __future__ import annotations

import random

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.alignment import Aligner, Body, bodies
from stream.buffers import WeightedBuffer
from stream.config import ConfigError, load_config
from stream.events import Listener
from stream.ingest import Ingest
from stream.protocol import MOTOR, PROPRIO, SENSORY, SESSION_START, TACTILE, Dims, Frame

DIMS = Dims(4, 3, 2, 1)  # sensory 0:4, proprio 4:7, tactile 7:9, motor 9:10
MS = 1_000_000
S = 1_000_000_000


def imu(seq: int, t_ms: float, stream: str = "imu") -> Frame:
    payload = np.zeros(DIMS.total, np.float32)
    payload[4:7] = (seq, t_ms, 1.0)
    return Frame(stream, seq, t_ms / 1000, payload, PROPRIO, 0, "udp")


def touch(seq: int, t_ms: float, stream: str = "touch") -> Frame:
    payload = np.zeros(DIMS.total, np.float32)
    payload[7:9] = (seq, t_ms)
    return Frame(stream, seq, t_ms / 1000, payload, TACTILE, 0, "tcp")


def body(tolerance_ms: float = 10.0, max_wait_ms: float = 1e6) -> Body:
    return Body("arm", "imu", ("touch",), round(tolerance_ms * MS), round(max_wait_ms * MS))


def feed(aligner: Aligner, frames: list[Frame], now_ns: int = 0) -> list[Frame]:
    out: list[Frame] = []
    for frame in frames:
        ready, why = aligner.add(frame, now_ns)
        assert why is None
        out += ready
    return out


def interleave(imu_hz: float, touch_hz: float, seconds: float) -> list[Frame]:
    """Both streams, in time order (each sample arrives when it is taken)."""
    frames = [imu(i + 1, i * 1000 / imu_hz) for i in range(int(seconds * imu_hz))]
    frames += [touch(i + 1, i * 1000 / touch_hz + 0.5) for i in range(int(seconds * touch_hz))]
    return sorted(frames, key=lambda f: (f.timestamp, f.stream_id))


def test_a_1khz_drive_and_a_100hz_input_give_frames_at_the_drive_rate_with_presence() -> None:
    aligner = Aligner([body(tolerance_ms=10)], DIMS)
    out = feed(aligner, interleave(1000, 100, 0.5)) + aligner.flush()
    assert [f.seq for f in out] == list(range(1, 501))
    assert all(f.stream_id == "arm" for f in out)
    # touch samples at 0.5, 10.5, ... ms: the frame at 0 ms has none at or before it
    assert out[0].present == PROPRIO
    assert all(f.present == PROPRIO | TACTILE for f in out[1:])
    # each frame holds the latest touch sample at or before its time
    for f in out[1:]:
        t_ms = f.seq - 1
        assert f.payload[8] == pytest.approx(max(x for x in np.arange(0.5, 500, 10) if x <= t_ms))
        assert f.payload[5] == t_ms  # its own IMU sample
        assert f.timestamp == t_ms / 1000


def test_a_tolerance_shorter_than_the_input_period_leaves_the_modality_absent() -> None:
    aligner = Aligner([body(tolerance_ms=4)], DIMS)
    out = feed(aligner, interleave(1000, 100, 0.2)) + aligner.flush()
    for f in out:
        t_ms = f.seq - 1
        age = (t_ms - 0.5) % 10
        expected = PROPRIO | TACTILE if t_ms >= 0.5 and age <= 4 else PROPRIO
        assert f.present == expected, t_ms
        if not f.present & TACTILE:
            assert not f.payload[7:9].any()  # absent: zero-filled, never guessed


def test_the_output_does_not_depend_on_how_the_inputs_interleave() -> None:
    frames = interleave(1000, 100, 0.3)
    reference = feed(Aligner([body()], DIMS), frames)
    imus = [f for f in frames if f.stream_id == "imu"]
    touches = [f for f in frames if f.stream_id == "touch"]
    rng = random.Random(7)
    for _ in range(5):
        # a random merge keeping each input's own order
        merged, i, j = [], 0, 0
        while i < len(imus) or j < len(touches):
            if j == len(touches) or (i < len(imus) and rng.random() < 0.9):
                merged.append(imus[i])
                i += 1
            else:
                merged.append(touches[j])
                j += 1
        out = feed(Aligner([body()], DIMS), merged)
        assert [(f.seq, f.present) for f in out] == [(f.seq, f.present) for f in reference]
        pairs = zip(out, reference, strict=True)
        assert all(np.array_equal(a.payload, b.payload) for a, b in pairs)


def test_the_same_interleaving_twice_gives_the_same_frames() -> None:
    frames = interleave(1000, 100, 0.2)
    rng = random.Random(3)
    for f in frames:  # jitter the input's timestamps by up to ±2 ms
        if f.stream_id == "touch":
            f.timestamp += rng.uniform(-0.002, 0.002)
    runs = []
    for _ in range(2):
        late: list[int] = []
        aligner = Aligner([body(max_wait_ms=1e6)], DIMS, late=late.append)
        out = feed(aligner, frames) + aligner.flush()
        runs.append(([(f.seq, f.present, f.payload.tobytes()) for f in out], sum(late)))
    assert runs[0] == runs[1]


def test_a_frame_waits_for_the_slower_input_and_out_of_order_arrivals_within_it_join() -> None:
    aligner = Aligner([body(tolerance_ms=10)], DIMS)
    # the IMU runs ahead of the skin: frames at 0..4 ms wait for a touch sample at ≥ them
    assert feed(aligner, [imu(i + 1, i) for i in range(5)]) == []
    assert aligner.pending == 5
    out = feed(aligner, [touch(1, 2.0)])  # 0 and 1 ms have none before them; 2 ms has it
    assert [f.seq for f in out] == [1, 2, 3]
    assert [f.present for f in out] == [PROPRIO, PROPRIO, PROPRIO | TACTILE]
    out = feed(aligner, [touch(2, 12.0)])
    assert [f.seq for f in out] == [4, 5]
    assert all(f.payload[8] == 2.0 for f in out)  # the latest at or before 3 and 4 ms


def test_a_sample_older_than_an_emitted_frame_is_late_counted_and_unused() -> None:
    late: list[int] = []
    aligner = Aligner([body(tolerance_ms=10, max_wait_ms=5)], DIMS, late=late.append)
    feed(aligner, [imu(1, 0.0), imu(2, 1.0)], now_ns=0)
    # the skin is silent: after max_wait the frames go without it
    out = aligner.due(now_ns=5 * MS)
    assert [(f.seq, f.present) for f in out] == [(1, PROPRIO), (2, PROPRIO)]
    assert aligner.next_due_ns() is None
    # its sample for 0.5 ms arrives now: too late for any frame
    assert feed(aligner, [touch(1, 0.5)], now_ns=6 * MS) == []
    assert late == [1]
    # a driving frame at or before the last one emitted is late too
    assert feed(aligner, [imu(3, 1.0)], now_ns=6 * MS) == []
    assert late == [1, 1]
    out = feed(aligner, [imu(4, 3.0), touch(2, 3.5)], now_ns=7 * MS)
    assert [(f.seq, f.present) for f in out] == [(4, PROPRIO)]  # (3.5 is after 3.0)


def test_max_wait_bounds_how_long_a_silent_input_holds_the_body_up() -> None:
    aligner = Aligner([body(max_wait_ms=50)], DIMS)
    feed(aligner, [imu(1, 0.0)], now_ns=1 * S)
    assert aligner.next_due_ns() == 1 * S + 50 * MS
    assert aligner.due(now_ns=1 * S + 49 * MS) == []
    assert [f.seq for f in aligner.due(now_ns=1 * S + 50 * MS)] == [1]


def test_repeated_and_stale_input_seqs_are_rejected_and_counted() -> None:
    rejected: list[tuple[str, str]] = []
    aligner = Aligner(
        [body()], DIMS, reject=lambda frame, reason: rejected.append((frame.stream_id, reason))
    )
    feed(aligner, [imu(5, 0.0), touch(3, 0.0)])
    _, why = aligner.add(imu(5, 1.0), 0)
    assert why is not None and why.reason == "duplicate_seq"
    _, why = aligner.add(touch(2, 1.0), 0)
    assert why is not None and why.reason == "stale_seq"
    assert rejected == [("imu", "duplicate_seq"), ("touch", "stale_seq")]
    # a session start may restart the count, and its bit reaches the body's frame
    restart = imu(1, 2.0)
    restart.present |= SESSION_START
    assert aligner.add(restart, 0)[1] is None
    assert feed(aligner, [touch(4, 3.0)])[-1].present & SESSION_START


def test_a_modality_two_inputs_carry_comes_from_the_driving_one_first() -> None:
    both = Body("arm", "imu", ("touch", "glove"), 10 * MS, 10**12)
    aligner = Aligner([both], DIMS)
    every = SENSORY | PROPRIO | TACTILE | MOTOR
    glove = Frame("glove", 1, 0.0, np.full(DIMS.total, 7, np.float32), every, 0, "tcp")
    assert feed(aligner, [touch(1, 0.0), glove, imu(1, 0.5)]) == []  # waits for both
    (f,) = aligner.flush()
    assert f.present == SENSORY | PROPRIO | TACTILE | MOTOR
    assert f.payload[5] == 0.5  # proprio: the drive's
    assert f.payload[8] == 0.0  # tactile: touch's (listed before the glove)
    assert f.payload[0] == 7 and f.payload[9] == 7  # the rest: the glove's


def test_consumed_positions_are_released_once_the_frames_that_could_use_them_are_out() -> None:
    released: list[tuple[object, str, int | None]] = []
    aligner = Aligner(
        [body()], DIMS, release=lambda frame, body_id, barrier: released.append(
            (frame.position, body_id, barrier)
        )
    )
    samples = []
    for i in range(3):
        t = touch(i + 1, i * 10.0)
        t.position = f"touch-{i + 1}"
        samples.append(t)
    feed(aligner, [*samples[:2], imu(1, 12.0)])
    assert released == []
    # out once touch 3 (20 ms) shows nothing newer can come before 12 ms: it joins touch 2
    # (10 ms), and touch 1 can serve no later frame
    (f,) = feed(aligner, [samples[2]])
    assert f.payload[8] == 10.0
    assert released == [("touch-1", "arm", 1)]
    feed(aligner, [imu(2, 25.0)])
    aligner.flush()
    assert released[-1] == ("touch-2", "arm", 2)


@settings(max_examples=60, deadline=None)
@given(
    drive=st.lists(st.integers(0, 2000), min_size=1, max_size=40, unique=True),
    other=st.lists(st.integers(0, 2000), max_size=40, unique=True),
    tolerance=st.integers(0, 300),
    order=st.lists(st.booleans(), min_size=80, max_size=80),
)
def test_frames_match_the_definition_whatever_the_interleaving(
    drive: list[int], other: list[int], tolerance: int, order: list[bool]
) -> None:
    """Every frame holds the latest other sample at or before its time, if at most the
    tolerance older (times in ms); the order of arrival across inputs changes nothing."""
    drive, other = sorted(drive), sorted(other)
    imus = [imu(i + 1, t) for i, t in enumerate(drive)]
    touches = [touch(i + 1, t) for i, t in enumerate(other)]
    merged, i, j = [], 0, 0
    for pick_imu in order + [True] * 80:
        if i < len(imus) and (pick_imu or j == len(touches)):
            merged.append(imus[i])
            i += 1
        elif j < len(touches):
            merged.append(touches[j])
            j += 1
    late: list[int] = []
    aligner = Aligner([body(tolerance_ms=tolerance)], DIMS, late=late.append)
    out = feed(aligner, merged) + aligner.flush()
    assert late == []
    assert [f.seq for f in out] == list(range(1, len(drive) + 1))
    for f, t in zip(out, drive, strict=True):
        candidates = [s for s in other if s <= t and t - s <= tolerance]
        if candidates:
            assert f.present == PROPRIO | TACTILE
            assert f.payload[8] == max(candidates)
        else:
            assert f.present == PROPRIO


def test_bodies_come_from_the_align_section_with_its_defaults() -> None:
    config = load_config(
        overrides={
            "align.tolerance_ms": 5.0,
            "align.bodies": [
                {"id": "arm", "drive": "imu", "inputs": ["touch"]},
                {"id": "leg", "drive": "imu2", "inputs": ["t2", "t3"], "max_wait_ms": 20},
            ],
        }
    )
    arm, leg = bodies(config.align)
    assert arm == Body("arm", "imu", ("touch",), 5 * MS, 100 * MS)
    assert leg == Body("leg", "imu2", ("t2", "t3"), 5 * MS, 20 * MS)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"id": "a", "drive": "i", "inputs": ["i"]}], "among its inputs"),
        ([{"id": "a", "drive": "i", "inputs": ["t"]}, {"id": "b", "drive": "t", "inputs": ["x"]}],
         "feeds both"),
        ([{"id": "a", "drive": "i", "inputs": ["t"]}, {"id": "b", "drive": "a", "inputs": ["x"]}],
         "is also an input"),
        ([{"id": "a", "drive": "i"}], "'inputs' is required"),
        ([{"id": "a", "drive": "i", "inputs": []}], "non-empty list"),
        ([{"id": "a", "drive": "i", "inputs": ["t"], "tolerance": 3}], "did you mean"),
        ("a", "list of tables"),
    ],
)
def test_bad_bodies_are_refused_naming_the_key(bad: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"align\.bodies") as e:
        load_config(overrides={"align.bodies": bad})
    assert message in str(e.value)


class _Counts(Listener):
    def __init__(self) -> None:
        self.drops: dict[str, int] = {}
        self.rejections: list[str] = []

    def dropped(self, reason: str, n: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def rejected(self, source: str, reason: str) -> None:
        self.rejections.append(reason)


async def test_the_ingest_turns_inputs_into_body_frames_and_lets_others_through() -> None:
    counts = _Counts()
    buffer: WeightedBuffer = WeightedBuffer(1000)
    ingest = Ingest(
        buffer,
        dims=DIMS,
        max_frame_bytes=1 << 20,
        events=counts,
        bodies=[body(max_wait_ms=30)],
    )
    assert not await ingest.put(imu(1, 0.0))
    assert buffer.weight == 0  # waits for the skin
    other = imu(1, 0.0, stream="elsewhere")
    await ingest.put(other)
    assert buffer.weight == 1
    await ingest.put(touch(1, 0.5))
    assert buffer.weight == 2
    await ingest.put(imu(2, 1.0))  # waits for a touch sample at ≥ 1 ms, or 30 ms
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ingest.run_alignment)
            for _ in range(400):  # until arm 2's wait ran out (polling, within fail_after)
                if buffer.weight == 3:
                    break
                await anyio.sleep(0.005)
            ingest.stop()
    got = [buffer.get_nowait() for _ in range(3)]
    assert [(f.stream_id, f.seq, f.present) for f in got] == [
        ("elsewhere", 1, PROPRIO),  # at once
        ("arm", 1, PROPRIO),  # once the skin's 0.5 ms sample showed none comes before 0
        ("arm", 2, PROPRIO | TACTILE),  # after its 30 ms wait, with the 0.5 ms sample
    ]
    rejected = await ingest.put(imu(2, 5.0))
    assert [r.reason for r in rejected] == ["duplicate_seq"]
    assert counts.rejections == ["duplicate_seq"]
    await ingest.put(touch(2, 0.8))  # before the frame at 1 ms, already out
    assert counts.drops == {"late": 1}


def test_an_input_whose_drive_is_silent_holds_a_bounded_number_of_samples() -> None:
    from stream.alignment import MAX_HELD

    aligner = Aligner([body()], DIMS)
    feed(aligner, [touch(i + 1, float(i)) for i in range(3 * MAX_HELD)])
    held = aligner.inputs["touch"].others["touch"]
    assert len(held.samples) <= MAX_HELD
    assert held.times == sorted(held.times) and held.times[-1] == (3 * MAX_HELD - 1) * MS
    # the newest are what a frame that comes now joins
    (f,) = feed(aligner, [imu(1, 3 * MAX_HELD - 1.0)])
    assert f.present == PROPRIO | TACTILE and f.payload[8] == 3 * MAX_HELD - 1
