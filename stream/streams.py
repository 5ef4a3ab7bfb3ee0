"""Per-stream bookkeeping on the host: sequence numbers, slots in the device slab, and
the states of streams evicted from it.

The device slab has `capacity` slots. A stream gets a slot the first time one of its
frames is stepped; when the slab is full, the least recently stepped stream not in the
current batch is evicted (its state read back to the host) and restored into a slot
when it returns. The table knows at most `max_known` streams (in the slab + evicted);
a frame of a new stream beyond that is rejected as `too_many_streams`.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import jax
import numpy as np

from .hoststates import HostStates
from .protocol import FrameRejected

__all__ = ["SlotPlan", "StreamTable"]


@dataclasses.dataclass(slots=True)
class SlotPlan:
    """Where one batch's streams live, and what must move first.

    - `slots`: one slot per frame of the batch, in batch order.
    - `fresh`: per frame, True when its stream starts from a fresh state.
    - `evict`: `(slot, stream_id)` to read back to the host *before* the step.
    - `restore`: `(slot, host_state)` to write into the slab *before* the step (after
        the evictions).
    """

    slots: list[int]
    fresh: list[bool]
    evict: list[tuple[int, str]]
    restore: list[tuple[int, Any]]


class StreamTable:
    """**Arguments:** `capacity`, slots in the device slab; `max_known`, streams known at
    most (slab + evicted); `max_seq_jump`, how far above its stream's last seq a frame's
    seq may be (0: any), so a stray frame cannot push a stream to the end of the range;
    `reclaim_idle_s`, when the table is full, a new stream takes the place of the least
    recently stepped stream if that one has been idle this long (0: never), so a flood of
    stray ids cannot lock new streams out for good."""

    def __init__(
        self,
        capacity: int,
        max_known: int,
        *,
        max_seq_jump: int = 0,
        reclaim_idle_s: float = 0.0,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.capacity = capacity
        self.max_known = max(max_known, capacity)
        self.max_seq_jump = max_seq_jump
        self.reclaim_idle_ns = int(reclaim_idle_s * 1e9)
        self._clock = clock
        self.reclaimed = 0  # streams forgotten to make room for new ones
        self.admitted_seq: dict[str, int] = {}  # last seq let into the pipeline
        self.processed_seq: dict[str, int] = {}  # last seq whose effect is in the state
        self.slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first
        self.host = HostStates()  # the evicted streams' states
        self.evicted: dict[str, int | None] = {}  # stream -> its row in `host` (None: being read)
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.restored: set[str] = set()  # restored from a checkpoint, flag not yet shown
        self.last_stepped: dict[str, int] = {}  # stream -> monotonic ns of its last step

    def __len__(self) -> int:
        """Streams known: in the slab or evicted to the host."""
        return len(self.slot_of) + len(self.evicted)

    @property
    def active(self) -> int:
        """Streams holding a slot in the device slab."""
        return len(self.slot_of)

    def admit(self, stream_id: str, seq: int, *, session_start: bool = False) -> None:
        """Check a frame's sequence number against its stream's last admitted one and
        record it; a frame that starts a new session of its stream (the sensor restarted)
        may have any seq. Raises `FrameRejected` (`duplicate_seq`, `stale_seq`,
        `seq_jump`, `too_many_streams`); a rejected frame changes nothing."""
        last = self.admitted_seq.get(stream_id)
        if last is None or session_start:
            if last is None and len(self.admitted_seq) >= self.max_known and not self._reclaim():
                raise FrameRejected(
                    "too_many_streams",
                    f"{len(self.admitted_seq)} streams known, limit {self.max_known}",
                    stream_id=stream_id,
                    seq=seq,
                )
        elif seq == last:
            raise FrameRejected(
                "duplicate_seq",
                f"seq {seq} of {stream_id!r} seen already",
                stream_id=stream_id,
                seq=seq,
            )
        elif seq < last:
            raise FrameRejected(
                "stale_seq",
                f"seq {seq} of {stream_id!r} < last {last}",
                stream_id=stream_id,
                seq=seq,
            )
        elif self.max_seq_jump and seq - last > self.max_seq_jump:
            raise FrameRejected(
                "seq_jump",
                f"seq {seq} of {stream_id!r} is {seq - last} past last {last}, "
                f"more than ingest.max_seq_jump = {self.max_seq_jump}",
                stream_id=stream_id,
                seq=seq,
            )
        self.admitted_seq[stream_id] = seq

    def admit_run(self, stream_ids: list[str], seq: list[int]) -> bool:
        """Admit a run of frames at once when that is what `admit` would do frame by frame
        with no rejection: distinct, known streams, each `seq` above its last (and within
        `max_seq_jump` of it). Otherwise change nothing and return False (the caller then
        admits frame by frame)."""
        admitted = self.admitted_seq
        last = list(map(admitted.get, stream_ids))
        if None in last or len(set(stream_ids)) != len(stream_ids):
            return False
        steps = list(map(operator.sub, seq, cast(list[int], last)))
        if min(steps) <= 0 or (self.max_seq_jump and max(steps) > self.max_seq_jump):
            return False
        admitted.update(zip(stream_ids, seq, strict=True))
        return True

    def plan(self, stream_ids: list[str]) -> SlotPlan:
        """Give each stream of a batch (distinct ids) a slot, evicting the least recently
        used streams that are not in this batch when the slab is full."""
        in_batch = set(stream_ids)
        plan = SlotPlan([], [], [], [])
        for stream_id in stream_ids:
            slot = self.slot_of.get(stream_id)
            if slot is not None:
                self.slot_of.move_to_end(stream_id)
                plan.slots.append(slot)
                plan.fresh.append(False)
                continue
            if not self.free:
                victim = next(s for s in self.slot_of if s not in in_batch)
                free_slot = self.slot_of.pop(victim)
                plan.evict.append((free_slot, victim))
                self.evicted[victim] = None  # filled in by `evicted_state` after the read
                self.free.append(free_slot)
            slot = self.free.pop()
            self.slot_of[stream_id] = slot
            plan.slots.append(slot)
            row = self.evicted.pop(stream_id, None)
            if row is not None:
                plan.restore.append((slot, self.host.get(row)))
                self.host.free(row)
            plan.fresh.append(row is None)
        return plan

    def stepped(self, stream_ids: list[str], now_ns: int) -> None:
        """These streams were stepped at `now_ns` (for `expire`)."""
        self.last_stepped.update(dict.fromkeys(stream_ids, now_ns))

    def expire(self, before_ns: int, among: Iterable[str] | None = None) -> list[str]:
        """Forget the streams (of `among`, default all) last stepped before `before_ns`
        that have nothing in flight: their slots are freed, their evicted states and seqs
        dropped, so a stream that returns starts afresh and the table never fills for
        good. Returns their ids."""
        last = self.last_stepped
        gone = [
            stream_id
            for stream_id in (last if among is None else among)
            if last.get(stream_id, before_ns) < before_ns
            and self.admitted_seq.get(stream_id) == self.processed_seq.get(stream_id)
        ]
        for stream_id in gone:
            slot = self.slot_of.pop(stream_id, None)
            if slot is not None:
                self.free.append(slot)
            row = self.evicted.pop(stream_id, None)
            if row is not None:
                self.host.free(row)
            for table in (self.processed_seq, self.admitted_seq, self.last_stepped):
                table.pop(stream_id, None)
            self.restored.discard(stream_id)
        return gone

    def _reclaim(self) -> bool:
        """Forget the least recently stepped stream if it has been idle `reclaim_idle_s`
        and has nothing in flight; True if one was."""
        if not self.reclaim_idle_ns:
            return False
        cutoff = self._clock() - self.reclaim_idle_ns
        for candidates in (self.evicted, self.slot_of):  # each oldest first
            oldest = next(iter(candidates), None)
            if oldest is not None and self.expire(cutoff, among=(oldest,)):
                self.reclaimed += 1
                return True
        return False

    def evicted_state(self, stream_id: str, state: Any) -> None:
        """Keep the host copy of an evicted stream's state."""
        self.evicted_states([stream_id], jax.tree.map(lambda a: np.asarray(a)[None], state))

    def evicted_states(self, stream_ids: Sequence[str], states: Any) -> None:
        """Keep the host copies of evicted streams' states (read by the executor, or from
        a checkpoint): `states` is a state tree with one row per stream, in order."""
        self.evicted.update(zip(stream_ids, self.host.put(states), strict=True))

    def evicted_of(self, stream_id: str) -> Any:
        """A copy of an evicted stream's state on the host (None: not there)."""
        row = self.evicted.get(stream_id)
        return None if row is None else self.host.get(row)

    def snapshot(self) -> StreamTable:
        """A copy of what a checkpoint saves (slots, evicted states, processed seq), safe
        to write from another thread while this table moves on."""
        copy = StreamTable(self.capacity, self.max_known)
        copy.slot_of = collections.OrderedDict(self.slot_of)
        held = [(s, row) for s, row in self.evicted.items() if row is not None]
        if held:
            copy.evicted_states([s for s, _ in held], self.host.gather([r for _, r in held]))
        copy.processed_seq = dict(self.processed_seq)
        return copy

    def processed(self, stream_id: str, seq: int) -> None:
        self.processed_seq[stream_id] = seq

    def forget_unprocessed(self, now_ns: int) -> None:
        """After a restart: frames admitted but never processed are forgotten, and every
        restored stream counts as stepped `now_ns` (its idle time starts again)."""
        self.admitted_seq = dict(self.processed_seq)
        self.last_stepped = dict.fromkeys(self.processed_seq, now_ns)
