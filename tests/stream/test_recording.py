"""The recording file: format round trip, crash tails, damage, headers, appending, the
writer's back-pressure and durability."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.batcher import Batch
from stream.protocol import (
    ALL_PRESENT,
    FRAME_REPLY,
    MOTOR,
    PROPRIO,
    SENSORY,
    SESSION_START,
    TACTILE,
    Dims,
    Frame,
    FrameRun,
    decode_frame,
)
from stream.recording import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    Recorder,
    RecordingError,
    RecordingReader,
    encode_batch,
)

DIMS = Dims(4, 3, 2, 2)


def frame(stream_id: str, seq: int, *, present: int = ALL_PRESENT, t: float = 0.5) -> Frame:
    """A frame as the decoder makes it: zero where a modality is absent."""
    rng = np.random.default_rng(seq)
    payload = rng.standard_normal(DIMS.total).astype(np.float32)
    start = 0
    for bit, dim in zip((SENSORY, PROPRIO, TACTILE, MOTOR), DIMS, strict=True):
        if not present & bit:
            payload[start : start + dim] = 0
        start += dim
    return Frame(stream_id, seq, t, payload, present, time.monotonic_ns(), "tcp")


def batch(*frames: Frame) -> Batch:
    return Batch.of(frames, [f.received_ns for f in frames])


def read_all(path: Path) -> tuple[RecordingReader, list[Frame], list[int]]:
    """The reader (iterated), the decoded frames and the records' offsets."""
    with RecordingReader(path) as reader:
        records = list(reader)
    frames = [decode_frame(r.frame, DIMS, received_ns=r.received_ns) for r in records]
    return reader, frames, [r.offset for r in records]


async def record(path: Path, *batches: Batch, dims: Dims = DIMS, **kw: object) -> Recorder:
    recorder = Recorder.open(path, dims, **kw)  # type: ignore[arg-type]
    async with recorder.writing():
        for b in batches:
            await recorder.record(b)
    return recorder


def same(got: Frame, want: Frame) -> None:
    assert (got.stream_id, got.seq, got.timestamp, got.present) == (
        want.stream_id,
        want.seq,
        want.timestamp,
        want.present,
    )
    assert got.payload.tobytes() == want.payload.tobytes()


# -- the format ---------------------------------------------------------------------------


async def test_round_trip_keeps_every_field_and_the_order(tmp_path: Path) -> None:
    path = tmp_path / "a.rec"
    first = [
        frame("arm-1", 1, present=ALL_PRESENT | SESSION_START),
        frame("ärm-2", 7, present=SENSORY | MOTOR, t=-3.25),
        frame("x", 2**64 - 1, present=0),
    ]
    run = FrameRun(
        ["r-1", "r-2"],
        [5, 6],
        np.array([1.0, 2.0]),
        np.arange(2 * DIMS.total, dtype=np.float32).reshape(2, -1),
        ALL_PRESENT,
        time.monotonic_ns(),
        "tcp",
    )
    second = Batch.of([run, frame("arm-1", 2)], [run.received_ns, time.monotonic_ns()])
    before = time.time_ns()
    recorder = await record(path, batch(*first), second)
    after = time.time_ns()
    assert recorder.frames == 6 and recorder.size == path.stat().st_size
    reader, frames, offsets = read_all(path)
    assert reader.header.version == FORMAT_VERSION and reader.header.dims == DIMS
    assert before <= reader.header.created_ns <= after
    assert (reader.ignored, reader.problem, reader.end) == (0, "", path.stat().st_size)
    assert offsets[0] == HEADER_BYTES
    for got, want in zip(frames, [*first, *run.frames(), frame("arm-1", 2)], strict=True):
        same(got, want)
    # Receipt times are wall-clock: the monotonic receipt plus the clock offset.
    assert all(before - 10**9 <= f.received_ns <= after for f in frames)
    with RecordingReader(path) as reader:
        raw = [r.frame for r in reader]
    assert not any(r[10] & FRAME_REPLY for r in raw)  # the sender's reply flag is not kept
    assert raw[0][10] == 1 and raw[1][10] == 0  # FRAME_START where a session started


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(
            st.text(
                st.characters(blacklist_categories=("C", "Z"), blacklist_characters=" *>#+/"),
                min_size=1,
                max_size=12,
            ),
            st.integers(0, 2**64 - 1),
            st.floats(allow_nan=False, allow_infinity=False),
            st.builds(
                lambda bits, start: bits | start,
                st.integers(0, ALL_PRESENT),
                st.sampled_from((0, SESSION_START)),
            ),
            st.integers(0, 2**40),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_any_batch_round_trips(rows: list[tuple[str, int, float, int, int]]) -> None:
    frames = []
    for i, (sid, seq, t, present, received) in enumerate(rows):
        f = frame(f"{sid}-{i}", seq, present=present, t=t)
        f.received_ns = received
        frames.append(f)
    data = encode_batch(batch(*frames), DIMS, clock_offset_ns=7)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.rec"
        Recorder.open(path, DIMS).close()
        with path.open("ab") as f:
            f.write(data)
        reader, got, _ = read_all(path)
    assert reader.ignored == 0
    for g, w in zip(got, frames, strict=True):
        same(g, w)
        assert g.received_ns == w.received_ns + 7


# -- crashes and damage ---------------------------------------------------------------


@pytest.fixture
def three(tmp_path: Path) -> tuple[Path, list[int]]:
    """A recording of three frames, and its records' offsets."""
    path = tmp_path / "three.rec"
    anyio.run(record, path, batch(frame("a", 1), frame("b", 1)), batch(frame("a", 2)))
    _, frames, offsets = read_all(path)
    assert len(frames) == 3
    return path, offsets


def test_a_tail_cut_at_every_byte_of_the_last_record_is_ignored_and_reported(
    three: tuple[Path, list[int]], tmp_path: Path
) -> None:
    path, offsets = three
    whole = path.read_bytes()
    last = offsets[-1]
    cut = tmp_path / "cut.rec"
    for end in range(last, len(whole)):
        cut.write_bytes(whole[:end])
        reader, frames, _ = read_all(cut)
        assert [f.seq for f in frames] == [1, 1]
        assert reader.end == last
        assert reader.ignored == end - last
        if end > last:
            assert reader.problem == f"the record at offset {last} is cut short"
            assert reader.tail() == f"{cut}: ignored the last {end - last} bytes: {reader.problem}"
        else:
            assert (reader.problem, reader.tail()) == ("", "")


def test_a_bad_crc_stops_the_reading_there(three: tuple[Path, list[int]]) -> None:
    path, offsets = three
    data = bytearray(path.read_bytes())
    data[offsets[1] + 20] ^= 0x40  # a byte of the second record's body
    path.write_bytes(bytes(data))
    reader, frames, _ = read_all(path)
    assert [(f.stream_id, f.seq) for f in frames] == [("a", 1)]
    assert reader.problem == f"the record at offset {offsets[1]} fails its CRC"
    assert reader.ignored == len(data) - offsets[1]


def test_an_impossible_length_stops_the_reading_there(three: tuple[Path, list[int]]) -> None:
    path, offsets = three
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offsets[2], 3)
    path.write_bytes(bytes(data))
    reader, frames, _ = read_all(path)
    assert len(frames) == 2
    assert reader.problem == f"the record at offset {offsets[2]} has length 3"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "0 bytes, shorter than the 32-byte header"),
        (MAGIC + b"\x01\x00", "7 bytes, shorter than the 32-byte header"),
        (b"ESF1" + bytes(40), "not a recording: it starts with b'ESF1"),
        (b"not a recording at all, just some text", "it starts with b'not a re'"),
    ],
)
def test_a_bad_header_is_a_one_line_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.rec"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message) as e:
        RecordingReader(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_newer_format_version_is_refused(three: tuple[Path, list[int]]) -> None:
    path, _ = three
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 6, FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="format version 2; this enactive-stream reads"):
        RecordingReader(path)
    with pytest.raises(RecordingError, match="format version 2"):
        Recorder.open(path, DIMS)


# -- appending ----------------------------------------------------------------------------


async def test_opening_an_existing_recording_appends(three: tuple[Path, list[int]]) -> None:
    path, _ = three
    created = read_all(path)[0].header.created_ns
    recorder = await record(path, batch(frame("b", 2), frame("c", 1)))
    assert recorder.frames == 5
    reader, frames, _ = read_all(path)
    assert [(f.stream_id, f.seq) for f in frames] == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("c", 1)
    ]  # fmt: skip
    assert reader.header.created_ns == created and reader.ignored == 0


@pytest.mark.parametrize("tail", ["cut", "zeros"])
async def test_a_crash_tail_is_cut_away_before_appending(
    three: tuple[Path, list[int]], tail: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, offsets = three
    whole = path.read_bytes()
    if tail == "cut":
        path.write_bytes(whole[: offsets[-1] + 11])
    else:  # a file extended by a crash without its data
        path.write_bytes(whole + bytes(100))
    kept = 2 if tail == "cut" else 3
    recorder = await record(path, batch(frame("z", 1)))
    assert recorder.frames == kept + 1
    reader, frames, _ = read_all(path)
    assert [f.stream_id for f in frames][-2:] == (["b", "z"] if tail == "cut" else ["a", "z"])
    assert len(frames) == kept + 1 and reader.ignored == 0
    assert "cut away the last" in caplog.text


async def test_a_recording_damaged_before_its_end_is_not_appended_to(
    three: tuple[Path, list[int]],
) -> None:
    path, offsets = three
    data = bytearray(path.read_bytes())
    data[offsets[0] + 20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match=f"damaged at offset {offsets[0]}.*another file"):
        Recorder.open(path, DIMS)
    assert path.read_bytes() == bytes(data)  # untouched


def test_other_dims_are_refused(three: tuple[Path, list[int]]) -> None:
    path, _ = three
    with pytest.raises(RecordingError, match=r"dims \(D, P, T, M\) = \(4, 3, 2, 2\), the "):
        Recorder.open(path, Dims(4, 3, 2, 3))


def test_a_file_that_is_not_a_recording_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("important notes\n" * 4)
    with pytest.raises(RecordingError, match="not a recording"):
        Recorder.open(path, DIMS)
    assert path.read_text() == "important notes\n" * 4


def test_one_recorder_per_file(tmp_path: Path) -> None:
    path = tmp_path / "one.rec"
    recorder = Recorder.open(path, DIMS)
    try:
        with pytest.raises(RecordingError, match="another process is recording to it"):
            Recorder.open(path, DIMS)
    finally:
        recorder.close()
    Recorder.open(path, DIMS).close()  # free again


# -- the writer ---------------------------------------------------------------------------


async def test_a_full_queue_holds_the_caller_back_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "slow.rec"
    written: list[tuple[int, int]] = []
    recorder = Recorder.open(
        path, DIMS, queue=1, on_written=lambda n, size: written.append((n, size))
    )
    writing, release = threading.Event(), threading.Event()
    write = recorder._write

    def slow_write(batches: list[Batch]) -> None:
        writing.set()
        release.wait(10)
        write(batches)

    recorder._write = slow_write  # type: ignore[method-assign]
    done = anyio.Event()

    async def third() -> None:
        await recorder.record(batch(frame("s", 3)))
        done.set()

    async with recorder.writing(), anyio.create_task_group() as tg:
        await recorder.record(batch(frame("s", 1)))
        await anyio.to_thread.run_sync(writing.wait, 10)  # the writer is stuck on it
        await recorder.record(batch(frame("s", 2)))  # queued: the queue is now full
        tg.start_soon(third)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()  # held back, not dropped
        release.set()
        await done.wait()
    _, frames, _ = read_all(path)
    assert [f.seq for f in frames] == [1, 2, 3]
    assert sum(n for n, _ in written) == 3 and written[-1][1] == path.stat().st_size


async def test_a_failed_write_is_a_recording_error(tmp_path: Path) -> None:
    recorder = Recorder.open(tmp_path / "full.rec", DIMS)

    def no_space(batches: list[Batch]) -> None:
        raise RecordingError(f"{recorder.path}: cannot write: No space left on device")

    recorder._write = no_space  # type: ignore[method-assign]
    with pytest.RaisesGroup(pytest.RaisesExc(RecordingError, match="No space left")):
        async with recorder.writing():
            await recorder.record(batch(frame("s", 1)))
            await anyio.sleep_forever()


KILLED = """
import os, signal, sys, time
import anyio, numpy as np
from stream.batcher import Batch
from stream.protocol import ALL_PRESENT, Dims, Frame
from stream.recording import Recorder

async def main():
    recorder = Recorder.open(sys.argv[1], Dims(4, 3, 2, 2), fsync_interval_s=3600)
    async with recorder.writing():
        for seq in range(1, 101):
            f = Frame("k", seq, 0.0, np.ones(11, np.float32), ALL_PRESENT, time.monotonic_ns(), "")
            await recorder.record(Batch.of([f], [f.received_ns]))
        while recorder.frames < 100:
            await anyio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)
"""


def test_a_sigkill_leaves_everything_written(tmp_path: Path) -> None:
    """What the writer wrote survives the process (the kernel holds it), fsync or not."""
    path = tmp_path / "killed.rec"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _, frames, _ = read_all(path)
    assert [f.seq for f in frames] == list(range(1, 101))
