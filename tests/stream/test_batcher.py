"""Batcher: bucketing, one frame per stream per batch, order, deadlines, back-pressure."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream.batcher import Batch, Batcher
from stream.buffers import WeightedBuffer
from stream.protocol import ALL_PRESENT, Frame, FrameRun


class Clock:
    """A hand-driven nanosecond clock."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def frame(stream: str, seq: int, received_ns: int = 0) -> Frame:
    return Frame(stream, seq, 0.0, np.zeros(2, np.float32), ALL_PRESENT, received_ns, "tcp")


async def test_full_batch_is_due_at_once() -> None:
    clock = Clock()
    b = Batcher(4, 10.0, clock=clock)
    for i in range(4):
        b.add(frame(f"s{i}", 1))
    with anyio.fail_after(1):
        batch = await b.next_batch()
    assert batch.stream_ids == ["s0", "s1", "s2", "s3"]


async def test_partial_batch_waits_for_its_deadline() -> None:
    clock = Clock()
    b = Batcher(8, 0.002, clock=clock)
    b.add(frame("a", 1, received_ns=0))
    clock.now = 1_000_000  # 1 ms: not due
    assert b._due_in_s() == pytest.approx(0.001)
    clock.now = 2_000_000
    with anyio.fail_after(1):
        batch = await b.next_batch()
    assert batch.seq == [1]


async def test_deadline_counts_from_receipt_not_from_arrival_in_batcher() -> None:
    clock = Clock()
    clock.now = 50_000_000
    b = Batcher(8, 0.002, clock=clock)
    b.add(frame("a", 1, received_ns=0))  # waited 50 ms upstream already
    with anyio.fail_after(1):
        assert (await b.next_batch()).seq == [1]  # type: ignore[union-attr]


async def test_one_frame_per_stream_and_order_kept() -> None:
    clock = Clock()
    b = Batcher(4, 0.0, clock=clock)
    for seq in range(1, 4):
        b.add(frame("a", seq))
    b.add(frame("b", 1))
    b.add(frame("b", 2))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    sizes = []
    b.end()
    with anyio.fail_after(1):
        while (batch := await b.next_batch()) is not None:
            ids = batch.stream_ids
            assert len(ids) == len(set(ids))
            sizes.append(len(batch))
            for stream_id, seq in zip(ids, batch.seq, strict=True):
                seen[stream_id].append(seq)
    assert seen == {"a": [1, 2, 3], "b": [1, 2]}
    assert sizes == [2, 2, 1]


async def test_never_exceeds_max_batch() -> None:
    b = Batcher(3, 0.0)
    for i in range(10):
        b.add(frame(f"s{i}", 1))
    b.end()
    out = []
    while (batch := await b.next_batch()) is not None:
        assert len(batch) <= 3
        out += batch.stream_ids
    assert out == [f"s{i}" for i in range(10)]


async def test_batches_stay_within_the_largest_compiled_bucket() -> None:
    # While the daemon compiles its other buckets in the background, only the compiled
    # ones may be used: frames beyond the largest wait for the next batch (none is lost).
    b = Batcher(64, 0.0)
    b.set_largest_bucket(1)
    assert b.max_batch == 1
    for i in range(20):
        b.add(frame(f"s{i}", 1))
    b.add(run_of([frame(f"r{i}", 1) for i in range(5)]))
    sizes = [len(b.take()) for _ in range(3)]
    assert sizes == [1, 1, 1]
    b.set_largest_bucket(8)  # bucket 8 compiled
    assert b.max_batch == 8
    b.set_max_batch(4)  # adaptive batching asks for less: the smaller wins
    assert b.max_batch == 4
    b.set_largest_bucket(64)
    assert b.max_batch == 4
    b.set_max_batch(1000)  # never beyond the largest bucket
    assert b.max_batch == 64
    b.end()
    out = []
    while (batch := await b.next_batch()) is not None:
        assert len(batch) <= 64
        out += batch.stream_ids
    assert len(out) == 25 - 3 and len(set(out)) == len(out)


async def test_collect_applies_back_pressure() -> None:
    receive: WeightedBuffer[Frame | FrameRun] = WeightedBuffer(100)
    b = Batcher(2, 0.0, limit=4)
    for i in range(10):
        receive.put_nowait(frame(f"s{i}", 1))
    async with anyio.create_task_group() as tg:
        tg.start_soon(b.collect, receive)
        await anyio.wait_all_tasks_blocked()
        assert len(b) == 4  # stopped taking at its limit
        assert len(receive) == 6
        receive.close()
        got = []
        with anyio.fail_after(2):
            while (batch := await b.next_batch()) is not None:
                got += batch.stream_ids
    assert got == [f"s{i}" for i in range(10)]


async def test_frame_arriving_wakes_a_waiting_executor() -> None:
    b = Batcher(1, 10.0)
    result: list[Batch | None] = []

    async def pull() -> None:
        result.append(await b.next_batch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        await anyio.wait_all_tasks_blocked()
        assert result == []
        b.add(frame("x", 7))
    assert result[0] is not None and result[0].seq == [7]


async def test_an_idle_device_takes_a_waiting_batch_before_its_deadline() -> None:
    clock = Clock()
    b = Batcher(8, 10.0, clock=clock)
    b.add(frame("a", 1))
    assert b._due_in_s() == pytest.approx(10.0)  # busy device: wait for company
    got: list[Batch | None] = []

    async def pull() -> None:
        got.append(await b.next_batch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        b.idle(True)  # what the executor does when its last batch's records are taken
    assert got[0] is not None and got[0].seq == [1]


def run_of(frames: list[Frame]) -> FrameRun:
    return FrameRun(
        [f.stream_id for f in frames],
        [f.seq for f in frames],
        np.array([f.timestamp for f in frames], np.float64),
        np.stack([f.payload for f in frames]),
        ALL_PRESENT,
        frames[0].received_ns,
        "tcp",
    )


def batch_rows(batch: Batch) -> list[tuple[str, int, float, tuple[float, ...]]]:
    payload = np.concatenate(batch.payloads).reshape(len(batch), -1)
    return [
        (s, q, t, tuple(p))
        for s, q, t, p in zip(
            batch.stream_ids, batch.seq, batch.timestamp, payload.tolist(), strict=True
        )
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.lists(
        st.one_of(
            st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=9),  # one read's streams
            st.just("take"),
            st.just("grow"),  # adaptive batching raising the cap
        ),
        max_size=25,
    ),
)
@example(max_batch=1, script=[["a", "b"], "grow", ["b"], "take"])  # b held, not in the batch
async def test_runs_batch_exactly_like_their_frames_one_by_one(
    max_batch: int, script: list[list[str] | str]
) -> None:
    by_frame, by_run = Batcher(8, 0.0), Batcher(8, 0.0)
    for b in (by_frame, by_run):
        b.set_max_batch(max_batch)
    seq: dict[str, int] = {}
    got: tuple[list[list[tuple]], list[list[tuple]]] = ([], [])
    for step in script:
        if step == "grow":
            for b in (by_frame, by_run):
                b.set_max_batch(b.max_batch + 1)
            continue
        if step == "take":
            for b, out in zip((by_frame, by_run), got, strict=True):
                out.append(batch_rows(b.take()) if len(b) else [])
            continue
        frames = []
        for stream in step:
            seq[stream] = seq.get(stream, 0) + 1
            row = np.array([ord(stream), seq[stream]], np.float32)
            frames.append(Frame(stream, seq[stream], seq[stream] * 0.5, row, ALL_PRESENT, 0, "tcp"))
        for f in frames:
            by_frame.add(f)
        by_run.add(run_of(frames))
        assert len(by_frame) == len(by_run)
    for b in (by_frame, by_run):
        b.end()
    for b, out in zip((by_frame, by_run), got, strict=True):
        while (batch := await b.next_batch()) is not None:
            out.append(batch_rows(batch))
    assert got[0] == got[1]
    assert sum(map(len, got[1])) == sum(seq.values())  # every frame, once


async def test_collect_takes_runs_whole_and_times_their_queue() -> None:
    receive: WeightedBuffer[Frame | FrameRun] = WeightedBuffer(100)
    b = Batcher(8, 0.0)
    whole = run_of([frame("a", 1), frame("b", 1)])
    for item in (whole, frame("c", 1)):
        receive.put_nowait(item, len(item) if isinstance(item, FrameRun) else 1)
    receive.close()
    await b.collect(receive)
    assert receive.statistics().weight == 0  # all taken
    batch = await b.next_batch()
    assert batch is not None and batch.stream_ids == ["a", "b", "c"]
    assert (batch.queue_ns > 0).all()  # receipt (0 here) to being taken in
