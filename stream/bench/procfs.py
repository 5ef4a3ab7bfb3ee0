"""What Linux's `/proc` says about a process: its CPU time and its memory."""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "status_kib"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads
    (`/proc/<pid>/stat` fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, field: str) -> int | None:
    """A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …); None without it."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None
