"""The built-in synthetic multi-body feed as a source (`stream.synthetic.SyntheticBodies`
paced on the wall clock; overload policy `block`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from ..buffers import Overflow
from ..ingest import Ingest
from ..synthetic import SyntheticBodies

__all__ = ["SyntheticSource", "run_synthetic"]


class SyntheticSource:
    """The built-in synthetic feed as a `Source` (label `synthetic`, policy `block`;
    nothing to acknowledge). **Arguments:** as for `run_synthetic`."""

    name = "synthetic"
    labels: tuple[str, ...] = ("synthetic",)
    overflow: Overflow = "block"

    def __init__(self, *, streams: int, rate_hz: float, seed: int = 0) -> None:
        self.streams = streams
        self.rate_hz = rate_hz
        self.seed = seed

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await run_synthetic(
            ingest,
            streams=self.streams,
            rate_hz=self.rate_hz,
            seed=self.seed,
            task_status=task_status,
        )

    def commit(self, positions: Sequence[object]) -> None:
        pass


async def run_synthetic(
    ingest: Ingest,
    *,
    streams: int,
    rate_hz: float,
    seed: int = 0,
    task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Feed `streams` synthetic bodies into `ingest` at `rate_hz` ticks per second.

    Ticks are numbered on the wall clock — tick `k` is due at Unix time `k / rate_hz` and
    its frames carry seq `k` and timestamp `k / rate_hz` — so seq keeps increasing across
    restarts of the daemon, as a real sensor's would (a restarted daemon resumes each
    body's checkpointed state instead of rejecting its frames as stale). Deadlines are
    absolute, so the rate does not drift. When the pipeline holds the feed back (policy
    `block`) past a deadline, the ticks already missed are skipped rather than sent in a
    burst, leaving gaps in seq. Returns once `ingest.stop()` was called, or at once
    (after `started()`) when `streams` is 0.

    **Arguments:**

    - `ingest`: the pipeline's doorway; frames come from source `"synthetic"`.
    - `streams`: the number of bodies, with ids `body-0000`, `body-0001`, ...
    - `rate_hz`: ticks per second, > 0.
    - `seed`: fixes the signals.
    - `task_status`: `started()` is called once the feed is set up.
    """
    if rate_hz <= 0:
        raise ValueError(f"rate_hz={rate_hz}, expected > 0")
    bodies = SyntheticBodies(streams, ingest.dims, seed=seed, dt=1.0 / rate_hz)
    task_status.started(None)
    if streams == 0:
        return
    period = 1.0 / rate_hz
    # anyio's clock is monotonic; anchor it to the wall clock once.
    offset = time.time() - anyio.current_time()
    tick = math.floor((anyio.current_time() + offset) * rate_hz) + 1
    while ingest.accepting:
        deadline = tick * period - offset
        await anyio.sleep_until(deadline)
        late = anyio.current_time() - deadline
        if late > period:  # fell behind: jump to the latest tick already due
            tick += int(late * rate_hz)
        run = bodies.run(tick * period, tick)
        ingest.received("synthetic", len(run))
        if ingest.put_nowait(run) is None:
            await ingest.put(run)
        tick += 1
