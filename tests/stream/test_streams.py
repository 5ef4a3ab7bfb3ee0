"""Stream table: sequence checks, slot assignment, LRU eviction and restore."""

from __future__ import annotations

import pytest

from stream.protocol import FrameRejected
from stream.streams import StreamTable


def test_sequence_checks() -> None:
    t = StreamTable(4, 8)
    t.admit("a", 5)
    with pytest.raises(FrameRejected) as e:
        t.admit("a", 5)
    assert e.value.reason == "duplicate_seq"
    with pytest.raises(FrameRejected) as e:
        t.admit("a", 4)
    assert e.value.reason == "stale_seq"
    t.admit("a", 9)  # gaps are fine
    assert t.admitted_seq["a"] == 9


def test_too_many_streams_only_past_the_known_limit() -> None:
    t = StreamTable(2, 3)
    for s in "abc":
        t.admit(s, 1)
    with pytest.raises(FrameRejected) as e:
        t.admit("d", 1)
    assert e.value.reason == "too_many_streams"
    t.admit("a", 2)  # known streams go on
    assert "d" not in t.admitted_seq


def test_a_run_is_admitted_whole_only_when_frame_by_frame_would_admit_all() -> None:
    t = StreamTable(4, 8)
    for s in "abc":
        t.admit(s, 5)
    assert t.admit_run(["a", "b", "c"], [6, 9, 7])
    assert t.admitted_seq == {"a": 6, "b": 9, "c": 7}
    declined = [
        (["a", "d"], [7, 1]),  # a new stream: `admit` decides (`too_many_streams`)
        (["a", "a"], [7, 8]),  # a stream twice: order within the run matters
        (["a", "b"], [7, 9]),  # b's seq again: `duplicate_seq`
        (["a", "c"], [8, 3]),  # c's seq lower: `stale_seq`
    ]
    for ids, seq in declined:
        assert not t.admit_run(ids, seq)
        assert t.admitted_seq == {"a": 6, "b": 9, "c": 7}  # nothing changed


def test_slots_are_stable_and_distinct() -> None:
    t = StreamTable(4, 8)
    p1 = t.plan(["a", "b"])
    assert p1.fresh == [True, True] and len(set(p1.slots)) == 2
    p2 = t.plan(["b", "a", "c"])
    assert p2.slots[:2] == [p1.slots[1], p1.slots[0]]
    assert p2.fresh == [False, False, True]
    assert not p2.evict and not p2.restore


def test_lru_eviction_and_restore() -> None:
    t = StreamTable(2, 8)
    t.plan(["a"])
    t.plan(["b"])
    t.plan(["a"])  # b is now least recently used
    p = t.plan(["c"])
    assert [s for _, s in p.evict] == ["b"]
    t.evicted_state("b", {"h": 1})
    assert t.active == 2 and len(t) == 3
    p = t.plan(["b", "c"])  # a is evicted (c is in the batch)
    assert [s for _, s in p.evict] == ["a"]
    assert p.restore == [(p.slots[0], {"h": 1})]
    assert p.fresh == [False, False]


def test_victim_never_in_the_current_batch() -> None:
    t = StreamTable(2, 8)
    t.plan(["a", "b"])
    p = t.plan(["b", "c"])
    assert [s for _, s in p.evict] == ["a"]
    assert len(set(p.slots)) == 2


def test_idle_streams_expire_and_return_afresh() -> None:
    t = StreamTable(2, 3)
    for sid in ("a", "b", "c"):  # c evicts a (two slots)
        t.admit(sid, 5)
        t.plan([sid])
        t.processed_seq[sid] = 5
    t.evicted_state("a", {"x": 1})
    t.stepped(["a", "b"], 100)
    t.stepped(["c"], 200)
    with pytest.raises(FrameRejected):
        t.admit("d", 1)  # the table is full: three streams known
    assert sorted(t.expire(150)) == ["a", "b"]
    assert list(t.slot_of) == ["c"] and t.evicted == {} and len(t.free) == 1
    t.admit("d", 1)  # room again
    t.admit("a", 1)  # a returning stream starts afresh: seq 1 is not stale
    plan = t.plan(["a"])
    assert plan.fresh == [True] and plan.restore == []


def test_a_stream_with_frames_in_flight_does_not_expire() -> None:
    t = StreamTable(2, 2)
    t.admit("a", 1)
    t.plan(["a"])
    t.processed_seq["a"] = 1
    t.stepped(["a"], 100)
    t.admit("a", 2)  # admitted, not stepped yet
    assert t.expire(200) == []


def test_a_full_table_makes_room_from_streams_idle_long_enough() -> None:
    now = [0]
    t = StreamTable(2, 2, reclaim_idle_s=10.0, clock=lambda: now[0])
    for sid in ("a", "b"):
        t.admit(sid, 1)
        t.plan([sid])
        t.processed_seq[sid] = 1
        t.stepped([sid], now[0])
    now[0] = 5 * 10**9  # 5 s: nobody idle long enough
    with pytest.raises(FrameRejected) as info:
        t.admit("c", 1)
    assert info.value.reason == "too_many_streams"
    t.stepped(["b"], now[0])  # b is busy, a is not
    now[0] = 11 * 10**9
    t.admit("c", 1)  # a (idle 11 s, least recently stepped) makes room
    assert t.reclaimed == 1 and "a" not in t.admitted_seq and "a" not in t.slot_of
    with pytest.raises(FrameRejected):
        t.admit("d", 1)  # b was stepped 6 s ago, c has frames in flight
