"""`enactive-stream bench --fleet`: the daemon's CPU per frame under fleet-shaped loads,
against the compiled step's own CPU at the batches each load formed.

Phases, one service at a time (the host has 2 cores):

```
kernel     stream.bench.kernel.run_kernel_bench in a process of its own, with XLA's CPU
           pool sized as the daemon sizes it (PJRT_NPROC): the step's CPU per frame
           (`compiled_core_us_per_frame`) per bucket of the daemon
daemon     start ─► an unmeasured warm-up run of the largest fleet ─► `runs` rounds, each
           one run of every scenario (interleaved, so a busy spell of the host falls on
           all of them) ─► closed-loop: `runs` throughput runs (median = max), then
           `runs` open-loop latency runs at each of `loads` × max ─► stop
paced      the daemon stopped: stream.bench.kernel.run_paced_steps in a process of its
           own (PJRT_NPROC as above): for every scenario row, each bucket it used, its
           step called at the row's batch rate for `paced_s` (≥ `paced_min_calls` calls)
```

Scenarios (`FleetSettings`): `default` (64 streams at 100 Hz over 4 TCP connections,
every stream's frame of a tick at once), `tcp-fleet` (1,000 sensors, a TCP connection
each, 25 Hz each, phases spread over the period, one frame per send), `udp-fleet` (the
same, one datagram per frame), and `closed-loop` (the classic `bench` client: 1,024
streams over 2 connections, as fast as the daemon takes them, then open loop at
fractions of that).

Each fleet run is a fresh `stream.bench.fleet` process; each closed-loop run a fresh
`stream.bench.client`; both read the daemon's CPU time and `/metrics` themselves when
the first frame is due, at the end of the warm-up and after the last moment
(`stream.bench.probe`). Every figure is over the measured window (after the warm-up) of
one run, and a scenario reports the median over its runs.

Step CPU per frame of a run = Σ over buckets b of batches(b) · b · core-µs/frame(b),
÷ frames processed: what the compiled steps of the batches that run formed cost, each
as much as a full batch of its bucket in the kernel's tight loop (padding included).
The daemon ÷ step ratio is what the rest of the daemon costs on top.

Paced step CPU per frame of a run = the same sum with paced(b) in place of the tight
loop's figure: the process CPU per frame of bucket b's step called as the daemon calls it
(host arrays in, records back to the host) once every 1 / R s, R = the row's batches/s
(all buckets: Σ batches ÷ Σ seconds over its runs' measured windows — the rate at which
the daemon called a step, whatever its bucket, so the idle gap between steps). A step
after an idle gap costs more than one right after another (cold caches in every thread
that runs it); the daemon ÷ paced step ratio leaves that out of "the rest of the daemon".
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stream.protocol import Dims

from .fleet import STALL_S, FleetSpec, raise_nofile_limit
from .measure import Measured
from .runner import _model_kwargs, daemon_config, model_shapes
from .services import BenchError, ServiceProcess, _clean_env, launch_client
from .settings import BenchSettings, FleetSettings
from .stats import median
from .wire import moment_record_bytes, stream_ids

__all__ = [
    "batches_per_s",
    "daemon_xla_threads",
    "format_paced_table",
    "kernel_main",
    "paced_step_cpu_us_per_frame",
    "run_figures",
    "run_fleet_bench",
    "scenario_figures",
    "step_cpu_us_per_frame",
]

FLEET_PREFIX = "f-"
"""Stream ids of the fleet scenarios (`default` uses the first of them); the same length
as the closed-loop client's `b-…`, so every moment record has one size."""
KERNEL_ARGV = (
    sys.executable,
    "-c",
    "import sys; from stream.bench.scenarios import kernel_main; "
    "sys.exit(kernel_main(sys.argv[1:]))",
)


def daemon_xla_threads() -> int:
    """The size of XLA's CPU pool the daemon picks with `device.cpu_threads` = 0 (auto):
    `PJRT_NPROC` when set, else the usable CPUs − 1, at least 1 (`stream.xla`)."""
    given = os.environ.get("PJRT_NPROC", "").strip()
    threads = int(given) if given.isdigit() else len(os.sched_getaffinity(0)) - 1
    return max(threads, 1)


def kernel_main(argv: Sequence[str]) -> int:
    """`kernel_main([SPEC.json, OUT.json])`: `run_kernel_bench` with the spec's `model`,
    `buckets`, `repeats`, `min_time`, `eager_frames` and compilation cache `cache_dir`
    — or, when the spec has `paced` (`[bucket, batches_per_s]` pairs), `run_paced_steps`
    with those, `duration_s`, `min_calls` and `capacity`; the rows as JSON in OUT. Run by
    `run_fleet_bench` in a process of its own, so that XLA's CPU pool is created with the
    daemon's `PJRT_NPROC`."""
    import processors

    from .kernel import run_kernel_bench, run_paced_steps

    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    processors.enable_compilation_cache(spec["cache_dir"])
    config = processors.ModelConfig(**_model_kwargs(spec["model"]))
    if "paced" in spec:
        rows = run_paced_steps(
            config,
            [(int(b), float(r)) for b, r in spec["paced"]],
            duration_s=spec["duration_s"],
            min_calls=spec["min_calls"],
            capacity=spec["capacity"],
        )
    else:
        rows = run_kernel_bench(
            config,
            spec["buckets"],
            repeats=spec["repeats"],
            min_time=spec["min_time"],
            eager_frames=spec["eager_frames"],
        )
    Path(out_path).write_text(json.dumps(rows))
    return 0


def _in_kernel_process(
    name: str, spec: Mapping[str, Any], workdir: Path, timeout: float
) -> tuple[int, list[dict[str, Any]]]:
    """Run `kernel_main` on `spec` in a process of its own with `PJRT_NPROC` = the
    daemon's XLA threads: (those threads, its rows)."""
    threads = daemon_xla_threads()
    spec_path, out_path = workdir / f"{name}-spec.json", workdir / f"{name}-out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**_clean_env(), "PJRT_NPROC": str(threads)}
    proc = subprocess.run(
        [*KERNEL_ARGV, str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise BenchError(f"{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return threads, json.loads(out_path.read_text())


def _kernel(settings: BenchSettings, cache_dir: str, workdir: Path) -> dict[str, Any]:
    spec = {
        "model": dict(settings.model),
        "buckets": sorted(set(settings.buckets)),
        "repeats": settings.kernel_repeats,
        "min_time": settings.kernel_min_time,
        "eager_frames": settings.kernel_eager_frames,
        "cache_dir": cache_dir,
    }
    threads, rows = _in_kernel_process("kernel", spec, workdir, settings.timeout_s * 20)
    return {"xla_threads": threads, "buckets": rows}


def step_cpu_us_per_frame(
    batches_by_bucket: Mapping[str, float], processed: float, kernel_rows: Sequence[dict[str, Any]]
) -> float | None:
    """The compiled steps' CPU µs per frame processed for a batch mix: Σ batches(b) · b ·
    `compiled_core_us_per_frame`(b) ÷ `processed` (a batch costs what a full batch of its
    bucket cost in the kernel's loop). None without frames, or when a bucket used was not
    measured."""
    per_row = {int(r["bucket"]): float(r["compiled_core_us_per_frame"]) for r in kernel_rows}
    if processed <= 0 or any(int(b) not in per_row for b in batches_by_bucket):
        return None
    return sum(n * int(b) * per_row[int(b)] for b, n in batches_by_bucket.items()) / processed


def paced_step_cpu_us_per_frame(
    batches_by_bucket: Mapping[str, float],
    processed: float,
    paced_by_bucket: Mapping[str, float] | Mapping[int, float],
) -> float | None:
    """The compiled steps' CPU µs per frame processed for a batch mix, each batch costing
    what a full batch of its bucket cost called at the daemon's cadence: Σ batches(b) · b ·
    `paced_by_bucket`(b) ÷ `processed` (paced(b): `run_paced_steps`' `cpu_us_per_frame`).
    None without frames, or when a bucket used was not measured."""
    paced = {int(b): float(v) for b, v in paced_by_bucket.items()}
    if processed <= 0 or any(int(b) not in paced for b in batches_by_bucket):
        return None
    return sum(n * int(b) * paced[int(b)] for b, n in batches_by_bucket.items()) / processed


def batches_per_s(windows: Sequence[Mapping[str, Any]]) -> float | None:
    """The rate at which the daemon stepped batches (all buckets) over measured windows
    (`daemon_delta`s): Σ batches ÷ Σ `wall_s`; None without time or batches."""
    wall = sum(w["wall_s"] for w in windows)
    batches = sum(sum(w["batches_by_bucket"].values()) for w in windows)
    return batches / wall if wall > 0 and batches > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_figures(daemon: Mapping[str, Any], kernel_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The daemon's figures of one run's measured window (a `daemon_delta`), with the
    step's CPU for its batch mix and the daemon ÷ step ratio."""
    step = step_cpu_us_per_frame(daemon["batches_by_bucket"], daemon["processed"], kernel_rows)
    lat = daemon["latency_ms"]
    return {
        "frames_per_s": daemon["frames_per_s"],
        "daemon_cpu_us_per_frame": daemon["cpu_us_per_frame"],
        "loop_cpu_us_per_frame": daemon["main_cpu_us_per_frame"],
        "daemon_cores": daemon["cores"],
        "step_cpu_us_per_frame": step,
        "daemon_to_step": _ratio(daemon["cpu_us_per_frame"], step),
        "frames_per_batch": daemon["frames_per_batch"],
        "batch_fill": daemon["batch_fill"],
        "daemon_p50_ms": lat["p50"],
        "daemon_p99_ms": lat["p99"],
    }


def _client_figures(run: Mapping[str, Any]) -> dict[str, Any]:
    lat, server = run.get("latency_ms"), run.get("server_latency_ms")
    return {
        "client_p50_ms": lat["p50"] if lat else None,
        "client_p99_ms": lat["p99"] if lat else None,
        "client_max_ms": lat["max"] if lat else None,
        "server_p50_ms": server["p50"] if server else None,
        "server_p99_ms": server["p99"] if server else None,
    }


def _fleet_run_figures(run: Mapping[str, Any], kernel_rows: Sequence[dict[str, Any]]) -> dict:
    daemon, whole = run["daemon"]["measured"], run["daemon"]["run"]
    received = sum(whole["received"].values())
    figures = run_figures(daemon, kernel_rows)
    return {
        **figures,
        "of_offered": _ratio(figures["frames_per_s"], run["offered_frames_per_s"]),
        **_client_figures(run),
        "client_cpu_s": run["client_cpu_s"],
        "client_cpu_us_per_frame": 1e6 * run["client_cpu_s"] / max(run["sent"], 1),
        "sender_cpu_s": run["sender_cpu_s"],
        "send_lag_p99_ms": run["send_lag_ms"]["p99"],
        "send_lag_max_ms": run["send_lag_ms"]["max"],
        "sent": run["sent"],
        "refused": run["refused"],
        "received": received,
        "processed": whole["processed"],
        "rejected": whole["rejected"],
        "dropped": whole["dropped"],
        "lost_before_daemon": run["sent"] - received,
        "moments": run["moments"],
        "moments_missing": run["sent"] - run["moments"],
        "unread": run["unread"],
        "moments_dropped": sum(whole["moments_dropped_by_reason"].values()),
        "measured_frames": run.get("measured_frames", 0),
    }


def _medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        out[key] = median(values) if values else None
    return out


def _sum_reasons(maps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _sum_maps(maps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return dict(sorted(_sum_reasons(maps).items(), key=lambda kv: float(kv[0])))


def scenario_figures(
    windows: Sequence[Mapping[str, Any]], per_run: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A scenario's summary: the median of every per-run figure (`per_run`), every run's
    figures (`runs`), and over all runs' measured windows (`windows`, `daemon_delta`s)
    the batches by bucket and the batch-fill histogram (bound → batches)."""
    return {
        **_medians(per_run),
        "batches_by_bucket": _sum_maps([w["batches_by_bucket"] for w in windows]),
        "batch_fill_histogram": _sum_maps(
            [{k: v for k, v in w["batch_fill_histogram"].items() if k != "+Inf"} for w in windows]
        ),
        "runs": list(per_run),
    }


_Paced = tuple[str, dict[str, Any], list[Mapping[str, Any]]]
"""A row of the fleet tables for the paced phase: (label, its figures — the paced ones
are added to them and to their `runs` — and its runs' measured windows, in order)."""


@dataclasses.dataclass(frozen=True)
class _Shape:
    name: str
    transport: str
    sensors: int
    connections: int
    rate_hz: float
    spread: bool


def _shapes(fleet: FleetSettings) -> list[_Shape]:
    shapes = {
        "default": _Shape(
            "default",
            "tcp",
            fleet.default_streams,
            fleet.default_connections,
            fleet.default_rate_hz,
            False,
        ),
        "tcp-fleet": _Shape("tcp-fleet", "tcp", fleet.sensors, fleet.sensors, fleet.rate_hz, True),
        "udp-fleet": _Shape("udp-fleet", "udp", fleet.sensors, fleet.sensors, fleet.rate_hz, True),
    }
    return [shapes[s] for s in fleet.scenarios if s in shapes]


class _Fleet:
    """Fleet runs against one started daemon; seq continues across runs."""

    def __init__(
        self,
        proc: ServiceProcess,
        settings: BenchSettings,
        fleet: FleetSettings,
        dims: Dims,
        record_bytes: int,
        workdir: Path,
    ) -> None:
        self.proc, self.settings, self.fleet = proc, settings, fleet
        self.dims, self.record_bytes, self.workdir = dims, record_bytes, workdir
        self.next_seq = 1

    def run(self, shape: _Shape, duration_s: float, warmup_s: float) -> dict[str, Any]:
        ports = self.proc.ports
        spec = FleetSpec(
            transport=shape.transport,
            ingest_port=ports[shape.transport],
            output_port=ports["output"],
            metrics_port=ports["metrics"],
            sensors=shape.sensors,
            connections=shape.connections,
            rate_hz=shape.rate_hz,
            duration_s=duration_s,
            warmup_s=warmup_s,
            spread=shape.spread,
            dims=(self.dims.sensory, self.dims.proprio, self.dims.tactile, self.dims.motor),
            record_bytes=self.record_bytes,
            first_seq=self.next_seq,
            daemon_pid=self.proc.pid,
            prefix=FLEET_PREFIX,
            drain_s=self.fleet.drain_s,
            timeout_s=self.settings.timeout_s,
        )
        self.next_seq += spec.rounds
        timeout = 120.0 + 20 * (duration_s + warmup_s)  # a daemon far behind drains slowly
        result = launch_client(spec, self.workdir, timeout=timeout)
        self.proc.wait_until(
            lambda: self.proc.metric("enactive_subscribers") == 0, "subscriber gone"
        )
        return result


def _fleet_phase(
    proc: ServiceProcess,
    settings: BenchSettings,
    fleet: FleetSettings,
    dims: Dims,
    record_bytes: int,
    workdir: Path,
    kernel_rows: Sequence[dict[str, Any]],
    log: Callable[[str], None],
    paced: list[_Paced],
) -> dict[str, Any]:
    shapes = _shapes(fleet)
    if not shapes:
        return {}
    runner = _Fleet(proc, settings, fleet, dims, record_bytes, workdir)
    # Unmeasured: every fleet stream admitted once, the daemon's buffers grown.
    largest = max(shapes, key=lambda s: s.sensors)
    runner.run(largest, min(2.0, fleet.duration_s), 0.0)
    raw: dict[str, list[dict[str, Any]]] = {s.name: [] for s in shapes}
    for i in range(fleet.runs):
        for shape in shapes:
            r = runner.run(shape, fleet.duration_s, fleet.warmup_s)
            raw[shape.name].append(r)
            f = _fleet_run_figures(r, kernel_rows)
            log(
                f"  {shape.name} run {i + 1}/{fleet.runs}: {f['frames_per_s']:,.0f} frames/s, "
                f"daemon {_us(f['daemon_cpu_us_per_frame'])} µs CPU/frame "
                f"(step {_us(f['step_cpu_us_per_frame'])}), {f['frames_per_batch'] or 0:.1f} "
                f"frames/batch, client p99 {_ms(f['client_p99_ms'])} ms, "
                f"lost {f['sent'] - f['processed']:,.0f}"
                + (f", {f['moments_missing']:,.0f} moments missing" if f["moments_missing"] else "")
            )
            if f["unread"]:
                log(
                    f"  {shape.name}: the daemon stopped reading: {f['unread']:,.0f} frames "
                    f"sent were never read after {STALL_S:g} s with its queues empty"
                )
    out = {}
    for shape in shapes:
        runs = raw[shape.name]
        per_run = [_fleet_run_figures(r, kernel_rows) for r in runs]
        summary = scenario_figures([r["daemon"]["measured"] for r in runs], per_run)
        sent = sum(r["sent"] for r in runs)
        processed = sum(r["daemon"]["run"]["processed"] for r in runs)
        out[shape.name] = {
            "transport": shape.transport,
            "sensors": shape.sensors,
            "connections": shape.connections,
            "rate_hz": shape.rate_hz,
            "spread": shape.spread,
            "offered_frames_per_s": shape.sensors * shape.rate_hz,
            "duration_s": fleet.duration_s,
            "warmup_s": fleet.warmup_s,
            "frames_sent": sent,
            "frames_processed": processed,
            "all_processed": processed == sent,
            "frames_lost": sent - processed,
            "moments_missing": sum(r["sent"] - r["moments"] for r in runs),
            "frames_unread": sum(r["unread"] for r in runs),
            "rejected_by_reason": _sum_reasons(
                [r["daemon"]["run"]["rejected_by_reason"] for r in runs]
            ),
            "moments_dropped_by_reason": _sum_reasons(
                [r["daemon"]["run"]["moments_dropped_by_reason"] for r in runs]
            ),
            **summary,
        }
        paced.append((shape.name, out[shape.name], [r["daemon"]["measured"] for r in runs]))
    return out


def _us(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _closed_loop(
    proc: ServiceProcess,
    settings: BenchSettings,
    fleet: FleetSettings,
    dims: Dims,
    record_bytes: int,
    workdir: Path,
    kernel_rows: Sequence[dict[str, Any]],
    log: Callable[[str], None],
    paced: list[_Paced],
) -> dict[str, Any]:
    s = dataclasses.replace(settings, latency_runs=fleet.runs)
    svc = Measured(proc, s, dims, record_bytes, workdir, log)
    svc.watch_pid = proc.pid
    e2e = svc.throughput(s.rounds, fleet.runs)
    windows = [d["measured"] for d in e2e["daemon_runs"]]
    per_run = [
        {**run_figures(w, kernel_rows), "client_frames_per_s": fps}
        for w, fps in zip(windows, e2e["runs_frames_per_s"], strict=True)
    ]
    top = {
        "streams": s.streams,
        "connections": s.connections,
        "max_frames_per_s": e2e["frames_per_s"],
        "runs_frames_per_s": e2e["runs_frames_per_s"],
        "frames_per_run": e2e["frames_per_run"],
        **scenario_figures(windows, per_run),
    }
    paced.append(("closed-loop max", top, windows))
    loads = []
    for load in svc.latency(e2e["frames_per_s"], fleet.loads):
        windows = [d["measured"] for d in load.pop("daemon_runs")]
        per_run = [run_figures(w, kernel_rows) for w in windows]
        summary = scenario_figures(windows, per_run)
        summary.update(
            {
                "client_p50_ms": load["latency_ms"]["p50"],
                "client_p99_ms": load["latency_ms"]["p99"],
                "server_p50_ms": load["server_latency_ms"]["p50"],
                "server_p99_ms": load["server_latency_ms"]["p99"],
            }
        )
        loads.append({**load, **summary})
        paced.append((f"closed-loop {load['fraction']:g} × max", loads[-1], windows))
        log(
            f"  closed-loop {load['fraction']:g} × max: daemon "
            f"{_us(summary['daemon_cpu_us_per_frame'])} µs CPU/frame (step "
            f"{_us(summary['step_cpu_us_per_frame'])})"
        )
    log(
        f"  closed-loop max {e2e['frames_per_s']:,.0f} frames/s: daemon "
        f"{_us(top['daemon_cpu_us_per_frame'])} µs CPU/frame (step "
        f"{_us(top['step_cpu_us_per_frame'])})"
    )
    return {"max": top, "loads": loads}


def _median_of(values: Sequence[float | None]) -> float | None:
    numbers = [v for v in values if v is not None]
    return median(numbers) if numbers else None


def _paced_phase(
    settings: BenchSettings,
    fleet: FleetSettings,
    cache_dir: str,
    workdir: Path,
    rows: Sequence[_Paced],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Measure, for every row, each bucket it used at its batch rate (one process for
    all), and add to each row's figures (and each run's) `batches_per_s`,
    `paced_step_by_bucket`, `paced_step_cpu_us_per_frame`, `daemon_to_paced_step`.
    Returns the `paced` section of the result."""
    plans: list[tuple[float | None, list[tuple[int, float]]]] = []
    points: dict[tuple[int, float], int] = {}  # (bucket, batches/s) → index in `points`
    for _, _, windows in rows:
        rate = batches_per_s(windows)
        mix = _sum_maps([w["batches_by_bucket"] for w in windows])
        keys = [(int(b), rate) for b, n in mix.items() if n > 0] if rate else []
        plans.append((rate, keys))
        for key in keys:
            points.setdefault(key, len(points))
    spec = {
        "model": dict(settings.model),
        "paced": [list(p) for p in points],
        "duration_s": fleet.paced_s,
        "min_calls": fleet.paced_min_calls,
        "capacity": max(settings.buckets),  # as the kernel phase's: the same executables
        "cache_dir": cache_dir,
    }
    windows_s = sum(max(fleet.paced_min_calls / r, fleet.paced_s) for _, r in points)
    log(
        f"paced step: {len(points)} window{'' if len(points) == 1 else 's'} (each bucket "
        "of each scenario at its batches/s), "
        f"~{windows_s:.0f} s, XLA threads as the daemon's…"
    )
    threads, measured = (
        _in_kernel_process("paced", spec, workdir, settings.timeout_s * 20 + 2 * windows_s)
        if points
        else (daemon_xla_threads(), [])
    )
    for (label, figures, windows), (rate, keys) in zip(rows, plans, strict=True):
        by_bucket = {str(k[0]): measured[points[k]]["cpu_us_per_frame"] for k in keys}
        for run, w in zip(figures["runs"], windows, strict=True):
            step = (
                paced_step_cpu_us_per_frame(w["batches_by_bucket"], w["processed"], by_bucket)
                if by_bucket
                else None
            )
            run["paced_step_cpu_us_per_frame"] = step
            run["daemon_to_paced_step"] = _ratio(run["daemon_cpu_us_per_frame"], step)
        figures["batches_per_s"] = rate
        figures["paced_step_by_bucket"] = by_bucket
        for name in ("paced_step_cpu_us_per_frame", "daemon_to_paced_step"):
            figures[name] = _median_of([run[name] for run in figures["runs"]])
        log(
            f"  paced {label}: {0 if rate is None else rate:,.0f} batches/s, step "
            f"{_us(figures['paced_step_cpu_us_per_frame'])} µs CPU/frame (tight loop "
            f"{_us(figures['step_cpu_us_per_frame'])}), daemon ÷ paced step "
            f"{_us(figures['daemon_to_paced_step'])}"
        )
    return {
        "xla_threads": threads,
        "duration_s": fleet.paced_s,
        "min_calls": fleet.paced_min_calls,
        "points": measured,
    }


def format_paced_table(result: Mapping[str, Any]) -> str:
    """The paced step of a `run_fleet_bench` result as two Markdown tables (per scenario
    row, per point measured), each after a blank line and its title."""
    from .report import _fleet_rows

    tight = {int(r["bucket"]): r["compiled_core_us_per_frame"] for r in result["kernel"]["buckets"]}
    rows = [
        "| scenario | batches/s | daemon CPU µs/frame | step CPU µs/frame (tight) "
        "| paced step CPU µs/frame | daemon ÷ step | daemon ÷ paced step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, f in _fleet_rows(dict(result)):
        rows.append(
            f"| {name} | {_num(f.get('batches_per_s'), ',.0f')} "
            f"| {_num(f['daemon_cpu_us_per_frame'], '.1f')} "
            f"| {_num(f['step_cpu_us_per_frame'], '.1f')} "
            f"| {_num(f.get('paced_step_cpu_us_per_frame'), '.1f')} "
            f"| {_num(f['daemon_to_step'], '.1f')} | {_num(f.get('daemon_to_paced_step'), '.1f')} |"
        )
    points = [
        "| bucket | batches/s asked | achieved | calls | paced CPU µs/frame "
        "| of which caller thread | tight core-µs/frame | cores |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["paced"]["points"]:
        points.append(
            f"| {p['bucket']} | {p['batches_per_s']:,.1f} | {p['achieved_batches_per_s']:,.1f} "
            f"| {p['calls']:,} | {p['cpu_us_per_frame']:.1f} "
            f"| {p['caller_cpu_us_per_frame']:.1f} | {_num(tight.get(int(p['bucket'])), '.1f')} "
            f"| {p['cores']:.2f} |"
        )
    paced = result["paced"]
    sections = [
        (
            f"Paced step (each bucket used, called at the scenario's batches/s; XLA CPU "
            f"threads: {paced['xla_threads']}; {paced['duration_s']:g} s windows, ≥ "
            f"{paced['min_calls']} calls)",
            rows,
        ),
        ("Paced step windows", points),
    ]
    return "\n".join(f"\n{title}\n\n" + "\n".join(lines) for title, lines in sections)


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def run_fleet_bench(
    settings: BenchSettings | None = None,
    fleet: FleetSettings | None = None,
    *,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the kernel phase and the fleet scenarios; return the results (the `--json`
    document of `enactive-stream bench --fleet`, docs/benchmarks.md).

    **Arguments:**

    - `settings`: the model, buckets, kernel sizes, cache, timeouts, and the closed-loop
        client's streams, connections, rounds and latency run lengths.
    - `fleet`: the scenarios and their sizes.
    - `log`: called with one line of progress per step.

    **Returns:** a JSON-ready dict with `schema`, `machine`, `settings`, `fleet_settings`,
    `model`, `record_bytes`, `cache_dir`, `kernel` (`xla_threads`, `buckets`), `fleet`
    (scenario name → figures), `paced` (`xla_threads`, `duration_s`, `min_calls`,
    `points`: the rows of `run_paced_steps`), `compilations`, `exit_status`, `targets`
    (empty: no targets apply), `elapsed_s`.

    **Raises:** `BenchError` when a service fails to start or a measurement fails.
    """
    import processors

    from ..config import load_config
    from .kernel import machine_info

    settings = settings or BenchSettings()
    fleet = fleet or FleetSettings()
    t0 = time.perf_counter()
    _, dims, sizes, reported = model_shapes(settings)
    most = max(fleet.sensors, fleet.default_streams)
    id_bytes = len(stream_ids(most, FLEET_PREFIX)[0])
    if id_bytes != len(stream_ids(settings.streams)[0]):
        raise ValueError(
            f"{most} fleet streams and {settings.streams} closed-loop streams: their ids "
            "must be of one length (both under 100,000)"
        )
    record_bytes = moment_record_bytes(id_bytes, sizes)
    cache_dir = settings.cache_dir or load_config().device.compilation_cache_dir
    cache_dir = processors.enable_compilation_cache(cache_dir)
    try:
        nofile = raise_nofile_limit(fleet.sensors + 256)
    except Exception as e:
        raise BenchError(str(e)) from None
    result: dict[str, Any] = {
        "schema": 1,
        "kind": "fleet",
        "machine": {**machine_info(), "nofile": nofile},
        "settings": settings.as_dict(),
        "fleet_settings": fleet.as_dict(),
        "model": reported,
        "record_bytes": record_bytes,
        "cache_dir": cache_dir,
    }
    with tempfile.TemporaryDirectory(prefix="enactive-fleet-") as tmp:
        work = Path(tmp)
        log(f"kernel: buckets {sorted(set(settings.buckets))}, XLA threads as the daemon's…")
        result["kernel"] = _kernel(settings, cache_dir, work)
        rows = result["kernel"]["buckets"]
        config = work / "daemon.toml"
        total_streams = most + (settings.streams if "closed-loop" in fleet.scenarios else 0)
        config.write_text(
            daemon_config(
                settings,
                work / "state",
                cache_dir,
                connections=fleet.sensors + fleet.default_connections + settings.connections,
                streams=total_streams + 64,
            )
        )
        ready = work / "daemon-ready.json"
        argv = [sys.executable, "-m", "stream.cli", "run", "--config", str(config)]
        argv += ["--ready-file", str(ready)]
        with ServiceProcess("daemon", argv, ready, work) as proc:
            start = proc.start(settings.timeout_s * 5)
            log(f"daemon ready in {start:.2f} s (pid {proc.pid})")
            paced: list[_Paced] = []
            scenarios = _fleet_phase(
                proc, settings, fleet, dims, record_bytes, work, rows, log, paced
            )
            if "closed-loop" in fleet.scenarios:
                scenarios["closed-loop"] = _closed_loop(
                    proc, settings, fleet, dims, record_bytes, work, rows, log, paced
                )
            result["fleet"] = scenarios
            result["compilations"] = {
                "runtime": proc.metric("enactive_jit_compilations_total", phase="runtime")
            }
            result["exit_status"] = proc.stop()
        # The daemon stopped: the paced steps have the host to themselves, as the kernel's.
        result["paced"] = _paced_phase(settings, fleet, cache_dir, work, paced, log)
    result["targets"] = {}
    result["elapsed_s"] = time.perf_counter() - t0
    return result
