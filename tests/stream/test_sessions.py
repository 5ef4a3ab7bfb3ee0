"""Sensor restarts and replies to senders: the header flags `FRAME_START` and
`FRAME_REPLY`, JSON `"start"`, the binary reply records, admission of a new session, and
what the state does then (`reset` or `continue`)."""

from __future__ import annotations

import numpy as np
import pytest

from stream.protocol import (
    ALL_PRESENT,
    FLAG_SESSION_START,
    REASONS,
    SESSION_START,
    Dims,
    Frame,
    FrameReader,
    FrameRejected,
    FrameRun,
    ReplyReader,
    decode_frame,
    decode_json,
    encode_error_line,
    encode_frame,
    encode_json_frame,
    encode_reply,
    reason_code,
)
from stream.streams import StreamTable

DIMS = Dims(3, 2, 4, 1)


def values(seq: int) -> dict[str, np.ndarray]:
    base = np.arange(DIMS.total, dtype=np.float32) + seq
    return {"sensory": base[:3], "proprio": base[3:5], "tactile": base[5:9], "motor": base[9:]}


def test_a_start_frame_carries_the_session_start_old_frames_do_not() -> None:
    start = decode_frame(encode_frame("arm-1", 1, 0.0, start=True, **values(1)), DIMS)
    plain = decode_frame(encode_frame("arm-1", 2, 0.0, reply=True, **values(2)), DIMS)
    assert start.present == ALL_PRESENT | SESSION_START
    assert plain.present == ALL_PRESENT  # the reply flag is a connection matter
    # Byte 10 is the flags word; a v1 sender that predates it writes 0 there.
    assert encode_frame("a", 1, 0.0, start=True)[10:12] == b"\x01\x00"
    assert encode_frame("a", 1, 0.0, reply=True)[10:12] == b"\x02\x00"
    assert encode_frame("a", 1, 0.0)[10:12] == b"\x00\x00"


def test_json_start() -> None:
    frame = decode_json(encode_json_frame("arm-1", 1, 0.0, start=True, **values(1)), DIMS)
    assert frame.present & SESSION_START
    assert not decode_json(encode_json_frame("arm-1", 1, 0.0, **values(1)), DIMS).present & (
        SESSION_START
    )
    with pytest.raises(FrameRejected) as info:
        decode_json(b'{"stream": "a", "seq": 1, "t": 0, "start": 1}', DIMS)
    assert info.value.reason == "bad_json" and info.value.stream_id == "a"


def test_a_start_frame_inside_a_run_is_decoded_on_its_own() -> None:
    frames = [encode_frame(f"s{i}", 5, 0.0, start=i == 6, **values(i)) for i in range(12)]
    reader = FrameReader(DIMS, runs=True)
    items = reader.feed(b"".join(frames), 7)
    decoded: list[Frame] = []
    for item in items:
        assert not isinstance(item, FrameRejected)
        if isinstance(item, FrameRun):
            assert not item.present & SESSION_START
            decoded += item.frames()
        else:
            decoded.append(item)
    assert [f.stream_id for f in decoded] == [f"s{i}" for i in range(12)]
    assert [bool(f.present & SESSION_START) for f in decoded] == [i == 6 for i in range(12)]
    assert not reader.replies


def test_the_reader_notices_a_sender_that_reads_replies() -> None:
    reader = FrameReader(DIMS, runs=True)
    reader.feed(encode_frame("a", 1, 0.0, **values(1)), 0)
    assert not reader.replies
    frame = encode_frame("a", 2, 0.0, reply=True, **values(2))
    reader.feed(frame[:20], 0)  # the header is not complete yet
    assert not reader.replies
    reader.feed(frame[20:], 0)
    assert reader.replies


@pytest.mark.parametrize(
    ("stream_id", "seq"), [("arm-1", 7), ("é-ü", 2**64 - 1), (None, 3), (None, None)]
)
def test_reply_records_round_trip(stream_id: str | None, seq: int | None) -> None:
    records = b"".join(
        encode_reply(FrameRejected(reason, "x", stream_id=stream_id, seq=seq)) for reason in REASONS
    )
    assert len(records) % 4 == 0
    reader, got = ReplyReader(), []
    for i in range(0, len(records), 5):  # split anywhere
        got += reader.feed(records[i : i + 5])
    assert [r.reason for r in got] == list(REASONS)
    assert {(r.stream_id, r.seq) for r in got} == {(stream_id, seq)}
    assert [reason_code(r) for r in REASONS] == list(range(1, len(REASONS) + 1))


def test_reply_reader_refuses_what_is_not_a_reply() -> None:
    with pytest.raises(ValueError, match="not a reply record"):
        ReplyReader().feed(b"ESM1" + bytes(40))


def test_error_line() -> None:
    line = encode_error_line(FrameRejected("stale_seq", "seq 1 < last 9", stream_id="a", seq=1))
    assert line == b'{"error":"stale_seq","detail":"seq 1 < last 9","stream":"a","seq":1}\n'


def test_admission_takes_any_seq_at_a_session_start() -> None:
    table = StreamTable(2, 2)  # two streams known at most
    table.admit("a", 100)
    with pytest.raises(FrameRejected) as info:
        table.admit("a", 1)
    assert info.value.reason == "stale_seq"
    table.admit("a", 1, session_start=True)
    table.admit("a", 2)
    with pytest.raises(FrameRejected):
        table.admit("a", 2)
    table.admit("b", 1)
    with pytest.raises(FrameRejected) as info:  # a session start is no way past the limit
        table.admit("c", 1, session_start=True)
    assert info.value.reason == "too_many_streams"


def test_moment_flags_name_the_session_start() -> None:
    assert FLAG_SESSION_START == 8 and SESSION_START & ALL_PRESENT == 0


def test_a_seq_too_far_ahead_is_rejected_a_session_start_may_go_anywhere() -> None:
    table = StreamTable(4, 4, max_seq_jump=1000)
    table.admit("a", 5)
    with pytest.raises(FrameRejected) as info:
        table.admit("a", 2**64 - 1)  # one stray frame would lock the stream out for good
    assert info.value.reason == "seq_jump" and "ingest.max_seq_jump = 1000" in info.value.detail
    table.admit("a", 1005)  # within the window
    assert not table.admit_run(["a"], [3000])  # a run is admitted whole only if all is fine
    table.admit("a", 10**12, session_start=True)  # a new session may start anywhere
    assert table.admitted_seq["a"] == 10**12
    assert reason_code("seq_jump") == 12
