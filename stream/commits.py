"""Source positions on their way to being committed (the commit points of
`stream.sources.base`).

The executor notes the positions of the frames it applies; admission notes those of the
frames it rejects, with a *barrier*: the stream's last admitted seq at that moment.
When a checkpoint is taken, `cut()` takes every applied position noted so far, and every
rejected one whose barrier its stream's processed seq has reached; once that checkpoint
is durable, `commit()` hands them to their sources. A checkpoint that fails gives its
cut back (`retry()`), so the next one covers it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence

__all__ = ["CommitLog", "Cut"]


@dataclasses.dataclass(slots=True)
class Cut:
    """The positions one checkpoint covers, per source label, in the order noted."""

    positions: dict[str, list[object]] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return sum(map(len, self.positions.values()))

    def add(self, source: str, position: object) -> None:
        self.positions.setdefault(source, []).append(position)


class CommitLog:
    """**Arguments:** `commit(source, positions)`, called with the positions of each
    source label once they are durable (routed to the source that carries that label);
    `on_rejected()`, called whenever a rejected frame's position is noted (it needs a
    checkpoint though nothing was stepped: `Executor.positions_waiting`)."""

    def __init__(
        self,
        commit: Callable[[str, list[object]], None],
        on_rejected: Callable[[], None] = lambda: None,
    ) -> None:
        self._commit = commit
        self._on_rejected = on_rejected
        self._applied = Cut()
        # (source, position, stream id, barrier seq or None), in the order rejected
        self._rejected: collections.deque[tuple[str, object, str, int | None]] = (
            collections.deque()
        )

    def __len__(self) -> int:
        """Positions noted and not yet committed."""
        return len(self._applied) + len(self._rejected)

    def applied(self, sources: Sequence[str], positions: Sequence[object]) -> None:
        """Frames with these positions were applied to their streams' state."""
        for source, position in zip(sources, positions, strict=True):
            self._applied.add(source, position)

    def rejected(self, source: str, position: object, stream_id: str, barrier: int | None) -> None:
        """A frame was rejected at admission; its position is due once `stream_id`'s
        processed seq reaches `barrier` (None: at the next checkpoint)."""
        self._rejected.append((source, position, stream_id, barrier))
        self._on_rejected()

    def session_started(self, stream_id: str, seq: int) -> None:
        """`stream_id` started a new session at `seq`: its seqs restart, so what was
        waiting for an old-session seq now waits for this frame, which is stepped after
        every frame admitted before it."""
        if any(entry[2] == stream_id for entry in self._rejected):
            self._rejected = collections.deque(
                (source, position, sid, seq if sid == stream_id else barrier)
                for source, position, sid, barrier in self._rejected
            )

    def cut(self, processed_seq: Mapping[str, int]) -> Cut:
        """What a checkpoint taken now, with these processed seqs, covers."""
        cut, self._applied = self._applied, Cut()
        waiting: collections.deque[tuple[str, object, str, int | None]] = collections.deque()
        for entry in self._rejected:
            source, position, stream_id, barrier = entry
            if barrier is None or processed_seq.get(stream_id, -1) >= barrier:
                cut.add(source, position)
            else:
                waiting.append(entry)
        self._rejected = waiting
        return cut

    def commit(self, cut: Cut) -> None:
        """The checkpoint `cut` was taken for is durable: hand its positions over."""
        for source, positions in cut.positions.items():
            self._commit(source, positions)

    def retry(self, cut: Cut) -> None:
        """The checkpoint failed: its positions go to the next one, ahead of newer ones."""
        for source, positions in self._applied.positions.items():
            cut.positions.setdefault(source, []).extend(positions)
        self._applied = cut
