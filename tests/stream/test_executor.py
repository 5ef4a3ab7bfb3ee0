"""The executor: pipelined dispatch gives the same records as stepping one batch at a
time; checkpoint failures are survived (and the final one reported)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import anyio
import jax
import numpy as np
import pytest

import processors
from stream.batcher import Batch, Batcher
from stream.commits import CommitLog
from stream.events import Listener
from stream.executor import Executor, Stepped
from stream.protocol import ALL_PRESENT, Frame
from stream.streams import StreamTable


class Batches:
    """Hands out prepared batches, then None."""

    def __init__(self, batches: list[list[Frame]]) -> None:
        self._batches = list(batches)

    async def next_batch(self) -> Batch | None:
        if not self._batches:
            return None
        frames = self._batches.pop(0)
        return Batch.of(frames, [0] * len(frames))

    def idle(self, idle: bool) -> None:
        pass


class Failures(Listener):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def checkpoint_failed(self, message: str) -> None:
        self.messages.append(message)


def executor(
    step: processors.SlabStep, table: StreamTable | None = None, events: Listener | None = None
) -> Executor:
    """An executor over a fresh slab that writes no checkpoints."""
    return Executor(
        step,
        table or StreamTable(step.capacity, 64),
        step.init_slab(),
        events=events or Listener(),
        commits=CommitLog(lambda source, positions: None),
    )


@pytest.fixture(scope="module")
def step(small_config: processors.ModelConfig) -> processors.SlabStep:
    model = processors.EnactiveModel(small_config, key=jax.random.PRNGKey(0))
    s = processors.SlabStep(model, buckets=(1, 4, 8), capacity=8)
    s.compile()
    return s


def batches(step: processors.SlabStep, n_batches: int, n_streams: int) -> list[list[Frame]]:
    rng = np.random.default_rng(0)
    return [
        [
            Frame(
                f"s{i}",
                k + 1,
                0.0,
                rng.standard_normal(step.input_width).astype(np.float32),
                ALL_PRESENT,
                0,
                "tcp",
            )
            for i in range(n_streams)
        ]
        for k in range(n_batches)
    ]


def checkpointing(
    step: processors.SlabStep,
    checkpoint: Callable[[Any, StreamTable], None],
    events: Listener | None = None,
) -> Executor:
    """An executor over a fresh slab that checkpoints after every batch."""
    return Executor(
        step,
        StreamTable(step.capacity, 64),
        step.init_slab(),
        events=events or Listener(),
        commits=CommitLog(lambda source, positions: None),
        checkpoint=checkpoint,
        checkpoint_interval_s=1e-9,
    )


async def run(executor: Executor, prepared: list[list[Frame]]) -> list[np.ndarray]:
    send, receive = anyio.create_memory_object_stream[Stepped](2)
    out: list[np.ndarray] = []

    async def drain() -> None:
        async with receive:
            async for item in receive:
                out.append(np.asarray(item.records)[: len(item.batch)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        await executor.run(Batches(prepared), send)  # type: ignore[arg-type]
    return out


async def test_pipelined_records_equal_step_by_step(step: processors.SlabStep) -> None:
    prepared = batches(step, 6, 5)
    got = await run(executor(step), prepared)
    slab = step.init_slab()
    for k, frames in enumerate(prepared):
        x = np.stack([f.payload for f in frames])
        slab, want = step.run(slab, np.arange(5), x, reset=np.full(5, k == 0))
        np.testing.assert_allclose(got[k], want, rtol=1e-6)


async def test_eviction_keeps_results_exact(step: processors.SlabStep) -> None:
    prepared = batches(step, 4, 8)
    # 8 streams through 8 slots vs. two halves alternating through 8 slots with evictions:
    full = await run(executor(step), prepared)
    table = StreamTable(step.capacity, 64)
    halves = [b[:4] for b in prepared] + [b[4:] for b in prepared]
    table.free = table.free[-4:]  # pretend half the slab is taken: forces evictions
    mixed = await run(
        executor(step, table),
        [halves[0], halves[4], halves[1], halves[5], halves[2], halves[6], halves[3], halves[7]],
    )
    for k in range(4):
        np.testing.assert_allclose(
            np.concatenate([mixed[2 * k], mixed[2 * k + 1]]), full[k], rtol=1e-6
        )


async def test_checkpoints_hold_the_state_of_the_batches_they_claim(
    step: processors.SlabStep,
) -> None:
    # A checkpoint is a copy of the streams' rows enqueued behind the steps before it and
    # read back later, while later steps reuse (donate) the slab: each written one must
    # still hold exactly the state after the batches its table says were processed.
    written: list[tuple[list[np.ndarray], list[int], int, bool]] = []

    def record(rows: object, table: StreamTable) -> None:
        seqs = set(table.processed_seq.values())
        assert len(seqs) == 1  # every stream in every batch: one seq for all
        on_main = threading.current_thread() is threading.main_thread()
        slots = list(table.slot_of.values())
        written.append(([np.array(a) for a in jax.tree.leaves(rows)], slots, seqs.pop(), on_main))

    prepared = batches(step, 6, 5)
    await run(checkpointing(step, record), prepared)
    assert len(written) >= 2 and written[-1][2] == 6  # periodic ones and the final one
    slab, after = step.init_slab(), {}
    for k, frames in enumerate(prepared):
        x = np.stack([f.payload for f in frames])
        slab, _ = step.run(slab, np.arange(5), x, reset=np.full(5, k == 0))
        after[k + 1] = [np.asarray(a) for a in jax.tree.leaves(slab)]
    for leaves, slots, seq, on_main in written:
        assert not on_main  # read back and written off the event loop
        assert sorted(slots) == list(range(5))
        for got, want in zip(leaves, after[seq], strict=True):
            assert len(got) == 5  # the streams' rows, not the whole slab
            np.testing.assert_allclose(got, want[slots], rtol=1e-6)


async def test_checkpoint_failure_is_survived_but_not_at_the_end(step: processors.SlabStep) -> None:
    failures = Failures()
    calls = 0

    def failing(rows: object, table: StreamTable) -> None:
        nonlocal calls
        calls += 1
        raise OSError(28, "No space left on device")

    with pytest.raises(BaseExceptionGroup) as info:
        await run(checkpointing(step, failing, failures), batches(step, 3, 2))
    assert info.group_contains(OSError)
    errors = failures.messages
    assert calls >= 2 and len(errors) == calls  # periodic ones survived, the final raised
    assert "No space left on device" in str(errors[0])


async def test_compiled_steps_are_enqueued_on_the_loop_eager_ones_run_off_it(
    small_config: processors.ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = processors.EnactiveModel(small_config, key=jax.random.PRNGKey(0))
    s = processors.SlabStep(model, buckets=(1, 4), capacity=8)
    lower = s._lower
    monkeypatch.setattr(s, "_lower", lambda b: lower(b) if b == 1 else 1 / 0)
    s.compile()
    assert set(s.eager_buckets) == {4}

    ex = executor(s)
    dispatch, where = ex._dispatch, []

    def spy(x: np.ndarray, meta: np.ndarray):  # type: ignore[no-untyped-def]
        where.append((len(x), threading.current_thread() is threading.main_thread()))
        return dispatch(x, meta)

    monkeypatch.setattr(ex, "_dispatch", spy)
    prepared = batches(s, 2, 1) + batches(s, 1, 3)  # 1 frame, 1 frame, then 3 (bucket 4)
    prepared[2] = [dataclasses.replace(f, stream_id=f"t{i}") for i, f in enumerate(prepared[2])]
    got = await run(ex, prepared)
    assert where == [(1, True), (1, True), (4, False)]
    assert [len(r) for r in got] == [1, 1, 3]


async def test_an_idle_daemon_still_saves_its_last_effects(step: processors.SlabStep) -> None:
    # A burst, then silence: the checkpoint falls due while no batch comes, and is written
    # without waiting for one (a SIGKILL during the silence loses nothing).
    saved: list[dict[str, int]] = []
    written = anyio.Event()

    def checkpoint(rows: object, table: StreamTable) -> None:
        saved.append(dict(table.processed_seq))
        written.set()

    ex = Executor(
        step,
        StreamTable(step.capacity, 64),
        step.init_slab(),
        events=Listener(),
        commits=CommitLog(lambda source, positions: None),
        checkpoint=checkpoint,
        checkpoint_interval_s=0.05,
    )
    batcher = Batcher(8, 0.0)
    send, receive = anyio.create_memory_object_stream[Stepped](2)

    async def drain() -> None:
        async with receive:
            async for _ in receive:
                ex.finished()

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        tg.start_soon(ex.run, batcher, send)
        for frames in batches(step, 1, 3):
            for f in frames:
                batcher.add(f)
        with anyio.fail_after(5):
            await written.wait()
        assert saved == [{"s0": 1, "s1": 1, "s2": 1}]
        await anyio.wait_all_tasks_blocked()  # the write's completion is seen
        assert ex.unsaved_age_s() == 0.0
        batcher.end()
    assert len(saved) == 1  # nothing new: no second write at the end
