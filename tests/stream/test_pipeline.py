"""The whole pipeline in process, over a deterministic fake step with hand-computable
outputs: per-stream order, one moment per admitted frame, padding that never touches a
real stream, evictions that keep state exact, and commits that arrive only after the
checkpoint that covers them."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import TaskStatus
from hypothesis import given, settings
from hypothesis import strategies as st

from processors import FLAG_RESET, FLAG_VALID
from stream.buffers import Overflow
from stream.events import Listener
from stream.ingest import Ingest, Item
from stream.pipeline import Pipeline, PipelineSettings
from stream.protocol import (
    ALL_PRESENT,
    FLAG_SESSION_START,
    SESSION_START,
    Dims,
    Frame,
    FrameRun,
    MomentBatch,
)
from stream.streams import StreamTable

DIMS = Dims(2, 1, 1, 1)  # input width 5; record width 2 + 2 + 1 + 1 + 3 = 9


# -- a fake step: state per slot = frames applied; record = [count, payload[0], 0...] ----


class _Records:
    """Host records dressed as a device array (what the executor and integrator use)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def copy_to_host_async(self) -> None:
        pass

    def is_ready(self) -> bool:
        return True

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def __len__(self) -> int:
        return len(self.values)


@dataclasses.dataclass
class _Snapshot:
    rows: np.ndarray

    def to_host(self) -> np.ndarray:
        return self.rows


class FakeStep:
    """The executor's view of `processors.SlabStep`, in numpy. A stream's state is the
    number of frames applied to it; each record is `[count after, payload[0], 0, ...]`;
    padding rows (no `FLAG_VALID`) write -1 records and must leave every state alone."""

    input_width = DIMS.total
    record_width = 9
    eager_buckets: frozenset[int] = frozenset()

    def __init__(self, buckets: Sequence[int], capacity: int) -> None:
        self.buckets = tuple(buckets)
        self.capacity = capacity
        self.model = type("M", (), {"config": type("C", (), {"moment_dim": 2})()})()
        self.padding_seen = 0

    @property
    def largest_ready(self) -> int:  # every bucket is compiled
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def host_slab(self) -> np.ndarray:
        return np.zeros(self.capacity, np.int64)

    def put_slab(self, host: np.ndarray) -> np.ndarray:
        return host.copy()

    def __call__(
        self, slab: np.ndarray, x: np.ndarray, meta: np.ndarray
    ) -> tuple[np.ndarray, _Records, bool]:
        records = np.full((len(x), self.record_width), -1.0, np.float32)
        for row, (slot, flags) in enumerate(meta):
            if not flags & FLAG_VALID:
                self.padding_seen += 1
                continue
            if flags & FLAG_RESET:
                slab[slot] = 0
            slab[slot] += 1
            records[row, :2] = (slab[slot], x[row, 0])
            records[row, 2:] = 0.0
        return slab, _Records(records), False

    def read_slot(self, slab: np.ndarray, slot: int) -> np.ndarray:
        return slab[slot].copy()

    def write_slot(self, slab: np.ndarray, slot: int, state: np.ndarray) -> np.ndarray:
        slab[slot] = state
        return slab

    def snapshot(self, slab: np.ndarray, slots: Sequence[int]) -> _Snapshot:
        return _Snapshot(slab[list(slots)].copy())


# -- a source of prepared items, a sink that keeps what it is offered ----------------------


class ListSource:
    name = "list"
    labels: tuple[str, ...] = ("list",)
    overflow: Overflow = "block"

    def __init__(self, items: list[Item], checkpoints: list[dict[str, int]]) -> None:
        self.items = items
        self.done = anyio.Event()
        self.committed: list[tuple[object, dict[str, int]]] = []
        self._checkpoints = checkpoints

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started(None)
        for item in self.items:
            ingest.received("list", len(item) if isinstance(item, FrameRun) else 1)
            await ingest.put(item)
        self.done.set()

    def commit(self, positions: Sequence[object]) -> None:
        # What the latest durable checkpoint held when these were committed.
        durable = self._checkpoints[-1] if self._checkpoints else {}
        self.committed += [(p, durable) for p in positions]


class Collect:
    name = "collect"
    queued = 0
    buffers = ()

    def __init__(self) -> None:
        self.batches: list[MomentBatch] = []

    def offer(self, batch: MomentBatch) -> None:
        self.batches.append(batch)

    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started(None)
        await anyio.sleep_forever()


class Counts(Listener):
    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}
        self.checkpoints = 0

    def rejected(self, source: str, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def checkpointed(self, seconds: float, positions: int) -> None:
        self.checkpoints += 1


class FeedSource(ListSource):
    """Hands over each item the test sends (`feed`), while the pipeline runs on;
    `committed_at_least(n)` waits for n commits."""

    def __init__(self, checkpoints: list[dict[str, int]]) -> None:
        super().__init__([], checkpoints)
        self.feed, self._items = anyio.create_memory_object_stream[Item](8)
        self._commits = anyio.Event()

    def commit(self, positions: Sequence[object]) -> None:
        super().commit(positions)
        self._commits.set()

    async def committed_at_least(self, n: int) -> None:
        with anyio.fail_after(5):
            while len(self.committed) < n:
                self._commits = anyio.Event()
                await self._commits.wait()

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started(None)
        async with self._items:
            async for item in self._items:
                ingest.received("list", len(item) if isinstance(item, FrameRun) else 1)
                await ingest.put(item)


def run_pipeline(
    items: list[Item],
    *,
    capacity: int,
    buckets: Sequence[int] = (1, 2, 4),
    max_known: int = 64,
    session_start: str = "reset",
    new_per_batch: int = 0,
) -> tuple[Collect, ListSource, Counts, FakeStep]:
    checkpoints: list[dict[str, int]] = []
    source = ListSource(items, checkpoints)
    pipeline, sink, counts, step = build_pipeline(
        source,
        checkpoints,
        capacity=capacity,
        buckets=buckets,
        max_known=max_known,
        session_start=session_start,
        new_per_batch=new_per_batch,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            await source.done.wait()
            pipeline.stop()

    anyio.run(main)
    return sink, source, counts, step


def build_pipeline(
    source: ListSource,
    checkpoints: list[dict[str, int]],
    *,
    capacity: int,
    buckets: Sequence[int] = (1, 2, 4),
    max_known: int = 64,
    session_start: str = "reset",
    new_per_batch: int = 0,
    checkpoint_interval_s: float = 0.0,
) -> tuple[Pipeline, Collect, Counts, FakeStep]:
    """The pipeline over the fake step, `source` its one source, each checkpoint's
    processed seqs appended to `checkpoints`."""
    step = FakeStep(buckets, capacity)
    table = StreamTable(capacity, max_known)

    def checkpoint(rows: Any, snapshot: StreamTable) -> None:
        checkpoints.append(dict(snapshot.processed_seq))

    sink, counts = Collect(), Counts()
    pipeline = Pipeline(
        step,  # type: ignore[arg-type]
        table,
        step.put_slab(step.host_slab()),
        sources=[source],
        sinks=[sink],
        events=counts,
        settings=PipelineSettings(
            dims=DIMS,
            max_frame_bytes=1 << 20,
            ingest_queue=8,
            max_wait_s=0.0005,
            checkpoint_interval_s=checkpoint_interval_s,
            session_start=session_start,
            new_streams_per_batch=new_per_batch,
        ),
        checkpoint=checkpoint,
    )
    return pipeline, sink, counts, step


def frame(stream: int, seq: int) -> Frame:
    payload = np.zeros(DIMS.total, np.float32)
    payload[0] = stream * 1000 + seq  # the record echoes it: which frame made a moment
    return Frame(f"s{stream}", seq, float(seq), payload, ALL_PRESENT, 0, "list", (stream, seq))


def as_items(frames: list[Frame], cuts: list[bool]) -> list[Item]:
    """Frames grouped into runs where `cuts` says so (a run of one stays a frame)."""
    items: list[Item] = []
    group: list[Frame] = []
    for f, cut in zip(frames, cuts + [True] * len(frames), strict=False):
        group.append(f)
        if cut:
            items.append(group[0] if len(group) == 1 else run_of(group))
            group = []
    if group:
        items.append(group[0] if len(group) == 1 else run_of(group))
    return items


def run_of(frames: list[Frame]) -> FrameRun:
    return FrameRun(
        [f.stream_id for f in frames],
        [f.seq for f in frames],
        np.array([f.timestamp for f in frames]),
        np.stack([f.payload for f in frames]),
        ALL_PRESENT,
        0,
        "list",
        [f.position for f in frames],
    )


def expected(frames: list[Frame]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """The seqs frame-by-frame admission keeps, per stream, and the rejects by reason."""
    kept: dict[str, list[int]] = {}
    rejected: dict[str, int] = {}
    for f in frames:
        seqs = kept.setdefault(f.stream_id, [])
        if seqs and f.seq <= seqs[-1]:
            reason = "duplicate_seq" if f.seq == seqs[-1] else "stale_seq"
            rejected[reason] = rejected.get(reason, 0) + 1
        else:
            seqs.append(f.seq)
    return kept, rejected


def check(frames: list[Frame], items: list[Item], capacity: int, new_per_batch: int = 0) -> None:
    sink, source, counts, _ = run_pipeline(items, capacity=capacity, new_per_batch=new_per_batch)
    kept, rejected = expected(frames)
    got: dict[str, list[tuple[int, float, float]]] = {}
    for batch in sink.batches:
        assert len(set(batch.stream_ids)) == len(batch)  # at most one frame per stream
        for i, stream_id in enumerate(batch.stream_ids):
            count, echo = batch.values[i, :2]
            got.setdefault(stream_id, []).append((int(batch.seq[i]), count, echo))
    # One moment per admitted frame, in seq order per stream, made by that very frame,
    # from a state that saw exactly the frames before it (padding never touched it).
    assert {s: [seq for seq, _, _ in m] for s, m in got.items()} == kept
    for stream_id, moments in got.items():
        n = int(stream_id[1:])
        for k, (seq, count, echo) in enumerate(moments):
            assert count == k + 1, (stream_id, seq, count)
            assert echo == n * 1000 + seq
    assert counts.reasons == rejected
    # Every position is committed exactly once, and only once a durable checkpoint
    # covers its frame (applied, or the one a rejected duplicate repeats).
    committed = [p for p, _ in source.committed]
    assert sorted(committed) == sorted(f.position for f in frames)  # type: ignore[type-var]
    for (stream, seq), durable in source.committed:  # type: ignore[misc]
        assert durable.get(f"s{stream}", -1) >= seq


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[Frame], list[bool], int, int]:
    streams = draw(st.integers(1, 6))
    n = draw(st.integers(1, 40))
    picks = draw(st.lists(st.integers(0, streams - 1), min_size=n, max_size=n))
    steps = draw(st.lists(st.sampled_from([1, 1, 1, 2, 0, -1]), min_size=n, max_size=n))
    last = dict.fromkeys(range(streams), 0)
    frames = []
    for stream, delta in zip(picks, steps, strict=True):
        last[stream] = max(last[stream] + delta, 1)  # 0: a duplicate, -1: stale
        frames.append(frame(stream, last[stream]))
    cuts = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    capacity = draw(st.integers(4, 8))  # fewer slots than streams: evictions and restores
    new_per_batch = draw(st.sampled_from([0, 1, 2, 64]))  # new streams' lane (0: none)
    return frames, cuts, capacity, new_per_batch


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_pipeline_orders_steps_and_commits_exactly(
    workload: tuple[list[Frame], list[bool], int, int],
) -> None:
    frames, cuts, capacity, new_per_batch = workload
    check(frames, as_items(frames, cuts), capacity, new_per_batch)


def test_padding_rows_reach_the_step_and_leave_state_alone() -> None:
    # Three frames of three streams pad to bucket 4: one padding row per batch at least.
    frames = [frame(s, 1) for s in range(3)] + [frame(s, 2) for s in range(3)]
    sink, _, _, step = run_pipeline(as_items(frames, [True] * 6), capacity=4)
    assert step.padding_seen > 0
    assert sorted(int(v) for b in sink.batches for v in b.values[:, 0]) == [1, 1, 1, 2, 2, 2]


def test_a_rejected_redelivery_waits_for_the_original() -> None:
    # seq 2 of s0 and its redelivered copy in one run: the copy is rejected at admission,
    # and its position is committed only with a checkpoint holding the original's effect.
    frames = [frame(0, 1), frame(0, 2), frame(0, 2)]
    check(frames, as_items(frames, [False, False, True]), capacity=4)


@pytest.mark.parametrize("interval_s", [0.0, 0.05])
def test_a_redelivery_to_an_idle_pipeline_is_committed(interval_s: float) -> None:
    # Everything applied is saved and committed, the executor waits for work; then a
    # redelivered frame comes (a broker gives back what it never saw acknowledged after
    # it restarted) and is rejected: nothing is stepped, yet a checkpoint must still come
    # to commit its position. (It never came: the position stayed unacknowledged for good.)
    checkpoints: list[dict[str, int]] = []
    source = FeedSource(checkpoints)
    pipeline, _, counts, _ = build_pipeline(
        source, checkpoints, capacity=4, checkpoint_interval_s=interval_s
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            await source.feed.send(frame(0, 1))
            await source.feed.send(frame(0, 2))
            await source.committed_at_least(2)
            await source.feed.send(frame(0, 2))  # the redelivery
            await source.committed_at_least(3)
            pipeline.stop()
            await source.feed.aclose()

    anyio.run(main)
    assert counts.reasons == {"duplicate_seq": 1}
    assert [p for p, _ in source.committed] == [(0, 1), (0, 2), (0, 2)]
    assert source.committed[-1][1]["s0"] == 2  # its original's effect is durable


def test_the_one_stream_too_many_is_rejected_and_still_committed() -> None:
    frames = [frame(0, 1), frame(1, 1), frame(2, 1)]
    sink, source, counts, _ = run_pipeline(
        as_items(frames, [True] * 3), capacity=2, buckets=(1, 2), max_known=2
    )
    assert counts.reasons == {"too_many_streams": 1}
    assert sorted(p for p, _ in source.committed) == [(0, 1), (1, 1), (2, 1)]  # type: ignore[type-var]
    assert sum(len(b) for b in sink.batches) == 2


@pytest.mark.parametrize(
    ("policy", "counts"), [("reset", [1, 2, 3, 1, 2]), ("continue", [1, 2, 3, 4, 5])]
)
def test_a_restarted_sensor_starts_a_session_its_state_resets_or_continues(
    policy: str, counts: list[int]
) -> None:
    restart = frame(0, 1)
    restart.present |= SESSION_START
    frames = [frame(0, 1), frame(0, 2), frame(0, 3), restart, frame(0, 2)]
    sink, source, events, _ = run_pipeline(
        as_items(frames, [True] * 5), capacity=4, session_start=policy
    )
    assert events.reasons == {}  # seq 1 again is no stale frame: it starts a session
    got = [
        (int(b.seq[i]), int(b.values[i, 0]), int(b.flags[i]))
        for b in sink.batches
        for i in range(len(b))
    ]
    assert [seq for seq, _, _ in got] == [1, 2, 3, 1, 2]
    assert [count for _, count, _ in got] == counts
    assert [bool(flags & FLAG_SESSION_START) for _, _, flags in got] == [0, 0, 0, 1, 0]
    assert len(source.committed) == 5


def test_new_streams_wait_in_their_lane_known_ones_go_ahead() -> None:
    # Two known streams, then a flood of 40 new ones and the known streams' next frames:
    # with one new stream let in per batch, the known streams' frames are not stuck
    # behind the flood.
    warm = [frame(0, 1), frame(1, 1)]
    flood = [frame(s, 1) for s in range(10, 50)]
    later = [frame(0, 2), frame(1, 2)]
    frames = warm + flood + later
    sink, _, _, _ = run_pipeline(
        as_items(frames, [True] * len(frames)), capacity=64, buckets=(1, 2, 4, 64), new_per_batch=1
    )
    order = [
        (sid, int(seq)) for b in sink.batches for sid, seq in zip(b.stream_ids, b.seq, strict=True)
    ]
    assert sorted(order) == sorted((f.stream_id, f.seq) for f in frames)  # all, once
    flood_done = max(order.index((f"s{s}", 1)) for s in range(10, 50))
    assert order.index(("s0", 2)) < flood_done and order.index(("s1", 2)) < flood_done
