"""The source contract: what every source of frames implements (docs/extending.md).

A source turns a transport's messages into frames and hands them to the pipeline's
`Ingest`; the pipeline tells it, through `commit()`, when frames it handed over no longer
need to be kept by the transport.

```
source.run(ingest) ──put(frame, position)──► admission ─► batcher ─► executor ──► checkpoint
        ▲                                                                            │
        └──────────────── source.commit(positions)  ◄── once the checkpoint is durable ┘
```

**Positions.** A frame may carry a *source position* (`Frame.position`,
`FrameRun.positions`): whatever the source needs to acknowledge it later — a broker's
message, a recording's offset. TCP, UDP and the synthetic feed have nothing to
acknowledge and hand frames over without one.

**Commit points.** A position is committed (passed to `commit()`, once) when:

- its frame was applied to its stream's state, and a checkpoint that contains that
  effect has been written durably; or
- its frame was rejected at admission (`duplicate_seq`, `stale_seq`,
  `too_many_streams`), and every frame of that stream admitted before it is covered by a
  durable checkpoint (a redelivered frame is acknowledged only once the original's
  effect is safe).

A frame rejected while decoding never reaches the pipeline: the source decides what to
do with its position (it can never succeed). A source whose frames are lost in a crash
before their commit will see them again only if its transport redelivers unacknowledged
messages; the checkpoint holds each stream's last applied seq, so a redelivered frame
whose effect is already in the restored state is rejected as `duplicate_seq`/`stale_seq`
and committed, and one whose effect is not is applied: exactly-once effect on state for
a transport that redelivers.

**What a source is promised.** Frames of one stream are stepped in the order the
source handed them over; a frame handed over is either stepped (one moment is offered to
the sinks), rejected (counted by reason) or — only for a `drop_oldest` source under
overload — dropped (counted `overload`). Nothing is lost silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from anyio.abc import TaskStatus

from ..buffers import Overflow
from ..ingest import Ingest

__all__ = ["OpenedSource", "Source"]


class Source(Protocol):
    """A source of frames.

    - `name`: the source's name in logs and in the daemon's `ports` (`"tcp"`, `"udp"`).
    - `labels`: the `source` label values its frames carry (`Frame.source`), so metrics
        pre-declare exactly those series, and commits find their source.
    - `overflow`: `"block"` (the source waits while the pipeline is full; its sender is
        slowed down) or `"drop_oldest"` (it cannot wait; it drops and counts).
    """

    name: str
    labels: tuple[str, ...]
    overflow: Overflow

    async def run(self, ingest: Ingest, *, task_status: TaskStatus[int | None]) -> None:
        """Hand frames to `ingest` until `ingest.stopped` is set, then finish the data in
        hand and return. Call `task_status.started(port)` once bound and able to receive
        (`None` where there is no port). Report every frame that arrives with
        `ingest.received`, every rejection with `ingest.rejected`. A failure of one
        connection or message must not end `run`; a failure to start (a port in use)
        raises."""
        ...

    def commit(self, positions: Sequence[object]) -> None:
        """`positions` (of frames this source handed over, in the order their commits
        became due) may now be acknowledged to the transport. Called on the event loop;
        must not block. May be called after `run()` has returned, until the pipeline
        ends (the final checkpoint at shutdown commits too)."""
        ...


@runtime_checkable
class OpenedSource(Protocol):
    """A source with a connection that must outlive `run()` — a broker source
    acknowledges what the final checkpoint commits, after `run()` returned.

    `open()` is an async context manager the pipeline enters before anything runs (a
    failure to connect or set up fails the start) and leaves once the pipeline has ended
    and every commit was made."""

    def open(self) -> AbstractAsyncContextManager[None]: ...
