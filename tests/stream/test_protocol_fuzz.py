"""Property tests: whatever the bytes, the decoders reject with `FrameRejected` or decode a
well-formed frame; valid input survives every round trip and chunking."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream.protocol import (
    ALL_PRESENT,
    SESSION_START,
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
)

pytestmark = pytest.mark.reliability

DIMS = Dims(3, 2, 0, 2)
NAMES = ("sensory", "proprio", "tactile", "motor")
MAX_BYTES = 4096

fuzz = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

stream_ids = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=("C", "Z"), exclude_characters="*>#+/"
    ),
    min_size=1,
    max_size=12,
)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def frame_args(draw) -> tuple[str, int, float, dict[str, np.ndarray | None]]:
    stream_id = draw(stream_ids)
    seq = draw(st.integers(0, 2**64 - 1))
    timestamp = draw(st.floats(allow_nan=False, allow_infinity=False))
    parts = {
        name: draw(st.none() | hnp.arrays(np.float32, dim, elements=finite32))
        for name, dim in zip(NAMES, DIMS, strict=True)
    }
    return stream_id, seq, timestamp, parts


def encoded(args) -> bytes:
    stream_id, seq, timestamp, parts = args
    return encode_frame(stream_id, seq, timestamp, **parts)


def assert_well_formed(frame: Frame, dims: Dims = DIMS) -> None:
    assert isinstance(frame, Frame)
    assert frame.payload.dtype == np.float32 and frame.payload.shape == (dims.total,)
    assert frame.payload.base is None
    assert np.isfinite(frame.payload).all() and math.isfinite(frame.timestamp)
    check_stream_id(frame.stream_id)
    assert 0 <= frame.seq < 2**64
    start = 0
    for bit, dim in zip((1, 2, 4, 8), dims, strict=True):
        if not dim:
            assert not frame.present & bit
        if not frame.present & bit:
            assert not frame.payload[start : start + dim].any()
        start += dim
    assert frame.present & ~(ALL_PRESENT | SESSION_START) == 0  # presence, session start


def decode_or_reject(decode, data, **kwargs):
    try:
        frame = decode(data, DIMS, max_frame_bytes=MAX_BYTES, **kwargs)
    except FramingLost:  # pragma: no cover - a single-buffer decoder never loses framing
        pytest.fail("FramingLost from a single-buffer decoder")
    except FrameRejected as exc:
        assert exc.reason in {
            "bad_magic",
            "bad_version",
            "bad_length",
            "oversize",
            "bad_stream_id",
            "dim_mismatch",
            "non_finite",
            "bad_json",
        }
        return None
    assert_well_formed(frame)
    return frame


def feed_all(reader: FrameReader, data: bytes, cuts: list[int]) -> list[Frame | FrameRejected]:
    items: list[Frame | FrameRejected] = []
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        items += reader.feed(data[pos:cut], 0)
        pos = max(pos, cut)
    return items


# --------------------------------------------------------------------------- round trips


@fuzz
@given(frame_args())
def test_binary_round_trip(args):
    stream_id, seq, timestamp, parts = args
    frame = decode_frame(encoded(args), DIMS)
    assert_well_formed(frame)
    assert (frame.stream_id, frame.seq, frame.timestamp) == (stream_id, seq, timestamp)
    expected = [np.zeros(d, np.float32) if parts[n] is None else parts[n] for n, d in
                zip(NAMES, DIMS, strict=True)]  # fmt: skip
    np.testing.assert_array_equal(frame.payload, np.concatenate(expected))


@fuzz
@given(frame_args())
def test_json_round_trip(args):
    stream_id, seq, timestamp, parts = args
    frame = decode_json(encode_json_frame(stream_id, seq, timestamp, **parts), DIMS)
    binary = decode_frame(encoded(args), DIMS)
    assert (frame.stream_id, frame.seq, frame.timestamp) == (stream_id, seq, timestamp)
    assert frame.present == binary.present
    np.testing.assert_array_equal(frame.payload, binary.payload)


@fuzz
@given(st.lists(frame_args(), min_size=1, max_size=8), st.lists(st.integers(0, 2000)))
def test_frame_reader_any_chunking(frames, cuts):
    data = b"".join(encoded(args) for args in frames)
    items = feed_all(FrameReader(DIMS, max_frame_bytes=MAX_BYTES), data, cuts)
    assert [(f.stream_id, f.seq) for f in items if isinstance(f, Frame)] == [
        (args[0], args[1]) for args in frames
    ]


@fuzz
@given(st.lists(frame_args(), min_size=1, max_size=8), st.lists(st.integers(0, 3000)))
def test_line_reader_any_chunking(frames, cuts):
    data = b"".join(encode_json_frame(a[0], a[1], a[2], **a[3]) for a in frames)
    reader = LineReader(DIMS)
    items: list[Frame | FrameRejected] = []
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        items += reader.feed(data[pos:cut], 0)
        pos = max(pos, cut)
    assert [(f.stream_id, f.seq) for f in items if isinstance(f, Frame)] == [
        (a[0], a[1]) for a in frames
    ]


@st.composite
def moments(draw) -> Moment:
    sizes = MomentSizes(*draw(st.lists(st.integers(0, 5), min_size=4, max_size=4)))
    return Moment(
        draw(stream_ids),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.floats(allow_nan=False)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 7)),
        sizes,
        draw(hnp.arrays(np.float32, sizes.total, elements=finite32)),
    )


@fuzz
@given(st.lists(moments(), min_size=1, max_size=6), st.lists(st.integers(0, 1000)))
def test_moment_reader_any_chunking(records, cuts):
    data = b"".join(encode_moment(m) for m in records)
    assert decode_moment(data)[0].stream_id == records[0].stream_id
    reader = MomentReader()
    out: list[Moment] = []
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        out += reader.feed(data[pos:cut])
        pos = max(pos, cut)
    assert len(out) == len(records)
    for got, want in zip(out, records, strict=True):
        assert (got.stream_id, got.seq, got.latency_ns, got.flags, got.sizes) == (
            want.stream_id,
            want.seq,
            want.latency_ns,
            want.flags,
            want.sizes,
        )
        np.testing.assert_array_equal(got.values, want.values)


# --------------------------------------------------------------------------- hostile input


@fuzz
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: b"ESF1" + b))
def test_random_bytes(data):
    decode_or_reject(decode_frame, data)
    decode_or_reject(decode_message, data)
    decode_or_reject(decode_json, data)
    LineReader(DIMS, max_frame_bytes=64).feed(data, 0)


@fuzz
@given(frame_args(), st.data())
def test_truncated_frame_never_decodes(args, data):
    full = encoded(args)
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(FrameRejected):
        decode_frame(full[:cut], DIMS)
    with pytest.raises(FrameRejected):
        decode_message(full[:cut], DIMS)
    reader = FrameReader(DIMS)
    assert reader.feed(full[:cut], 0) == []
    assert reader.pending_bytes == cut


# Offsets and formats of the header fields after the magic (PROTOCOL.md frame table).
HEADER_FIELDS = [(4, "<I"), (8, "<H"), (10, "<H"), (12, "<H"), (14, "<H"), (16, "<H"),
                 (18, "<H"), (20, "<H"), (22, "<H"), (24, "<Q"), (32, "<d")]  # fmt: skip


@fuzz
@given(frame_args(), st.sampled_from(HEADER_FIELDS), st.data())
def test_flipped_header_field(args, field, data):
    offset, fmt = field
    buf = bytearray(encoded(args))
    if fmt == "<d":
        value = data.draw(st.floats())
    else:
        size = struct.calcsize(fmt)
        value = data.draw(st.integers(0, 40) | st.integers(0, 2 ** (8 * size) - 1))
    struct.pack_into(fmt, buf, offset, value)
    decode_or_reject(decode_frame, bytes(buf))
    check_reader(bytes(buf))


@fuzz
@given(frame_args(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_corrupted_bytes(args, changes):
    buf = bytearray(encoded(args))
    for pos, value in changes:
        buf[pos % len(buf)] = value
    decode_or_reject(decode_frame, bytes(buf))
    decode_or_reject(decode_message, bytes(buf))
    check_reader(bytes(buf))


def check_reader(corrupted: bytes) -> None:
    """A corrupted frame then a good one: framing is lost, or the good one still decodes."""
    good = encode_frame("next", 7, 0.0, motor=[1, 2])
    reader = FrameReader(DIMS, max_frame_bytes=MAX_BYTES)
    try:
        items = reader.feed(corrupted + good, 0)
    except FramingLost as exc:
        assert exc.reason in {"bad_magic", "bad_length"}
        return
    assert reader.pending_bytes <= MAX_BYTES + 8
    for item in items:
        assert not isinstance(item, FramingLost)
        if isinstance(item, Frame):
            assert_well_formed(item)
    if reader.pending_bytes == 0:  # nothing buffered: the good frame came out last...
        last = items[-1]
        if isinstance(last, FrameRejected):  # ...unless an oversize skip swallowed it
            assert last.reason == "oversize"
        else:
            assert last.stream_id == "next"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
frame_keys = st.sampled_from(["stream", "seq", "t", *NAMES])
json_objects = st.dictionaries(frame_keys, json_values | stream_ids, max_size=7)
json_ish_text = st.text(alphabet='{}[]":,.-+eE0123456789 NaInfityrulsfm\\\n\x00é', max_size=80)


@fuzz
@given(json_objects | json_values)
def test_random_json_values(value):
    text = json.dumps(value)
    decode_or_reject(decode_json, text)
    decode_or_reject(decode_message, text.encode())


@fuzz
@given(json_ish_text)
def test_json_ish_text(text):
    decode_or_reject(decode_json, text)
    decode_or_reject(decode_json, ("{" + text).encode("utf-8", "surrogatepass"))
    LineReader(DIMS, max_frame_bytes=64).feed(text.encode("utf-8", "surrogatepass"), 0)
