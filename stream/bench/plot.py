"""The benchmark figure: throughput per bucket against e2e and the baseline, and the
latency CDF per offered load, ours against the baseline. Needs matplotlib (`bench` or
`test` extra), imported only when a plot is asked for."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["write_plot"]


def write_plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw `result` (from `run_bench`) into a PNG at `path`.

    **Arguments:**

    - `result`: the benchmark result.
    - `path`: the PNG file to write (its directory must exist).

    **Raises:** `ImportError` when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    rows = result["kernel"]["buckets"]
    labels = [str(r["bucket"]) for r in rows]
    left.bar(labels, [r["compiled_frames_per_s"] for r in rows], color="#9bb8d3", label="kernel")
    e2e = result["e2e"]["frames_per_s"]
    left.axhline(e2e, color="#1f4e79", lw=2, label=f"end to end: {e2e:,.0f}/s")
    base = result.get("baseline")
    if base:
        rate = base["frames_per_s"]
        left.axhline(rate, color="#c0392b", lw=2, ls="--", label=f"baseline: {rate:,.0f}/s")
    lowest = min([r["compiled_frames_per_s"] for r in rows] + [e2e] + ([rate] if base else []))
    left.set_yscale("log")
    left.set_ylim(bottom=lowest / 2)
    left.set_xlabel("batch bucket")
    left.set_ylabel("frames/s")
    left.set_title("Throughput: compiled kernel per bucket, end to end, baseline")
    left.legend(loc="upper left")

    colors = plt.get_cmap("tab10")
    loads = result["latency"]["loads"]
    for i, load in enumerate(loads):
        c = colors(i)
        right.plot(
            load["cdf_ms"]["x"],
            load["cdf_ms"]["p"],
            color=c,
            label=f"ours {load['fraction']:g}× ({load['offered_frames_per_s']:,.0f}/s)",
        )
    for i, load in enumerate(base["latency"] if base else []):
        c = colors(i)
        right.plot(
            load["cdf_ms"]["x"],
            load["cdf_ms"]["p"],
            color=c,
            ls="--",
            label=f"baseline {load['fraction']:g}× ({load['offered_frames_per_s']:,.0f}/s)",
        )
    right.axvline(5.0, color="grey", lw=1, ls=":", label="5 ms")
    right.set_xscale("log")
    right.set_xlabel("latency, frame sent → moment received (ms)")
    right.set_ylabel("fraction of frames")
    right.set_title("Latency CDF per offered load (× each service's max)")
    right.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
