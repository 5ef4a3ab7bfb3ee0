"""The product's performance targets, checked against one benchmark result."""

from __future__ import annotations

from typing import Any

__all__ = ["TARGETS", "evaluate_targets", "load_at"]

TARGETS: dict[str, tuple[str, float, str]] = {
    "e2e_vs_kernel_ceiling": (">=", 0.6, "e2e frames/s ÷ kernel ceiling frames/s"),
    "p99_at_half_load_ms": ("<=", 5.0, "client p99 latency at 0.5 × max e2e rate, ms"),
    "throughput_vs_baseline": (">=", 12.0, "e2e frames/s ÷ baseline frames/s"),
    "p99_vs_baseline": ("<=", 1.0, "our p99 ÷ the baseline's p99, each at 0.5 × its max"),
    "runtime_compilations": ("<=", 0.0, "jit compilations after warm-up (both daemons)"),
    "warm_restart_s": ("<=", 3.0, "process start → ready file, warm compilation cache, s"),
    "rss_growth_pct": ("<=", 5.0, "RSS growth from after warm-up to after the soak, %"),
    "overload_shed_and_counted": (">=", 1.0, "1 if overload drops were counted and balanced"),
    "overload_rss_growth_pct": (
        "<=",
        5.0,
        "RSS peak under 2 × overload vs the full-load RSS after warm-up, %",
    ),
}
"""name → (comparison, bound, what the value is)."""


def load_at(loads: list[dict[str, Any]], fraction: float) -> dict[str, Any]:
    """The latency run whose offered fraction of the max rate is closest to `fraction`."""
    if not loads:
        raise ValueError("no latency runs")
    return min(loads, key=lambda load: abs(load["fraction"] - fraction))


def _values(result: dict[str, Any]) -> dict[str, float | None]:
    ours = load_at(result["latency"]["loads"], 0.5)["latency_ms"]["p99"]
    base = result.get("baseline")
    overload = result["overload"]
    shed = overload["dropped_overload"] > 0 and overload["balanced"]
    return {
        "e2e_vs_kernel_ceiling": result["e2e"]["ratio_to_ceiling"],
        "p99_at_half_load_ms": ours,
        "throughput_vs_baseline": base["ratio"] if base else None,
        "p99_vs_baseline": (
            ours / load_at(base["latency"], 0.5)["latency_ms"]["p99"] if base else None
        ),
        "runtime_compilations": result["compilations"]["runtime"],
        "warm_restart_s": result["restart"]["warm_restart_s"],
        "rss_growth_pct": result["memory"]["growth_pct"],
        "overload_shed_and_counted": 1.0 if shed else 0.0,
        "overload_rss_growth_pct": overload["rss_growth_pct"],
    }


def evaluate_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compare a `run_bench` result with `TARGETS`.

    **Arguments:**

    - `result`: the result dict (needs `e2e`, `latency`, `baseline`, `compilations`,
        `restart`, `memory`, `overload`).

    **Returns:** name → `{"value", "op", "target", "met", "what"}`; `value` and `met` are
    None where the figure was not measured (no baseline).
    """
    out = {}
    for name, value in _values(result).items():
        op, bound, what = TARGETS[name]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"value": value, "op": op, "target": bound, "met": met, "what": what}
    return out
