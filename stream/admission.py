"""Admission: the per-stream sequence check a frame passes on its way into the pipeline.

A frame is admitted when its seq is above its stream's last admitted one, or it starts a
new session of its stream (`SESSION_START`: the sensor restarted, its seq may restart),
and its stream is known or there is room for one more (`StreamTable.admit`). Otherwise it
is rejected, counted by reason, returned to the source (which may answer the sender), and
— if it carries a source position — its position is noted for a commit once everything
admitted before it on that stream is durable (`CommitLog`). A whole `FrameRun` is admitted
at once when that is what frame-by-frame admission would do without a rejection.
"""

from __future__ import annotations

from .commits import CommitLog
from .events import PipelineEvents
from .protocol import SESSION_START, Frame, FrameRejected, FrameRun
from .streams import StreamTable

__all__ = ["Admission"]


class Admission:
    """**Arguments:** `table`, the stream table; `events`, where rejections are counted;
    `commits`, where rejected frames' positions wait."""

    def __init__(self, table: StreamTable, events: PipelineEvents, commits: CommitLog) -> None:
        self.table = table
        self.events = events
        self.commits = commits
        self._reclaimed = table.reclaimed

    def frame(self, frame: Frame) -> FrameRejected | None:
        """Admit one frame (None) or reject and count it (its rejection)."""
        start = frame.present & SESSION_START != 0
        try:
            self.table.admit(frame.stream_id, frame.seq, session_start=start)
        except FrameRejected as r:
            self.events.rejected(frame.source, r.reason)
            if frame.position is not None:
                barrier = self.table.admitted_seq.get(frame.stream_id)
                self.commits.rejected(frame.source, frame.position, frame.stream_id, barrier)
            return r
        if start:
            self.commits.session_started(frame.stream_id, frame.seq)
        if self.table.reclaimed != self._reclaimed:  # an idle stream made room for it
            self.events.expired(self.table.reclaimed - self._reclaimed)
            self._reclaimed = self.table.reclaimed
        return None

    def run(self, run: FrameRun) -> bool:
        """Admit a whole run at once (True), or nothing (False: admit it frame by frame)."""
        return self.table.admit_run(run.stream_ids, run.seq)
