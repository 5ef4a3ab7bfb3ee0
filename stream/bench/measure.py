"""Client runs against one started service: throughput runs, open-loop latency runs.

Each run is a fresh client process; stream ids stay the same and seq continues, so every
run brings new frames. Between runs the service's `/metrics` must show the previous
subscriber gone, so the next client's readiness check sees its own subscription.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream.protocol import Dims

from .client import ClientSpec
from .services import ServiceProcess, launch_client
from .settings import BenchSettings
from .stats import median

__all__ = ["MAX_BLOCK_ROUNDS", "Measured", "combine_latency_runs", "rounds_for", "stage_means"]

MAX_BLOCK_ROUNDS = 64
"""Rounds pre-encoded per block in long runs (more are sent as repeats)."""


class Measured:
    """Client runs against one started service; seq continues across runs.

    **Arguments:**

    - `proc`: the started service.
    - `settings`: streams, connections, rounds, loads, durations, tick, timeouts.
    - `dims`: the modality sizes; `record_bytes`: the size of one moment record.
    - `workdir`: where client specs and outputs go.
    - `log`: progress lines.
    """

    def __init__(
        self,
        proc: ServiceProcess,
        settings: BenchSettings,
        dims: Dims,
        record_bytes: int,
        workdir: Path,
        log: Callable[[str], None],
    ) -> None:
        self.proc, self.settings, self.dims = proc, settings, dims
        self.record_bytes, self.workdir, self.log = record_bytes, workdir, log
        self.next_seq = 1
        self.watch_pid = 0
        """When > 0, every client run also reads this process's CPU time and `/metrics`
        (`ClientSpec.daemon_pid`): the runs' results then carry `daemon`, and
        `throughput` and `latency` list them as `daemon_runs`."""

    def client(
        self,
        mode: str,
        rounds: int,
        repeats: int = 1,
        rate: float = 0.0,
        on_poll: Callable[[], None] | None = None,
        warmup_s: float = 0.0,
    ) -> dict[str, Any]:
        """One client run (`mode`, `rounds` × `repeats` frames per stream, `rate` and
        `warmup_s` for paced modes); returns the client's result (see `run_client`)."""
        s, ports = self.settings, self.proc.ports
        spec = ClientSpec(
            mode=mode,
            ingest_port=ports["udp" if mode == "udp" else "tcp"],
            output_port=ports["output"],
            metrics_port=ports["metrics"],
            streams=s.streams,
            connections=s.connections,
            dims=(self.dims.sensory, self.dims.proprio, self.dims.tactile, self.dims.motor),
            record_bytes=self.record_bytes,
            rounds=rounds,
            repeats=repeats,
            first_seq=self.next_seq,
            rate=rate,
            tick_s=s.tick_s,
            warmup_s=warmup_s,
            timeout_s=s.timeout_s,
            daemon_pid=self.watch_pid,
        )
        self.next_seq += rounds * repeats
        result = launch_client(spec, self.workdir, on_poll=on_poll)
        if mode != "udp":  # the next client's readiness check must see its own subscription
            self.proc.wait_until(
                lambda: self.proc.metric("enactive_subscribers") == 0, "subscriber gone"
            )
        return result

    def throughput(self, rounds: int, runs: int) -> dict[str, Any]:
        """An unmeasured warm-up run, then `runs` runs of `rounds` frames per stream.

        **Returns:** `frames_per_s` (the median), `runs_frames_per_s`, `frames_per_run`.
        """
        self.client("throughput", self.settings.warmup_rounds)
        rates, daemon = [], []
        for i in range(runs):
            repeats = math.ceil(rounds / MAX_BLOCK_ROUNDS)
            r = self.client("throughput", math.ceil(rounds / repeats), repeats)
            rates.append(r["frames_per_s"])
            if "daemon" in r:
                daemon.append(r["daemon"])
            self.log(f"  {self.proc.name} throughput run {i + 1}/{runs}: {rates[-1]:,.0f} frames/s")
        out: dict[str, Any] = {
            "frames_per_s": median(rates),
            "runs_frames_per_s": rates,
            "frames_per_run": self.settings.streams * rounds,
        }
        if daemon:
            out["daemon_runs"] = daemon
        return out

    def latency(
        self, max_rate: float, loads: tuple[float, ...] | None = None
    ) -> list[dict[str, Any]]:
        """`settings.latency_runs` open-loop runs per `loads` (default `settings.loads`)
        fraction of `max_rate` frames/s, combined by `combine_latency_runs`. Each run
        offers the load for `latency_warmup_s` + `latency_s` seconds and measures the last
        `latency_s`.

        **Returns:** per load: `fraction`, `offered_frames_per_s`, `runs`, `frames`,
        `sent_frames_per_s`, `max_send_lag_ms`, `latency_ms`, `server_latency_ms`,
        `runs_p99_ms`, `cdf_ms`, `stage_mean_ms` (see docs/benchmarks.md).
        """
        s, out = self.settings, []
        for fraction in s.loads if loads is None else loads:
            rate = fraction * max_rate
            rounds, repeats = rounds_for(rate * (s.latency_warmup_s + s.latency_s), s.streams)
            before = self.proc.samples()
            runs = [
                self.client("latency", rounds, repeats, rate, warmup_s=s.latency_warmup_s)
                for _ in range(s.latency_runs)
            ]
            load = {
                "fraction": fraction,
                "offered_frames_per_s": rate,
                **combine_latency_runs(runs),
                "stage_mean_ms": stage_means(before, self.proc.samples()),
            }
            if all("daemon" in r for r in runs):
                load["daemon_runs"] = [r["daemon"] for r in runs]
            out.append(load)
            self.log(
                f"  {self.proc.name} latency at {fraction:g} × max ({rate:,.0f} frames/s): "
                f"p50 {load['latency_ms']['p50']:.2f} ms, p99 {load['latency_ms']['p99']:.2f} ms"
                f" (runs: {', '.join(f'{x:.2f}' for x in load['runs_p99_ms'])})"
            )
        return out


def _combine(stats: list[dict[str, float]]) -> dict[str, float]:
    out = {k: median([x[k] for x in stats]) for k in stats[0]}
    out["min"] = min(x["min"] for x in stats)
    out["max"] = max(x["max"] for x in stats)
    out["mean"] = sum(x["mean"] for x in stats) / len(stats)
    return out


def combine_latency_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the client results of repeated latency runs at one load.

    Each percentile is the median of the runs' percentiles (so one run disturbed by
    something else on the host does not decide the figure, and p50 ≤ p90 ≤ p99 still
    holds); `min` / `max` are over all runs; `mean` is the mean of the runs' means.

    **Arguments:**

    - `runs`: at least one `run_client` result of mode `latency`.

    **Returns:** `runs`, `frames` and `measured_frames` (sums), `sent_frames_per_s`
    (median), `max_send_lag_ms` (max), `latency_ms`, `server_latency_ms` (combined as
    above), `runs_p99_ms` (each run's client p99) and `cdf_ms` (the CDF of the run whose
    p99 is the median one).
    """
    if not runs:
        raise ValueError("no latency runs to combine")
    by_p99 = sorted(runs, key=lambda r: r["latency_ms"]["p99"])
    return {
        "runs": len(runs),
        "frames": sum(r["frames"] for r in runs),
        "measured_frames": sum(r["measured_frames"] for r in runs),
        "sent_frames_per_s": median([r["sent_frames_per_s"] for r in runs]),
        "max_send_lag_ms": max(r["max_send_lag_ms"] for r in runs),
        "latency_ms": _combine([r["latency_ms"] for r in runs]),
        "server_latency_ms": _combine([r["server_latency_ms"] for r in runs]),
        "runs_p99_ms": [r["latency_ms"]["p99"] for r in runs],
        "cdf_ms": by_p99[(len(runs) - 1) // 2]["cdf_ms"],
    }


Samples = list[tuple[str, dict[str, str], float]]


def stage_means(before: Samples, after: Samples) -> dict[str, float]:
    """Mean ms per pipeline stage between two scrapes (plus `batch_fill` as a ratio)."""
    totals: dict[tuple[str, str], float] = {}
    for sign, samples in ((-1.0, before), (1.0, after)):
        for name, labels, value in samples:
            if name.startswith("enactive_stage_latency_seconds_") and "stage" in labels:
                key = (labels["stage"], name.rsplit("_", 1)[1])
            elif name.startswith("enactive_end_to_end_latency_seconds_"):
                key = ("end_to_end", name.rsplit("_", 1)[1])
            elif name.startswith("enactive_batch_fill_ratio_"):
                key = ("batch_fill", name.rsplit("_", 1)[1])
            else:
                continue
            totals[key] = totals.get(key, 0.0) + sign * value
    out = {}
    for (stage, kind), count in totals.items():
        if kind == "count" and count > 0:
            scale = 1.0 if stage == "batch_fill" else 1e3
            out[stage] = scale * totals.get((stage, "sum"), 0.0) / count
    return out


def rounds_for(frames: float, streams: int) -> tuple[int, int]:
    """(rounds per block, repeats) covering at least `frames` frames of `streams` streams."""
    total = max(1, math.ceil(frames / streams))
    repeats = math.ceil(total / MAX_BLOCK_ROUNDS)
    return math.ceil(total / repeats), repeats
