"""`WeightedBuffer`: overflow policies, weights, waiting, closing, statistics."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.buffers import BufferStatistics, Overflow, WeightedBuffer

POLICIES: tuple[Overflow, ...] = ("block", "drop_oldest", "drop_newest")


class Drops:
    """An `on_drop` that records what it is told."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    def __call__(self, item: str, weight: int) -> None:
        self.items.append((item, weight))


def buffer(limit: int, overflow: Overflow = "block") -> tuple[WeightedBuffer[str], Drops]:
    drops = Drops()
    return WeightedBuffer[str](limit, overflow=overflow, on_drop=drops), drops


def held(buf: WeightedBuffer[str]) -> list[tuple[str, int]]:
    return buf.peek_all()


@pytest.mark.parametrize(
    ("limit", "overflow", "message"),
    [(0, "block", "limit=0, expected >= 1"), (4, "drop", "overflow='drop', expected")],
)
def test_bad_arguments_are_refused(limit: int, overflow: str, message: str):
    with pytest.raises(ValueError, match=message):
        WeightedBuffer[str](limit, overflow=overflow)  # type: ignore[arg-type]


def test_block_refuses_what_does_not_fit_and_takes_nothing():
    buf, drops = buffer(3)
    assert buf.put_nowait("a", 2)
    assert not buf.put_nowait("b", 2)
    assert buf.put_nowait("c", 1)
    assert held(buf) == [("a", 2), ("c", 1)]
    assert buf.statistics() == BufferStatistics(items=2, weight=3, limit=3, dropped=0, closed=False)
    assert drops.items == []


def test_drop_newest_refuses_and_reports_the_new_item():
    buf, drops = buffer(3, "drop_newest")
    assert buf.put_nowait("a", 2)
    assert not buf.put_nowait("b", 2)
    assert buf.put_nowait("c", 1)
    assert not buf.put_nowait("d", 1)
    assert held(buf) == [("a", 2), ("c", 1)]
    assert drops.items == [("b", 2), ("d", 1)]
    assert buf.statistics() == BufferStatistics(items=2, weight=3, limit=3, dropped=3, closed=False)


def test_drop_oldest_makes_room_and_reports_each_old_item():
    buf, drops = buffer(4, "drop_oldest")
    for item, weight in [("a", 1), ("b", 2), ("c", 1)]:
        assert buf.put_nowait(item, weight)
    assert buf.put_nowait("d", 3)  # needs 3 of 4: a and b go
    assert held(buf) == [("c", 1), ("d", 3)]
    assert drops.items == [("a", 1), ("b", 2)]
    assert buf.statistics() == BufferStatistics(items=2, weight=4, limit=4, dropped=3, closed=False)
    assert [buf.get_nowait(), buf.get_nowait()] == ["c", "d"]


@pytest.mark.parametrize("overflow", POLICIES)
def test_an_item_heavier_than_the_limit_is_taken_only_into_an_empty_buffer(overflow: Overflow):
    buf, drops = buffer(3, overflow)
    assert buf.put_nowait("big", 10)
    assert buf.statistics() == BufferStatistics(1, 10, 3, 0, False)
    taken = buf.put_nowait("small", 1)
    if overflow == "drop_oldest":
        assert taken and held(buf) == [("small", 1)] and drops.items == [("big", 10)]
    else:
        assert not taken and held(buf) == [("big", 10)]
        assert drops.items == ([("small", 1)] if overflow == "drop_newest" else [])
    buf.get_all_nowait()
    buf.put_nowait("a", 1)
    assert buf.put_nowait("big", 10) is (overflow == "drop_oldest")  # not empty now


async def test_blocked_put_waits_for_room_and_wakes_on_get():
    buf, _ = buffer(2)
    buf.put_nowait("a", 2)
    done = anyio.Event()

    async def put() -> None:
        await buf.put("b", 1)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(put)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set() and held(buf) == [("a", 2)]
        assert buf.get_nowait() == "a"
        with anyio.fail_after(5):
            await done.wait()
    assert held(buf) == [("b", 1)]


async def test_blocked_put_of_an_over_limit_item_waits_for_an_empty_buffer():
    buf, _ = buffer(2)
    buf.put_nowait("a", 1)
    buf.put_nowait("b", 1)
    done = anyio.Event()

    async def put() -> None:
        await buf.put("big", 5)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(put)
        assert buf.get_nowait() == "a"
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()  # room for 1, not for 5
        buf.take(1)
        with anyio.fail_after(5):
            await done.wait()
    assert buf.statistics() == BufferStatistics(1, 5, 2, 0, False)


@pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest"])
async def test_put_never_waits_under_a_drop_policy(overflow: Overflow):
    buf, drops = buffer(1, overflow)
    await buf.put("a")
    with anyio.fail_after(1):
        await buf.put("b")
    assert len(drops.items) == 1 and len(buf) == 1


async def test_get_waits_for_an_item():
    buf, _ = buffer(4)
    got: list[str] = []

    async def get() -> None:
        got.append(await buf.get())

    async with anyio.create_task_group() as tg:
        tg.start_soon(get)
        tg.start_soon(get)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        buf.put_nowait("a")
        buf.put_nowait("b")
    assert got == ["a", "b"]
    assert buf.statistics() == BufferStatistics(0, 0, 4, 0, False)


async def test_wait_readable_returns_once_an_item_is_held():
    buf, _ = buffer(4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(buf.wait_readable)
        await anyio.wait_all_tasks_blocked()
        buf.put_nowait("a")
    assert held(buf) == [("a", 1)]  # waiting took nothing


def test_peek_all_take_and_get_all_nowait():
    buf, _ = buffer(10)
    for item, weight in [("a", 1), ("b", 2), ("c", 3)]:
        buf.put_nowait(item, weight)
    assert buf.peek_all() == [("a", 1), ("b", 2), ("c", 3)]
    assert len(buf) == 3 and buf.weight == 6
    buf.take(2)
    assert buf.peek_all() == [("c", 3)] and buf.weight == 3
    buf.put_nowait("d", 4)
    assert buf.get_all_nowait() == [("c", 3), ("d", 4)]
    assert buf.get_all_nowait() == []
    assert buf.statistics() == BufferStatistics(0, 0, 10, 0, False)
    with pytest.raises(anyio.WouldBlock):
        buf.get_nowait()


async def test_close_lets_what_is_held_be_taken_then_ends():
    buf, _ = buffer(4)
    buf.put_nowait("a", 2)
    buf.close()
    assert buf.statistics() == BufferStatistics(1, 2, 4, 0, True)
    with pytest.raises(anyio.ClosedResourceError):
        buf.put_nowait("b")
    await buf.wait_readable()  # closed: returns at once
    assert await buf.get() == "a"
    with pytest.raises(anyio.EndOfStream):
        await buf.get()
    with pytest.raises(anyio.EndOfStream):
        buf.get_nowait()


async def test_close_wakes_a_waiting_getter_and_a_waiting_putter():
    empty, _ = buffer(1)
    full, _ = buffer(1)
    full.put_nowait("a")
    ended: list[str] = []

    async def get() -> None:
        with pytest.raises(anyio.EndOfStream):
            await empty.get()
        ended.append("get")

    async def put() -> None:
        with pytest.raises(anyio.ClosedResourceError):
            await full.put("b")
        ended.append("put")

    async def readable() -> None:
        await empty.wait_readable()
        ended.append("readable")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for waiter in (get, put, readable):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert ended == []
            empty.close()
            full.close()
    assert sorted(ended) == ["get", "put", "readable"]
    assert held(full) == [("a", 1)]


async def test_a_cancelled_get_or_put_changes_nothing():
    buf, _ = buffer(1)
    with anyio.move_on_after(0):
        await buf.get()
    buf.put_nowait("a")
    with anyio.move_on_after(0):
        await buf.put("b")
    assert held(buf) == [("a", 1)]
    assert buf.get_nowait() == "a"


# An operation: ("put", weight), ("get", 0), ("take", count) or ("get_all", 0).
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 12)),
        st.tuples(st.just("get"), st.just(0)),
        st.tuples(st.just("take"), st.integers(0, 3)),
        st.tuples(st.just("get_all"), st.just(0)),
    ),
    max_size=60,
)


@given(limit=st.integers(1, 10), overflow=st.sampled_from(POLICIES), ops=operations)
def test_weight_is_what_is_held_and_within_the_limit_but_for_one_item(
    limit: int, overflow: Overflow, ops: list[tuple[str, int]]
):
    buf, drops = buffer(limit, overflow)
    model: list[tuple[str, int]] = []  # what a FIFO with this policy holds
    for i, (op, arg) in enumerate(ops):
        if op == "put":
            item = f"i{i}"
            fits = sum(w for _, w in model) + arg <= limit or not model
            if not fits and overflow == "drop_oldest":
                while model and sum(w for _, w in model) + arg > limit:
                    model.pop(0)
                fits = True
            assert buf.put_nowait(item, arg) is fits
            if fits:
                model.append((item, arg))
        elif op == "get":
            if model:
                assert buf.get_nowait() == model.pop(0)[0]
            else:
                with pytest.raises(anyio.WouldBlock):
                    buf.get_nowait()
        elif op == "take":
            count = min(arg, len(model))
            buf.take(count)
            del model[:count]
        else:
            assert buf.get_all_nowait() == model
            model = []
        stats = buf.statistics()
        assert buf.peek_all() == model
        assert stats.items == len(buf) == len(model)
        assert stats.weight == buf.weight == sum(w for _, w in buf.peek_all())
        assert stats.weight <= limit or stats.items == 1
        assert stats.dropped == sum(w for _, w in drops.items)
        if overflow == "block":
            assert drops.items == []
