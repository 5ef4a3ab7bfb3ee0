"""Batcher: bucketing, one frame per stream per batch, order, deadlines, back-pressure."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from stream.batcher import Batcher
from stream.protocol import ALL_PRESENT, Frame


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
    assert [f.stream_id for f in batch] == ["s0", "s1", "s2", "s3"]


async def test_partial_batch_waits_for_its_deadline() -> None:
    clock = Clock()
    b = Batcher(8, 0.002, clock=clock)
    b.add(frame("a", 1, received_ns=0))
    clock.now = 1_000_000  # 1 ms: not due
    assert b._due_in_s() == pytest.approx(0.001)
    clock.now = 2_000_000
    with anyio.fail_after(1):
        batch = await b.next_batch()
    assert [f.seq for f in batch] == [1]


async def test_deadline_counts_from_receipt_not_from_arrival_in_batcher() -> None:
    clock = Clock()
    clock.now = 50_000_000
    b = Batcher(8, 0.002, clock=clock)
    b.add(frame("a", 1, received_ns=0))  # waited 50 ms upstream already
    with anyio.fail_after(1):
        assert [f.seq for f in await b.next_batch()] == [1]


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
            ids = [f.stream_id for f in batch]
            assert len(ids) == len(set(ids))
            sizes.append(len(batch))
            for f in batch:
                seen[f.stream_id].append(f.seq)
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
        out += [f.stream_id for f in batch]
    assert out == [f"s{i}" for i in range(10)]


async def test_collect_applies_admission_and_back_pressure() -> None:
    send, receive = anyio.create_memory_object_stream[Frame](100)
    b = Batcher(2, 0.0, limit=4)
    for i in range(10):
        send.send_nowait(frame(f"s{i}", 1 if i != 3 else 0))
    async with anyio.create_task_group() as tg:
        tg.start_soon(b.collect, receive, lambda f, now_ns: f.seq == 1)
        await anyio.wait_all_tasks_blocked()
        assert len(b) == 4  # stopped receiving at its limit
        assert send.statistics().current_buffer_used == 5
        await send.aclose()
        got = []
        with anyio.fail_after(2):
            while (batch := await b.next_batch()) is not None:
                got += [f.stream_id for f in batch]
    assert got == [f"s{i}" for i in range(10) if i != 3]


async def test_frame_arriving_wakes_a_waiting_executor() -> None:
    b = Batcher(1, 10.0)
    result: list[list[Frame] | None] = []

    async def pull() -> None:
        result.append(await b.next_batch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        await anyio.wait_all_tasks_blocked()
        assert result == []
        b.add(frame("x", 7))
    assert result[0] is not None and result[0][0].seq == 7


async def test_an_idle_device_takes_a_waiting_batch_before_its_deadline() -> None:
    clock = Clock()
    device_idle = False
    b = Batcher(8, 10.0, clock=clock, idle=lambda: device_idle)
    b.add(frame("a", 1))
    assert b._due_in_s() == pytest.approx(10.0)  # busy device: wait for company
    got: list[list[Frame] | None] = []

    async def pull() -> None:
        got.append(await b.next_batch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(pull)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        device_idle = True
        b.wake()  # what the executor does when its last batch's records are taken
    assert got[0] is not None and [f.seq for f in got[0]] == [1]
