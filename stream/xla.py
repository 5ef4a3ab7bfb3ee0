"""XLA's CPU thread pools: sized before the first use of JAX creates its client.

Beside `affinity`, which decides the CPUs those threads run on; this decides how many.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from .config import Config

__all__ = ["xla_backend_started", "xla_cpu_threads"]

log = logging.getLogger(__name__)


def xla_cpu_threads(config: Config, environ: MutableMapping[str, str] | None = None) -> int:
    """Size XLA's CPU thread pools (`[device] cpu_threads`); returns the size asked for.

    XLA's CPU client sizes its compute and dispatch pools from `PJRT_NPROC` when it is
    created, and by default gives them a thread per core. The daemon's event loop needs a
    core of its own: on the 2-core reference machine a second compute thread bought at
    most ~18 % more step throughput (at 256 rows; at 32–64 rows it lost some) for 30–75 %
    more CPU per frame, taken from the host pipeline; end to end, one thread did 30 %
    more (docs/benchmarks.md). So `cpu_threads = 0` (auto) keeps a `PJRT_NPROC` already set in
    the environment and otherwise leaves one core to the host (`cores - 1`); a positive
    value is used as given. Never fewer than `device.count`: XLA runs a sharded step's
    devices on that pool at once. Only a CPU client created after this call is affected
    (the daemon calls it before its first use of JAX); accelerator backends ignore it.

    **Arguments:** `config`; `environ`, where to read and set `PJRT_NPROC` (default
    `os.environ`, and then a warning when the client already exists with another size).
    """
    env = os.environ if environ is None else environ
    threads = config.device.cpu_threads
    if threads == 0:
        given = env.get("PJRT_NPROC", "").strip()
        threads = int(given) if given.isdigit() else len(os.sched_getaffinity(0)) - 1
    threads = max(threads, config.device.count, 1)
    if environ is None and xla_backend_started() and env.get("PJRT_NPROC") != str(threads):
        log.warning(
            "device.cpu_threads = %d not applied: this process created its XLA client "
            "before the daemon (set PJRT_NPROC before the first use of JAX)",
            threads,
        )
    env["PJRT_NPROC"] = str(threads)
    return threads


def xla_backend_started() -> bool:
    """Whether this process has created its XLA client(s) already (asks without creating
    them)."""
    from jax._src import xla_bridge  # no public way to ask without starting it

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())
