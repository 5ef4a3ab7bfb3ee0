"""CPU affinity: the event loop on a core of its own, XLA's compute threads on the others.

On a small host the event loop and XLA's compute threads otherwise share every core, and a
step's ~0.5 ms of compute regularly lands on the core the loop is about to need; the loop's
frames then wait behind it (docs/benchmarks.md measures what separating them buys).

Linux gives a new thread the affinity of the thread that creates it. So the daemon narrows
the calling thread to the compute CPUs (`cpu_split`) only while it creates XLA's client,
whose threads keep that set, and pins the event loop's thread to the remaining CPU while it
serves (`pinned`); worker threads started by the loop inherit its CPU. Both are no-ops
where the process may use only one CPU or the platform has no `os.sched_setaffinity`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Set

__all__ = ["CpuSplit", "cpu_split", "pinned"]

log = logging.getLogger("enactive.affinity")


@dataclasses.dataclass(frozen=True, slots=True)
class CpuSplit:
    """`loop`: the event loop's CPU; `compute`: the CPUs left to XLA's threads."""

    loop: int
    compute: frozenset[int]


def cpu_split(allowed: Set[int] | None = None) -> CpuSplit | None:
    """Split the CPUs this process may use (`allowed`, default its affinity): the lowest
    for the event loop, the rest for compute. `None` with fewer than two CPUs or without
    `os.sched_getaffinity`. To choose the loop's CPU, start the process on a set whose
    lowest CPU is the one (`taskset -c`, systemd's `CPUAffinity=`, a Kubernetes cpuset)."""
    if allowed is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    loop = min(allowed)
    return CpuSplit(loop, frozenset(allowed) - {loop})


@contextlib.contextmanager
def pinned(cpus: Set[int] | None) -> Iterator[bool]:
    """Restrict the calling thread to `cpus` inside the block, then restore its affinity.

    Yields whether it was applied: not when `cpus` is `None` or the system refuses (a
    container's cpuset changed under the process, a sandbox without the syscall), which is
    logged and otherwise ignored: affinity is an optimisation, never a reason to stop.
    """
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        yield False
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        log.warning("CPU affinity %s not applied: %s", sorted(cpus), e)
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
