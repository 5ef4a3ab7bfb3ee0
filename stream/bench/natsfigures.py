"""The figures of `enactive-stream bench --nats` (`stream.bench.natsbench`): each run's
from the clients' results, their medians over runs, the ack-lag summary, the open-loop
rate and the throughput target. Pure: no process, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .measure import combine_latency_runs
from .stats import median

__all__ = [
    "TARGET_RATIO",
    "ack_lag_summary",
    "as_latency_runs",
    "latency_combined",
    "load_rate",
    "nats_figures",
    "nats_summary",
    "summary",
    "tcp_load_figures",
    "tcp_max_figures",
    "throughput_target",
]

TARGET_RATIO = 0.5
"""The target: NATS max ÷ TCP max, exactly-once on (reported, not an exit status)."""


def load_rate(nats_max_runs: Sequence[float], load: float) -> float:
    """The open-loop rate: `load` × the median of the NATS max runs so far."""
    return load * median(nats_max_runs)


def ack_lag_summary(samples: Sequence[float]) -> dict[str, float | int | None]:
    """`median_s`, `max_s` and `samples` (the count) of ack-lag readings (None without)."""
    if not samples:
        return {"median_s": None, "max_s": None, "samples": 0}
    return {"median_s": median(samples), "max_s": max(samples), "samples": len(samples)}


def throughput_target(nats_fps: float, tcp_fps: float, bound: float = TARGET_RATIO) -> dict:
    """NATS max ÷ TCP max against `bound`: `value`, `op`, `target`, `met`, `what`."""
    value = nats_fps / tcp_fps if tcp_fps > 0 else None
    return {
        "value": value,
        "op": ">=",
        "target": bound,
        "met": None if value is None else value >= bound,
        "what": "NATS max frames/s ÷ TCP max frames/s, exactly-once on",
    }


def _daemon(r: Mapping[str, Any], window: str) -> dict[str, Any]:
    d: dict[str, Any] = r["daemon"][window]
    return d


def tcp_max_figures(r: Mapping[str, Any], idle_cpu_s: float) -> dict[str, Any]:
    """The figures of one TCP closed-loop run (`stream.bench.client` with the daemon's
    windows, first byte → last moment); `idle_cpu_s`: the NATS daemon's CPU meanwhile."""
    d = _daemon(r, "measured")
    return {
        "frames_per_s": r["frames_per_s"],
        "frames": r["frames"],
        "daemon_cpu_us_per_frame": d["cpu_us_per_frame"],
        "loop_cpu_us_per_frame": d["main_cpu_us_per_frame"],
        "daemon_cores": d["cores"],
        "frames_per_batch": d["frames_per_batch"],
        "batch_fill": d["batch_fill"],
        "batches_by_bucket": d["batches_by_bucket"],
        "other_daemon_cpu_s": idle_cpu_s,
    }


def nats_figures(r: Mapping[str, Any], idle_cpu_s: float) -> dict[str, Any]:
    """The figures of one `stream.bench.natsload` run (either mode); `idle_cpu_s`: the
    TCP daemon's CPU meanwhile. The daemon's CPU per frame and batches are over the run
    (first publication → last moment; `_acked`: → every frame acknowledged), its
    latency percentiles and `daemon_measured_cpu_us_per_frame` after the warm-up."""
    d, acked = _daemon(r, "measured"), _daemon(r, "acked")
    frames, moments = r["frames"], r["moments"]
    lag = ack_lag_summary(r["ack_lag_samples_s"])
    return {
        "frames_per_s": r["frames_per_s"],
        "publish_frames_per_s": r["publish_frames_per_s"],
        "frames": frames,
        "elapsed_s": r["elapsed_s"],
        "daemon_cpu_us_per_frame": _daemon(r, "run")["cpu_us_per_frame"],
        "daemon_cpu_us_per_frame_acked": acked["cpu_us_per_frame"],
        "loop_cpu_us_per_frame": _daemon(r, "run")["main_cpu_us_per_frame"],
        "daemon_cores": _daemon(r, "run")["cores"],
        "daemon_measured_cpu_us_per_frame": d["cpu_us_per_frame"],
        "daemon_p50_ms": d["latency_ms"]["p50"],
        "daemon_p99_ms": d["latency_ms"]["p99"],
        "frames_per_batch": d["frames_per_batch"],
        "batch_fill": d["batch_fill"],
        "batches_by_bucket": _daemon(r, "run")["batches_by_bucket"],
        "generator_cpu_s": r["generator_cpu_s"],
        "generator_cpu_us_per_frame": 1e6 * r["generator_cpu_s"] / frames,
        "broker_cpu_us_per_frame": 1e6 * r["broker_cpu_s"] / frames,
        "ack_lag_median_s": lag["median_s"],
        "ack_lag_max_s": lag["max_s"],
        "ack_lag_samples": lag["samples"],
        "ack_drain_s": r["ack_drain_s"],
        "all_acknowledged": r["all_acknowledged"],
        "exactly_once": r["exactly_once"],
        "moments_received": moments["received"],
        "moments_duplicated": moments["duplicated"],
        "moments_missing": moments["missing"],
        "moments_unexpected": moments["unexpected"],
        "stored_moments": r["stored_moments"],
        "refused": r["refused"],
        "redeliveries": r["daemon"]["redeliveries"],
        "sink_duplicates": r["daemon"]["sink_duplicates"],
        "other_daemon_cpu_s": idle_cpu_s,
    }


def _medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values and not all(isinstance(v, bool) for v in values):
            out[key] = median(values)
    return out


def _sum_buckets(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in runs:
        for b, n in r["batches_by_bucket"].items():
            out[b] = out.get(b, 0.0) + n
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the per-run figures, batches by bucket over all runs, the runs."""
    out = {**_medians(runs), "batches_by_bucket": _sum_buckets(runs), "runs": runs}
    out["runs_frames_per_s"] = [r["frames_per_s"] for r in runs]
    return out


def nats_summary(runs: list[dict[str, Any]], raw: Sequence[Mapping[str, Any]]) -> dict:
    """`summary` of NATS runs (`nats_figures`) and, over all of them: `exactly_once`,
    `all_acknowledged`, the ack lag of every reading pooled (`raw`: the generator's
    results), and the sums of the frames and moment counts."""
    out = summary(runs)
    pooled = [x for r in raw for x in r["ack_lag_samples_s"]]
    lag = ack_lag_summary(pooled)
    out.update(
        {
            "exactly_once": all(r["exactly_once"] for r in runs),
            "all_acknowledged": all(r["all_acknowledged"] for r in runs),
            "ack_lag_median_s": lag["median_s"],
            "ack_lag_max_s": lag["max_s"],
            "ack_lag_samples": lag["samples"],
            "frames": sum(r["frames"] for r in runs),
            "moments_received": sum(r["moments_received"] for r in runs),
            "moments_duplicated": sum(r["moments_duplicated"] for r in runs),
            "moments_missing": sum(r["moments_missing"] for r in runs),
            "moments_unexpected": sum(r["moments_unexpected"] for r in runs),
            "stored_moments": sum(r["stored_moments"] for r in runs),
            "redeliveries": sum(r["redeliveries"] for r in runs),
            "sink_duplicates": sum(r["sink_duplicates"] for r in runs),
        }
    )
    return out


def latency_combined(raw: list[dict[str, Any]]) -> dict[str, Any]:
    """`combine_latency_runs` of open-loop runs, less its count of runs (`runs` here is
    the list of each run's figures)."""
    out = combine_latency_runs(raw)
    del out["runs"]
    return out


def tcp_load_figures(r: Mapping[str, Any], idle_cpu_s: float) -> dict[str, Any]:
    """The figures of one TCP open-loop run (`stream.bench.client`, with the daemon's
    windows); `idle_cpu_s`: the NATS daemon's CPU meanwhile."""
    d = _daemon(r, "measured")
    return {
        "frames_per_s": r["frames_per_s"],
        "daemon_cpu_us_per_frame": d["cpu_us_per_frame"],
        "daemon_p50_ms": d["latency_ms"]["p50"],
        "daemon_p99_ms": d["latency_ms"]["p99"],
        "frames_per_batch": d["frames_per_batch"],
        "batch_fill": d["batch_fill"],
        "batches_by_bucket": d["batches_by_bucket"],
        "other_daemon_cpu_s": idle_cpu_s,
    }


def as_latency_runs(raw: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """NATS paced runs in the shape `combine_latency_runs` takes."""
    return [
        {
            "frames": r["frames"],
            "measured_frames": r["measured_frames"],
            "sent_frames_per_s": r["sent_frames_per_s"],
            "max_send_lag_ms": r["send_lag_ms"]["max"],
            "latency_ms": r["latency_ms"],
            "server_latency_ms": r["server_latency_ms"],
            "cdf_ms": r["cdf_ms"],
        }
        for r in raw
    ]
