"""Freshness policies (`stream.freshness`) and how the batcher applies them."""

from __future__ import annotations

import numpy as np
import pytest

from stream.batcher import Batcher
from stream.config import ConfigError, load_config
from stream.freshness import ALL, Freshness
from stream.protocol import SESSION_START, Frame

MS = 1_000_000


def frame(stream: str, seq: int, received_ns: int, source: str = "udp") -> Frame:
    return Frame(stream, seq, seq / 100, np.zeros(4, np.float32), 1, received_ns, source)


def test_policies_parse_and_print() -> None:
    assert Freshness.parse("all") == ALL and not ALL.sheds
    assert Freshness.parse("latest") == Freshness("latest")
    assert Freshness.parse("max_age_ms=250") == Freshness("max_age", 250 * MS)
    assert str(Freshness.parse("max_age_ms=0.5")) == "max_age_ms=0.5"
    for bad in ("max_age_ms=0", "max_age_ms=-1", "max_age_ms=nan", "max_age=5", "newest"):
        with pytest.raises(ValueError, match="freshness"):
            Freshness.parse(bad)


def test_what_a_transport_side_buffer_must_hold() -> None:
    assert Freshness.parse("latest").buffer_s(360) == 1
    assert Freshness.parse("max_age_ms=2500").buffer_s(360) == 3
    assert Freshness.parse("max_age_ms=1").buffer_s(360) == 1
    assert ALL.buffer_s(360) == 360


def test_keep_marks_the_samples_a_policy_keeps() -> None:
    taken = np.array([0, 10, 20, 30], np.int64) * MS
    assert ALL.keep(taken, 100 * MS).all()
    assert Freshness.parse("latest").keep(taken, 100 * MS).tolist() == [0, 0, 0, 1]
    assert Freshness.parse("max_age_ms=85").keep(taken, 100 * MS).tolist() == [0, 0, 1, 1]
    assert Freshness.parse("latest").keep(taken[:0], 0).tolist() == []


def test_the_config_refuses_a_bad_policy_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"ingest.freshness = \"max_age_ms=0\""):
        load_config(overrides={"ingest.freshness": "max_age_ms=0"})
    assert load_config(overrides={"mqtt.freshness": "max_age_ms=20"}).mqtt.freshness


def test_latest_keeps_only_the_newest_frame_waiting_behind_its_stream() -> None:
    stale: list[int] = []
    b = Batcher(8, 0.001, freshness={"udp": Freshness.parse("latest")}, on_stale=stale.append)
    for seq in range(1, 6):
        b.add(frame("a", seq, 0))
    b.add(frame("t", 1, 0, source="tcp"))
    b.add(frame("t", 2, 0, source="tcp"))  # a source with "all": held back, kept
    b.add(frame("t", 3, 0, source="tcp"))
    assert sum(stale) == 3  # a2, a3, a4 replaced in turn
    taken = [b.take() for _ in range(3)]
    assert [list(zip(t.stream_ids, t.seq, strict=True)) for t in taken] == [
        [("a", 1), ("t", 1)],
        [("a", 5), ("t", 2)],
        [("t", 3)],
    ]


def test_max_age_sheds_frames_too_old_when_the_batch_is_handed_out() -> None:
    stale: list[int] = []
    ages: list[tuple[str, float]] = []
    now = [100 * MS]
    b = Batcher(
        8,
        0.001,
        clock=lambda: now[0],
        freshness={"udp": Freshness.parse("max_age_ms=50")},
        on_stale=stale.append,
        on_age=lambda source, s: ages.append((source, s)),
    )
    b.add(frame("old", 1, 10 * MS))  # 90 ms old
    b.add(frame("new", 1, 80 * MS))  # 20 ms old
    b.add(frame("tcp", 1, 0, source="tcp"))  # 100 ms old, but its source sheds nothing
    batch = b.take()
    assert batch.stream_ids == ["new", "tcp"]
    assert stale == [1]
    assert sorted(ages) == [("tcp", pytest.approx(0.1)), ("udp", pytest.approx(0.02))]


async def test_a_batch_shed_whole_is_never_handed_out() -> None:
    now = [0]
    b = Batcher(
        8, 0.0, clock=lambda: now[0], freshness={"udp": Freshness.parse("max_age_ms=1")}
    )
    b.add(frame("x", 1, 0))
    now[0] = 5 * MS
    b.end()
    assert await b.next_batch() is None


def test_a_frame_that_starts_a_session_is_never_shed() -> None:
    stale: list[int] = []
    b = Batcher(
        8,
        0.001,
        clock=lambda: 100 * MS,
        freshness={"udp": Freshness.parse("latest"), "lsl": Freshness.parse("max_age_ms=1")},
        on_stale=stale.append,
    )
    start = frame("a", 1, 0)
    start.present |= SESSION_START
    b.add(frame("a", 7, 0))
    for f in (start, frame("a", 2, 0), frame("a", 3, 0)):
        b.add(f)
    old_start = frame("l", 1, 0, source="lsl")
    old_start.present |= SESSION_START
    b.add(old_start)
    b.add(frame("m", 1, 0, source="lsl"))
    taken = [b.take() for _ in range(3)]
    assert [list(zip(t.stream_ids, t.seq, strict=True)) for t in taken] == [
        [("a", 7), ("l", 1)],  # the old lsl session start kept, its plain neighbour shed
        [("a", 1)],  # the session start kept ...
        [("a", 3)],  # ... and the newest; a2 shed
    ]
    assert sum(stale) == 2
