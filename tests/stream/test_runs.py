"""The vectorised run decoder gives exactly what decoding frame by frame gives."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream.protocol import (
    Dims,
    Frame,
    FrameReader,
    FrameRejected,
    FrameRun,
    decode_frame,
    encode_frame,
)
from stream.protocol.runs import (
    MIN_RUN,
    decode_messages,
    decode_run,
    like_messages,
    message_runs,
)

DIMS = Dims(3, 2, 2, 1)
IDS = ["a-01", "b-02", "c\x0103", "d\xe9", "e 05", "f-06"]  # some invalid, one 2-byte char


def frames(rng: np.random.Generator, n: int, corrupt: float) -> list[bytes]:
    out = []
    for i in range(n):
        parts = {
            k: rng.standard_normal(d).astype(np.float32)
            for k, d in zip(("sensory", "proprio", "tactile", "motor"), DIMS, strict=True)
        }
        if rng.random() < corrupt:
            parts["proprio"][0] = np.nan
        ts = float("inf") if rng.random() < corrupt / 2 else i * 0.01
        sid = IDS[int(rng.integers(len(IDS)))] if rng.random() < corrupt else "ok-1"
        out.append(encode_frame(sid, i + 1, ts, **parts))
    return out


def same(a: Frame | FrameRejected, b: Frame | FrameRejected) -> None:
    assert type(a) is type(b)
    if isinstance(a, FrameRejected):
        assert isinstance(b, FrameRejected)
        assert (a.reason, a.stream_id, a.seq) == (b.reason, b.stream_id, b.seq)
        return
    assert isinstance(b, Frame)
    assert (a.stream_id, a.seq, a.timestamp, a.present, a.received_ns, a.source) == (
        b.stream_id,
        b.seq,
        b.timestamp,
        b.present,
        b.received_ns,
        b.source,
    )
    np.testing.assert_array_equal(a.payload, b.payload)
    assert a.payload.flags.owndata or a.payload.base is not None


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.floats(0, 0.5), st.integers(1, 97))
# A rejected id once cached its traceback, whose frames kept the receive buffer exported.
@example(seed=1, n=22, corrupt=1 / 3, chunk=27)
def test_reader_equals_frame_by_frame(seed: int, n: int, corrupt: float, chunk: int) -> None:
    rng = np.random.default_rng(seed)
    raw = frames(rng, n, corrupt)
    want = []
    for f in raw:
        try:
            want.append(decode_frame(f, DIMS, received_ns=7, source="tcp"))
        except FrameRejected as exc:
            want.append(exc)
    data = b"".join(raw)
    for runs in (False, True):
        got: list[Frame | FrameRejected] = []
        reader = FrameReader(DIMS, runs=runs)
        for start in range(0, len(data), chunk * 16):
            for item in reader.feed(data[start : start + chunk * 16], 7):
                got += item.frames() if isinstance(item, FrameRun) else [item]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            same(a, b)


def test_a_run_of_good_frames_comes_whole_and_owns_its_memory() -> None:
    raw = frames(np.random.default_rng(3), 12, 0.0)
    data = bytearray(b"".join(raw))
    items = FrameReader(DIMS, runs=True).feed(data, 5)
    assert len(items) == 1 and isinstance(items[0], FrameRun)
    run = items[0]
    assert len(run) == 12 and run.seq == list(range(1, 13)) and run.received_ns == 5
    want = [decode_frame(f, DIMS, received_ns=5, source="tcp") for f in raw]
    data[:] = bytes(len(data))  # the receive buffer is reused: the run must not change
    for a, b in zip(run.frames(), want, strict=True):
        same(a, b)
    head = run.head(5)
    assert head.stream_ids == run.stream_ids[:5] and head.seq == run.seq[:5]
    np.testing.assert_array_equal(head.payload, run.payload[:5])


def test_run_stops_where_the_shape_changes() -> None:
    rng = np.random.default_rng(0)
    raw = [*frames(rng, 6, 0.0), encode_frame("longer-id", 9, 0.0, sensory=np.zeros(3))]
    data = b"".join(raw)
    items, pos = decode_run(
        data, 0, len(data), DIMS, max_frame_bytes=1 << 20, received_ns=0, source="tcp"
    )
    assert len(items) == 6 and pos == sum(map(len, raw[:6]))
    assert decode_run(
        data, pos, len(data), DIMS, max_frame_bytes=1 << 20, received_ns=0, source="tcp"
    ) == ([], pos)


def test_short_runs_and_absent_modalities() -> None:
    short = b"".join(encode_frame("x", i, 0.0, sensory=np.ones(3)) for i in range(MIN_RUN - 1))
    assert decode_run(
        short, 0, len(short), DIMS, max_frame_bytes=1 << 20, received_ns=0, source="tcp"
    ) == ([], 0)
    data = b"".join(
        encode_frame("x", i, 0.0, sensory=np.ones(3), motor=np.full(1, 2.0)) for i in range(MIN_RUN)
    )
    items, _ = decode_run(
        data, 0, len(data), DIMS, max_frame_bytes=1 << 20, received_ns=0, source="tcp"
    )
    assert all(isinstance(f, Frame) for f in items)
    np.testing.assert_array_equal(items[0].payload, [1, 1, 1, 0, 0, 0, 0, 2])  # type: ignore[union-attr]
    assert items[0].present == 1 | 8  # type: ignore[union-attr]


def test_broker_messages_form_runs_of_like_binary_frames() -> None:
    rng = np.random.default_rng(5)
    good = frames(rng, 6, corrupt=0.0)
    short = encode_frame("ok-1", 99, 0.0, sensory=np.zeros(3))  # another size
    json_line = b'{"stream": "ok-1", "seq": 100, "t": 0}'
    payloads = [*good, short, json_line, json_line]
    assert like_messages(payloads, 0) == 6
    assert like_messages(payloads, 6) == 7
    assert like_messages(payloads, 7) == 8  # JSON never runs, even beside its twin
    run = decode_messages(
        good, DIMS, max_frame_bytes=1 << 20, received_ns=7, source="nats"
    )
    assert run is not None and len(run) == 6 and run.seq == list(range(1, 7))
    assert run.received_ns == 7 and run.source == "nats"
    for i, payload in enumerate(good):
        same(run.frame(i), decode_frame(payload, DIMS, received_ns=7, source="nats"))
    bad = [*good[:3], frames(rng, 1, corrupt=2.0)[0], *good[4:]]
    assert decode_messages(bad, DIMS, max_frame_bytes=1 << 20, received_ns=7, source="x") is None


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.sampled_from("ggggggsjbn"), max_size=40))
def test_messages_split_into_runs_and_one_by_one_cover_all_in_order(
    seed: int, kinds: list[str]
) -> None:
    # g: a good frame; s: a session start; j: JSON; b: a NaN payload; n: another size.
    rng = np.random.default_rng(seed)
    make = {
        "g": lambda i: frames(rng, 1, corrupt=0.0)[0],
        "s": lambda i: encode_frame("ok-1", i, 0.0, start=True, sensory=np.ones(3)),
        "j": lambda i: b'{"stream": "j", "seq": %d, "t": 0}' % i,
        "b": lambda i: frames(rng, 1, corrupt=2.0)[0],
        "n": lambda i: encode_frame("ok-1", i, 0.0, sensory=np.zeros(3)),
    }
    payloads = [make[k](i) for i, k in enumerate(kinds)]
    received = [1000 + i for i in range(len(payloads))]
    out = message_runs(payloads, DIMS, max_frame_bytes=1 << 20, received_ns=received, source="u")
    assert [start for start, _, _ in out] == [0, *(end for _, end, _ in out)][: len(out)]
    assert (out[-1][1] if out else 0) == len(payloads)
    for start, end, run in out:
        if run is None:
            continue
        assert len(run) == end - start >= MIN_RUN
        assert run.received_ns == received[start] and run.source == "u"
        for i in range(start, end):
            expected = decode_frame(payloads[i], DIMS, received_ns=received[start], source="u")
            same(run.frame(i - start), expected)
    if kinds and set(kinds) == {"g"} and len(kinds) >= MIN_RUN:
        assert [run is not None for _, _, run in out] == [True]  # one run, all of them
