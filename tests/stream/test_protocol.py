"""Wire protocol v1: round trips, every codec rejection, readers across chunk splits."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

from stream.protocol import (
    ALL_PRESENT,
    DEFAULT_MAX_FRAME_BYTES,
    MOTOR,
    PROPRIO,
    REASONS,
    SENSORY,
    TACTILE,
    Dims,
    Frame,
    FrameReader,
    FrameRejected,
    FramingLost,
    LineReader,
    Moment,
    MomentReader,
    MomentSizes,
    check_stream_id,
    decode_frame,
    decode_json,
    decode_message,
    decode_moment,
    encode_frame,
    encode_json_frame,
    encode_moment,
    moment_fields,
    moment_to_json,
)
from stream.streams import StreamTable

DIMS = Dims(3, 2, 4, 1)
SMALL = Dims(2, 1, 0, 1)

# The codec produces every reason but these, which belong to the pipeline and the listener.
PIPELINE_REASONS = {"duplicate_seq", "stale_seq", "too_many_streams", "seq_jump", "forbidden"}
CODEC_REASONS = set(REASONS) - PIPELINE_REASONS


def rejected(reason: str, call, *args, **kwargs) -> FrameRejected:
    with pytest.raises(FrameRejected) as info:
        call(*args, **kwargs)
    assert info.value.reason == reason, info.value
    return info.value


def raw_frame(
    stream_id: bytes = b"arm-1",
    counts: tuple[int, int, int, int] = (3, 2, 4, 1),
    *,
    magic: bytes = b"ESF1",
    length: int | None = None,
    version: int = 1,
    sid_len: int | None = None,
    reserved: tuple[int, int] = (0, 0),
    seq: int = 1,
    timestamp: float = 0.5,
    payload: list[float] | None = None,
) -> bytes:
    """A frame built field by field from the PROTOCOL.md table, independent of the encoder."""
    sid_len = len(stream_id) if sid_len is None else sid_len
    pad = b"\0" * (-len(stream_id) % 4)
    values = payload if payload is not None else [float(i) for i in range(sum(counts))]
    body = struct.pack(f"<{len(values)}f", *values)
    if length is None:
        length = 32 + len(stream_id) + len(pad) + len(body)
    header = struct.pack(
        "<4sIHHHHHHHHQd",
        magic,
        length,
        version,
        reserved[0],
        sid_len,
        *counts,
        reserved[1],
        seq,
        timestamp,
    )
    return header + stream_id + pad + body


def full_frame(stream_id: str = "arm-1", seq: int = 1, fill: float = 0.0) -> bytes:
    return encode_frame(
        stream_id,
        seq,
        seq / 100,
        sensory=np.arange(3) + fill,
        proprio=np.arange(2) + fill,
        tactile=np.arange(4) + fill,
        motor=[fill],
    )


# --------------------------------------------------------------------------- binary frames


def test_hex_vector_matches_the_table():
    # dims (2,1,0,1), stream "ab", seq 7, t 1.5, sensory [1,2], proprio [3], motor [4]
    expected = bytes.fromhex(
        "45534631"  # magic "ESF1"
        "34000000"  # length: 32 + L 2 + pad 2 + 4*4 = 52
        "0100"  # version 1
        "0000"  # reserved
        "0200"  # L = 2
        "0200"  # N_sensory = 2
        "0100"  # N_proprio = 1
        "0000"  # N_tactile = 0 (absent)
        "0100"  # N_motor = 1
        "0000"  # reserved
        "0700000000000000"  # seq = 7
        "000000000000f83f"  # timestamp = 1.5 (f64 0x3FF8000000000000)
        "6162"  # "ab"
        "0000"  # padding to a multiple of 4
        "0000803f"  # 1.0f
        "00000040"  # 2.0f
        "00004040"  # 3.0f
        "00008040"  # 4.0f
    )
    encoded = encode_frame("ab", 7, 1.5, sensory=[1.0, 2.0], proprio=[3.0], motor=[4.0])
    assert encoded == expected
    frame = decode_frame(expected, SMALL)
    assert (frame.stream_id, frame.seq, frame.timestamp) == ("ab", 7, 1.5)
    assert frame.present == SENSORY | PROPRIO | MOTOR
    np.testing.assert_array_equal(frame.payload, [1, 2, 3, 4])


@pytest.mark.parametrize("stream_id", ["a", "ab", "abc", "abcd", "arm-1", "é", "x" * 255])
def test_frame_round_trip(stream_id):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(n).astype(np.float32) for n in DIMS]
    data = encode_frame(stream_id, 2**64 - 1, -3.25, sensory=parts[0], proprio=parts[1],
                        tactile=parts[2], motor=parts[3])  # fmt: skip
    assert len(data) % 4 == 0
    frame = decode_frame(data, DIMS, received_ns=123, source="udp")
    assert isinstance(frame, Frame)
    assert (frame.stream_id, frame.seq, frame.timestamp) == (stream_id, 2**64 - 1, -3.25)
    assert (frame.received_ns, frame.source) == (123, "udp")
    assert frame.present == ALL_PRESENT
    assert frame.payload.dtype == np.float32 and frame.payload.shape == (DIMS.total,)
    np.testing.assert_array_equal(frame.payload, np.concatenate(parts))


def test_absent_modalities_are_zero_filled_with_bit_clear():
    data = encode_frame("s", 1, 0.0, proprio=[5, 6], motor=[7])
    frame = decode_frame(data, DIMS)
    assert frame.present == PROPRIO | MOTOR
    assert not frame.present & (SENSORY | TACTILE)
    np.testing.assert_array_equal(frame.payload, [0, 0, 0, 5, 6, 0, 0, 0, 0, 7])
    nothing = decode_frame(encode_frame("s", 1, 0.0), DIMS)
    assert nothing.present == 0
    np.testing.assert_array_equal(nothing.payload, np.zeros(DIMS.total))


def test_zero_dimension_is_never_present():
    frame = decode_frame(encode_frame("s", 1, 0.0, sensory=[1, 2], motor=[3]), SMALL)
    assert frame.present == SENSORY | MOTOR
    assert not frame.present & TACTILE


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_payload_owns_its_memory(kind):
    buf = bytearray(full_frame(fill=1.0))
    frame = decode_frame(kind(buf) if kind is not bytearray else buf, DIMS)
    before = frame.payload.copy()
    buf[-40:] = b"\xff" * 40
    np.testing.assert_array_equal(frame.payload, before)
    assert frame.payload.base is None
    buf.extend(b"resizable: no export is left behind")


def test_unknown_flag_bits_and_the_reserved_field_are_ignored():
    frame = decode_frame(raw_frame(reserved=(0xBEEC, 0xFFFF)), DIMS)  # START, REPLY clear
    assert frame.stream_id == "arm-1" and frame.present == ALL_PRESENT


def test_bad_magic():
    error = rejected("bad_magic", decode_frame, b"XSF1" + full_frame()[4:], DIMS)
    assert "ESF1" in error.detail
    rejected("bad_magic", decode_frame, b"", DIMS)
    rejected("bad_magic", decode_frame, encode_moment(_moment()), DIMS)


@pytest.mark.parametrize(
    "data",
    [
        full_frame()[:-1],  # truncated
        full_frame() + b"\0",  # trailing byte
        full_frame()[:6],  # shorter than the length field
        raw_frame()[:8],  # header cut after the length field
        raw_frame(length=76)[:-4],  # length matches the buffer, the header says 80
        struct.pack("<4sI", b"ESF1", 8) + b"\0" * 8,  # length < 32
        raw_frame(length=84) + b"\0" * 4,  # length matches the buffer, the header says 80
    ],
)
def test_bad_length(data):
    rejected("bad_length", decode_frame, data, DIMS)


def test_bad_length_detail_quotes_values():
    error = rejected("bad_length", decode_frame, raw_frame(length=84) + b"\0" * 4, DIMS)
    assert "length=84" in error.detail and "expected 80" in error.detail


def test_oversize_is_checked_before_anything_else_after_magic():
    data = full_frame()
    error = rejected("oversize", decode_frame, data, DIMS, max_frame_bytes=len(data) - 9)
    assert str(len(data) - 8) in error.detail
    assert decode_frame(data, DIMS, max_frame_bytes=len(data) - 8).seq == 1
    huge = struct.pack("<4sI", b"ESF1", DEFAULT_MAX_FRAME_BYTES + 1) + b"\xff" * 60
    rejected("oversize", decode_frame, huge, DIMS)


def test_bad_version():
    error = rejected("bad_version", decode_frame, raw_frame(version=2), DIMS)
    assert "version=2" in error.detail


@pytest.mark.parametrize(
    "data",
    [
        raw_frame(b"", sid_len=0),
        raw_frame(b"x" * 256),
        raw_frame(b"\xff\xfe"),  # not UTF-8
        raw_frame(b"\xc3"),  # truncated UTF-8 sequence
        raw_frame(b"a b"),
        raw_frame(b"a\tb"),
        raw_frame(b"a\nb"),
        raw_frame(b"a\x00"),
        raw_frame(b"\x7f"),
        raw_frame("a\u00a0b".encode()),  # no-break space
        raw_frame("a\u200bb".encode()),  # zero-width space (format character)
        *(raw_frame(b"a" + c + b"b") for c in (b"*", b">", b"#", b"+", b"/")),
    ],
)
def test_bad_stream_id(data):
    rejected("bad_stream_id", decode_frame, data, DIMS)


@pytest.mark.parametrize("stream_id", ["arm-1", "wrist.left", "é-ü", "A_b:c@d", "x" * 255])
def test_valid_stream_ids(stream_id):
    check_stream_id(stream_id)
    assert decode_frame(encode_frame(stream_id, 1, 0.0), DIMS).stream_id == stream_id


def test_dim_mismatch():
    error = rejected("dim_mismatch", decode_frame, raw_frame(counts=(3, 12, 4, 1)), DIMS)
    assert error.detail == "N_proprio=12, expected 0 or 2"
    error = rejected("dim_mismatch", decode_frame, raw_frame(counts=(2, 1, 3, 1)), SMALL)
    assert error.detail == "N_tactile=3, expected 0"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_payload_and_timestamp(bad):
    values = [0.0] * DIMS.total
    values[-1] = bad
    error = rejected("non_finite", decode_frame, raw_frame(payload=values), DIMS)
    assert f"payload[{DIMS.total - 1}]" in error.detail
    rejected("non_finite", decode_frame, raw_frame(timestamp=bad), DIMS)


def test_encode_frame_validates_what_it_must():
    for stream_id in ("", "x" * 256, "é" * 128):
        with pytest.raises(ValueError):
            encode_frame(stream_id, 1, 0.0)
    for seq in (-1, 2**64):
        with pytest.raises(ValueError):
            encode_frame("a", seq, 0.0)
    with pytest.raises(ValueError):
        encode_frame("a", 1, 0.0, sensory=np.zeros(65536))
    # what the daemon rejects is still encodable
    rejected("bad_stream_id", decode_frame, encode_frame("a b", 1, 0.0), DIMS)


# --------------------------------------------------------------------------- JSON frames


def test_json_round_trip():
    line = encode_json_frame("arm-1", 9, 0.25, sensory=[0.1, 2, 3], tactile=np.ones(4), motor=[-1])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    frame = decode_json(line, DIMS, received_ns=5, source="json")
    assert (frame.stream_id, frame.seq, frame.timestamp) == ("arm-1", 9, 0.25)
    assert (frame.received_ns, frame.source) == (5, "json")
    assert frame.present == SENSORY | TACTILE | MOTOR
    expected = np.array([0.1, 2, 3, 0, 0, 1, 1, 1, 1, -1], np.float32)
    np.testing.assert_array_equal(frame.payload, expected)
    assert frame.payload.dtype == np.float32
    assert decode_json(line.decode(), DIMS).seq == 9


def test_json_null_or_missing_modality_is_absent_and_extra_keys_ignored():
    text = '{"stream": "s", "seq": 0, "t": 1, "proprio": null, "motor": [2], "extra": {}}'
    frame = decode_json(text, DIMS)
    assert frame.present == MOTOR and frame.timestamp == 1.0
    np.testing.assert_array_equal(frame.payload, [0] * 9 + [2])


def test_json_empty_list_is_absent_only_for_a_zero_dim():
    frame = decode_json('{"stream": "s", "seq": 0, "t": 0, "tactile": []}', SMALL)
    assert frame.present == 0
    error = rejected("dim_mismatch", decode_json, '{"stream":"s","seq":0,"t":0,"motor":[]}', SMALL)
    assert error.detail == "len(motor)=0, expected 1"


def json_line(**fields) -> str:
    obj = {"stream": "s", "seq": 1, "t": 0.0, **fields}
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    "text",
    [
        b'{"stream": "\xff"}',
        "not json",
        "{",
        '{"stream": "s", "seq": 1, "t": 0}{}',
        "[1, 2]",
        '"a string"',
        "[" * 100_000 + "]" * 100_000,  # too deep for the parser
        json_line(stream=...),
        json_line(seq=...),
        json_line(t=...),
        json_line(stream=5),
        json_line(stream=None),
        json_line(seq=True),
        json_line(seq=-1),
        json_line(seq=2**64),
        json_line(seq=1.0),
        json_line(seq="1"),
        json_line(t="0.1"),
        json_line(t=False),
        json_line(t=None),
        json_line(sensory="1,2,3"),
        json_line(sensory={"a": 1}),
        json_line(sensory={}),
        json_line(sensory=""),
        json_line(sensory=[1, 2, "3"]),
        json_line(sensory=[1, 2, True]),
        json_line(sensory=[1, 2, [3]]),
        json_line(sensory=[1, 2, None]),
    ],
)
def test_bad_json(text):
    rejected("bad_json", decode_json, text, DIMS)


def test_json_lone_surrogate_is_bad_json():
    rejected("bad_json", decode_json, '{"stream": "\ud800", "seq": 1, "t": 0}', DIMS)


@pytest.mark.parametrize("stream_id", ["", "a b", "a/b", "a*", "a>", "#", "a+b", "x" * 256, "\n"])
def test_json_bad_stream_id(stream_id):
    rejected("bad_stream_id", decode_json, json_line(stream=stream_id), DIMS)


def test_json_escaped_control_character_in_stream_id():
    rejected("bad_stream_id", decode_json, '{"stream": "a\\u0000", "seq": 1, "t": 0}', DIMS)


def test_json_dim_mismatch():
    error = rejected("dim_mismatch", decode_json, json_line(proprio=[1, 2, 3]), DIMS)
    assert error.detail == "len(proprio)=3, expected 2"


@pytest.mark.parametrize(
    "text",
    [
        '{"stream": "s", "seq": 1, "t": 0, "motor": [NaN]}',
        '{"stream": "s", "seq": 1, "t": 0, "motor": [Infinity]}',
        '{"stream": "s", "seq": 1, "t": 0, "motor": [-Infinity]}',
        '{"stream": "s", "seq": 1, "t": NaN}',
        '{"stream": "s", "seq": 1, "t": 1e400}',
        '{"stream": "s", "seq": 1, "t": 1' + "0" * 400 + "}",
        '{"stream": "s", "seq": 1, "t": 0, "motor": [1e39]}',  # beyond float32
        '{"stream": "s", "seq": 1, "t": 0, "motor": [-1e400]}',
        '{"stream": "s", "seq": 1, "t": 0, "motor": [1' + "0" * 400 + "]}",
    ],
)
def test_json_non_finite(text):
    rejected("non_finite", decode_json, text, DIMS)


def test_json_oversize():
    line = encode_json_frame("s", 1, 0.0, sensory=[1, 2, 3])
    rejected("oversize", decode_json, line, DIMS, max_frame_bytes=len(line) - 1)
    rejected("oversize", decode_json, line.decode(), DIMS, max_frame_bytes=len(line) - 1)
    assert decode_json(line, DIMS, max_frame_bytes=len(line)).seq == 1


def test_encode_json_frame_writes_nan_for_the_daemon_to_reject():
    line = encode_json_frame("s", 1, 0.0, motor=[float("nan")])
    rejected("non_finite", decode_json, line, DIMS)


def test_decode_message_dispatches_on_the_first_byte():
    binary = full_frame(seq=3)
    text = encode_json_frame("j", 4, 0.0, motor=[1])
    assert decode_message(binary, DIMS, source="udp").seq == 3
    frame = decode_message(memoryview(text), DIMS, received_ns=7, source="nats")
    assert (frame.stream_id, frame.received_ns, frame.source) == ("j", 7, "nats")
    rejected("bad_json", decode_message, b"{oops", DIMS)
    rejected("bad_magic", decode_message, b" {}", DIMS)


# --------------------------------------------------------------------------- FrameReader


def frames_and_bad(count: int = 20) -> tuple[bytes, list[object]]:
    """A stream with good frames and non-fatal rejects mixed; the expected item per frame."""
    parts, expected = [], []
    for i in range(count):
        if i % 5 == 3:
            parts.append(raw_frame(counts=(3, 1, 4, 1)))
            expected.append("dim_mismatch")
        elif i % 7 == 6:
            parts.append(raw_frame(version=9))
            expected.append("bad_version")
        else:
            parts.append(full_frame(f"s{i % 3}", seq=i, fill=i))
            expected.append(i)
    return b"".join(parts), expected


def check_items(items, expected):
    assert len(items) == len(expected)
    for item, want in zip(items, expected, strict=True):
        if isinstance(want, str):
            assert isinstance(item, FrameRejected) and item.reason == want
            assert not isinstance(item, FramingLost)
        else:
            assert isinstance(item, Frame) and item.seq == want and item.source == "tcp"
            assert item.payload[-1] == want


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 40, 41, 64, 1000, 100_000])
def test_frame_reader_fixed_chunks(chunk):
    stream, expected = frames_and_bad()
    reader = FrameReader(DIMS)
    items = []
    for start in range(0, len(stream), chunk):
        items += reader.feed(stream[start : start + chunk], received_ns=start)
    check_items(items, expected)
    assert reader.pending_bytes == 0


def test_frame_reader_random_splits_and_input_types():
    stream, expected = frames_and_bad(40)
    rnd = random.Random(1)
    for _ in range(20):
        reader = FrameReader(DIMS)
        items, pos = [], 0
        while pos < len(stream):
            step = rnd.randint(0, 300)
            chunk = stream[pos : pos + step]
            kind = rnd.choice([bytes, bytearray, memoryview])
            items += reader.feed(kind(chunk), 0)
            pos += step
        check_items(items, expected)


def test_frame_reader_passes_received_ns_of_the_completing_chunk():
    data = full_frame()
    reader = FrameReader(DIMS, source="tcp")
    assert reader.feed(data[:10], 1) == []
    assert reader.pending_bytes == 10
    (frame,) = reader.feed(data[10:], 2)
    assert isinstance(frame, Frame) and frame.received_ns == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        struct.pack("<4sI", b"ESF1", 31) + b"\0" * 31,  # length < 32
        raw_frame(length=200) + b"\0" * 116,  # length inconsistent with the header
    ],
)
def test_frame_reader_loses_framing(garbage):
    reader = FrameReader(DIMS)
    assert len(reader.feed(full_frame(), 0)) == 1
    with pytest.raises(FramingLost) as info:
        for byte in range(len(garbage)):
            reader.feed(garbage[byte : byte + 1], 0)
    assert info.value.reason == ("bad_magic" if garbage[:4] != b"ESF1" else "bad_length")
    assert reader.pending_bytes == 0
    with pytest.raises(FramingLost):  # and it stays lost
        reader.feed(full_frame(), 0)


def test_frame_reader_inconsistent_length_is_detected_from_the_header_alone():
    reader = FrameReader(DIMS)
    with pytest.raises(FramingLost) as info:
        reader.feed(raw_frame(length=100_000)[:40], 0)  # the body has not arrived
    assert info.value.reason == "bad_length"


def test_frame_reader_skips_oversize_without_buffering_it():
    max_bytes = 256
    big = encode_frame("big", 1, 0.0, sensory=np.ones(3000))
    small = full_frame(seq=2)
    stream = full_frame(seq=1) + big + small + big + small
    for chunk in (1, 13, 100, len(stream)):
        reader = FrameReader(DIMS, max_frame_bytes=max_bytes)
        items = []
        for start in range(0, len(stream), chunk):
            items += reader.feed(stream[start : start + chunk], 0)
            assert reader.pending_bytes <= max_bytes + 8
        reasons = [i.reason if isinstance(i, FrameRejected) else i.seq for i in items]
        assert reasons == [1, "oversize", 2, "oversize", 2]


def test_frame_reader_many_frames_in_one_chunk():
    stream = b"".join(full_frame(seq=i) for i in range(1000))
    items = FrameReader(DIMS).feed(stream, 0)
    assert [f.seq for f in items if isinstance(f, Frame)] == list(range(1000))


# --------------------------------------------------------------------------- LineReader


def test_line_reader_splits_crlf_and_empty_lines():
    lines = [encode_json_frame(f"s{i}", i, 0.0, motor=[i]) for i in range(10)]
    stream = b"\n\r\n".join(line.replace(b"\n", b"\r\n") for line in lines) + b"\n\n"
    for chunk in (1, 5, 64, len(stream)):
        reader = LineReader(DIMS)
        items = []
        for start in range(0, len(stream), chunk):
            items += reader.feed(stream[start : start + chunk], 0)
        assert [f.seq for f in items if isinstance(f, Frame)] == list(range(10))
        assert len(items) == 10 and all(f.source == "json" for f in items)
        assert reader.pending_bytes == 0


def test_line_reader_rejects_and_continues():
    good = encode_json_frame("s", 1, 0.0)
    stream = b"garbage\n" + good + b'{"stream": "s", "seq": 2, "t": 0, "motor": [1, 2]}\n' + good
    items = LineReader(DIMS).feed(stream, 0)
    assert [getattr(i, "reason", None) for i in items] == ["bad_json", None, "dim_mismatch", None]


def test_line_reader_oversize_line_is_discarded_to_its_newline():
    max_bytes = 100
    good = encode_json_frame("s", 1, 0.0, motor=[1])
    long_line = b'{"stream": "s", "seq": 5, "t": 0, "pad": "' + b"x" * 1000 + b'"}\n'
    stream = good + long_line + good + long_line + good
    for chunk in (1, 7, 50, len(stream)):
        reader = LineReader(DIMS, max_frame_bytes=max_bytes)
        items = []
        for start in range(0, len(stream), chunk):
            items += reader.feed(stream[start : start + chunk], 0)
            assert reader.pending_bytes <= max_bytes + 1
        reasons = [i.reason if isinstance(i, FrameRejected) else i.seq for i in items]
        assert reasons == [1, "oversize", 1, "oversize", 1]


def test_line_reader_never_loses_framing():
    reader = LineReader(DIMS)
    items = reader.feed(full_frame() + b"\n" + encode_json_frame("s", 3, 0.0), 0)
    assert isinstance(items[0], FrameRejected) and items[0].reason == "bad_json"
    assert isinstance(items[-1], Frame) and items[-1].seq == 3


# --------------------------------------------------------------------------- which frame


def about(rejection: FrameRejected) -> tuple[str, str | None, int | None]:
    return rejection.reason, rejection.stream_id, rejection.seq


def test_binary_rejection_names_the_frame_once_its_header_is_read():
    def decode(data: bytes) -> tuple[str, str | None, int | None]:
        with pytest.raises(FrameRejected) as info:
            decode_frame(data, DIMS)
        return about(info.value)

    nan = [0.0] * (DIMS.total - 1) + [float("nan")]
    assert decode(raw_frame(seq=7, counts=(3, 12, 4, 1))) == ("dim_mismatch", "arm-1", 7)
    assert decode(raw_frame(seq=7, payload=nan)) == ("non_finite", "arm-1", 7)
    assert decode(raw_frame(seq=7, timestamp=float("inf"))) == ("non_finite", "arm-1", 7)
    # A bad id is not repeated back; a bad id or dims with a bad id: the seq only.
    assert decode(raw_frame(b"a b", seq=7)) == ("bad_stream_id", None, 7)
    assert decode(raw_frame(b"\xff\xfe", seq=7)) == ("bad_stream_id", None, 7)
    assert decode(raw_frame(b"a b", seq=7, counts=(3, 12, 4, 1))) == ("dim_mismatch", None, 7)
    # Before the header is known consistent, nothing is.
    assert decode(raw_frame(seq=7, magic=b"XXXX")) == ("bad_magic", None, None)
    assert decode(raw_frame(seq=7, version=2)) == ("bad_version", None, None)
    assert decode(raw_frame(seq=7, length=1000)) == ("bad_length", None, None)
    assert decode(raw_frame(seq=7)[:-4]) == ("bad_length", None, None)
    frame = raw_frame(seq=7)
    with pytest.raises(FrameRejected) as info:
        decode_frame(frame, DIMS, max_frame_bytes=len(frame) - 9)
    assert about(info.value) == ("oversize", None, None)


def test_json_rejection_names_the_frame_when_it_has_a_valid_stream_and_seq():
    def decode(text: str) -> tuple[str, str | None, int | None]:
        with pytest.raises(FrameRejected) as info:
            decode_json(text, DIMS)
        return about(info.value)

    arm = {"stream": "arm-1", "seq": 7}
    assert decode(json_line(**arm, motor=[1, 2])) == ("dim_mismatch", "arm-1", 7)
    assert decode(json_line(**arm, sensory=[1, 2, 1e39])) == ("non_finite", "arm-1", 7)
    assert decode(json_line(**arm, t=10**400)) == ("non_finite", "arm-1", 7)
    assert decode(json_line(**arm, t=...)) == ("bad_json", "arm-1", 7)
    assert decode(json_line(**arm, tactile="1")) == ("bad_json", "arm-1", 7)
    assert decode(json_line(stream="arm-1", seq=-1)) == ("bad_json", "arm-1", None)
    assert decode(json_line(stream="arm-1", seq="7")) == ("bad_json", "arm-1", None)
    assert decode(json_line(stream=7, seq=7)) == ("bad_json", None, 7)
    assert decode(json_line(stream="a b", seq=7)) == ("bad_stream_id", None, 7)
    assert decode('{"stream": "arm-1", "seq": 7, "t": NaN}') == ("non_finite", None, None)
    assert decode('{"stream": "arm-1", "seq": 7') == ("bad_json", None, None)
    assert decode("[1]") == ("bad_json", None, None)


def test_readers_keep_which_frame_a_rejection_is_about():
    line = json_line(stream="arm-1", seq=7, motor=[1, 2]).encode() + b"\n"
    (item,) = LineReader(DIMS).feed(line, 0)
    assert isinstance(item, FrameRejected) and about(item) == ("dim_mismatch", "arm-1", 7)
    nan = [0.0] * (DIMS.total - 1) + [float("nan")]
    bad = raw_frame(seq=7, payload=nan)
    for data in (bad, bad + full_frame(seq=8) * 5):  # alone, and in a run of like frames
        for runs in (False, True):
            item = FrameReader(DIMS, runs=runs).feed(data, 0)[0]
            assert isinstance(item, FrameRejected) and about(item) == ("non_finite", "arm-1", 7)


def test_admission_rejections_name_the_frame():
    # The pipeline's own reasons (not the codec's) come from `StreamTable.admit`.
    table = StreamTable(2, max_known=2)
    table.admit("arm-1", 7)
    table.admit("arm-2", 1)
    for stream_id, seq, reason in [
        ("arm-1", 7, "duplicate_seq"),
        ("arm-1", 6, "stale_seq"),
        ("arm-3", 1, "too_many_streams"),
    ]:
        with pytest.raises(FrameRejected) as info:
            table.admit(stream_id, seq)
        assert about(info.value) == (reason, stream_id, seq)


# --------------------------------------------------------------------------- moments


SIZES = MomentSizes(4, 3, 2, 1)


def _moment(stream_id: str = "arm-1", sizes: MomentSizes = SIZES) -> Moment:
    values = np.arange(sizes.total, dtype=np.float32) / 4
    return Moment(stream_id, 42, 1.25, 123_456, 5, sizes, values)


@pytest.mark.parametrize("stream_id", ["a", "ab", "abc", "abcd", "é"])
def test_moment_round_trip(stream_id):
    m = _moment(stream_id)
    data = encode_moment(m)
    assert len(data) % 4 == 0
    assert data[:4] == b"ESM1"
    assert struct.unpack_from("<I", data, 4)[0] == len(data) - 8
    sid_len = len(stream_id.encode())
    assert struct.unpack_from("<HHHHHHHH", data, 8) == (1, 5, sid_len, 4, 3, 2, 1, 3)
    assert struct.unpack_from("<QdQ", data, 24) == (42, 1.25, 123_456)
    back, used = decode_moment(data + b"more")
    assert used == len(data)
    assert (back.stream_id, back.seq, back.timestamp) == (stream_id, 42, 1.25)
    assert (back.latency_ns, back.flags, back.sizes) == (123_456, 5, m.sizes)
    np.testing.assert_array_equal(back.values, m.values)
    assert back.values.dtype == np.float32 and back.values.base is None


def test_decode_moment_errors():
    data = encode_moment(_moment())
    for bad in (data[:-1], b"ESF1" + data[4:], data[:8] + b"\2" + data[9:]):
        with pytest.raises(ValueError):
            decode_moment(bad)
    with pytest.raises(ValueError):
        encode_moment(Moment("s", 1, 0.0, 0, 0, MomentSizes(1, 1, 1, 1), np.zeros(3)))


def test_moment_reader_across_chunk_splits():
    moments = [_moment(f"s{i}") for i in range(30)]
    stream = b"".join(encode_moment(m) for m in moments)
    rnd = random.Random(2)
    for chunk in (1, 3, 17, None):
        reader = MomentReader()
        out, pos = [], 0
        while pos < len(stream):
            step = chunk or rnd.randint(1, 200)
            out += reader.feed(stream[pos : pos + step])
            pos += step
        assert [m.stream_id for m in out] == [m.stream_id for m in moments]
        assert reader.pending_bytes == 0
    with pytest.raises(ValueError):
        MomentReader().feed(b"XXXX\0\0\0\0")


def test_moment_fields_and_json():
    m = _moment()
    fields = moment_fields(m)
    assert list(fields) == ["moment", "synthesis", "schema", "motor", "scalars"]
    assert [len(v) for v in fields.values()] == [4, 3, 2, 1, 3]
    np.testing.assert_array_equal(np.concatenate(list(fields.values())), m.values)
    line = moment_to_json(m)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj["stream"] == "arm-1" and obj["seq"] == 42 and obj["t"] == 1.25
    assert obj["latency_ns"] == 123_456 and obj["flags"] == 5
    assert obj["schema"] == [1.75, 2.0] and obj["motor"] == [2.25]
    assert obj["scalars"] == {"coherence": 2.5, "boundary": 2.75, "confidence": 3.0}


def test_moment_json_writes_non_finite_as_null():
    m = _moment()
    m.values[0] = np.nan
    m.values[-1] = np.inf

    def strict(token):
        raise AssertionError(token)

    obj = json.loads(moment_to_json(m), parse_constant=strict)
    assert obj["moment"][0] is None and obj["scalars"]["confidence"] is None


# One minimal example per reason; the detailed cases are above.
EXAMPLES = {
    "bad_magic": (decode_frame, b"ESM1" + full_frame()[4:]),
    "bad_version": (decode_frame, raw_frame(version=0)),
    "bad_length": (decode_frame, full_frame()[:-4]),
    "oversize": (decode_frame, raw_frame(length=DEFAULT_MAX_FRAME_BYTES + 1)),
    "bad_stream_id": (decode_frame, raw_frame(b"a>b")),
    "dim_mismatch": (decode_frame, raw_frame(counts=(0, 0, 0, 2))),
    "non_finite": (decode_frame, raw_frame(payload=[float("nan")] * DIMS.total)),
    "bad_json": (decode_json, b"{}"),
}


def test_every_codec_reason_has_an_example():
    assert set(EXAMPLES) == CODEC_REASONS


@pytest.mark.parametrize("reason", sorted(EXAMPLES))
def test_reason_example(reason):
    decode, data = EXAMPLES[reason]
    rejected(reason, decode, data, DIMS)
    rejected(reason, decode_message, data, DIMS)
