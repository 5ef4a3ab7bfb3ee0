"""`enactive-stream bench`: the end-to-end benchmark of the daemon.

`run_bench(BenchSettings())` measures the kernel ceiling, end-to-end throughput and
open-loop latency through loopback TCP, a hand-written per-frame baseline service,
runtime compilations, warm restart, memory under a soak and under UDP overload; the
client (`stream.bench.client`), the daemon and the baseline each run in their own
process. `format_table` prints the result, `write_plot` draws it. Reference:
docs/benchmarks.md.
"""

from .plot import write_plot
from .report import format_table
from .runner import BenchError, daemon_config, run_bench
from .settings import BenchSettings
from .targets import TARGETS, evaluate_targets

__all__ = [
    "TARGETS",
    "BenchError",
    "BenchSettings",
    "daemon_config",
    "evaluate_targets",
    "format_table",
    "run_bench",
    "write_plot",
]
