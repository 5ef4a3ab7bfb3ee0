"""`enactive-stream bench`: the kernel ceiling, end-to-end throughput and latency, the
per-frame baseline, compilations, restart and memory — one run, one JSON, one table.

Phases, one service at a time (the host has 2 cores):

```
kernel    stream.bench.kernel.run_kernel_bench in this process: compiled step per bucket
daemon    start ─► warm-up run ─► `runs` throughput runs (median = max e2e rate)
          ─► latency runs at loads × max ─► soak (RSS before/after) ─► compilations
          ─► SIGTERM ─► restart, timed to the ready file ─► warm-up ─► UDP overload at
          2 × max ─► received = processed + rejected + dropped ─► compilations ─► stop
baseline  start ─► warm-up ─► throughput runs ─► latency runs at loads × its max ─► stop
```

Every measurement is a fresh client process (`stream.bench.client`) over loopback TCP;
stream ids stay the same and seq continues, so each run brings new frames.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stream.protocol import Dims, MomentSizes

from .measure import Measured, rounds_for
from .services import BenchError, ServiceProcess
from .settings import BenchSettings
from .stats import growth_pct, late_growth_pct
from .targets import evaluate_targets
from .wire import moment_record_bytes, stream_ids

__all__ = ["BenchError", "daemon_config", "run_bench"]

MODEL_KEYS = (
    "state_dim",
    "proprio_dim",
    "tactile_dim",
    "motor_dim",
    "retention_depth",
    "protention_horizon",
    "som_grid",
    "hidden_dim",
    "attention_heads",
)
"""`[model]` keys the benchmark passes on (to the daemon, the baseline and the kernel)."""


def _toml(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def daemon_config(
    settings: BenchSettings,
    state_dir: Path,
    cache_dir: str,
    *,
    connections: int = 0,
    streams: int = 0,
) -> str:
    """The daemon's TOML for the benchmark: ephemeral loopback ports, `settings.buckets`,
    `max_streams` ≥ the streams (and ≥ `streams`), no status line, state in `state_dir`,
    the compilation cache in `cache_dir`, and a subscriber buffer that rides out client
    hiccups (65,536 moments, their bytes not capped lower: on a GPU machine the daemon
    outran the benchmark's own subscriber by more than the default 8 MiB, which cut it
    off as a slow consumer); ready only once every bucket is compiled. With
    `connections` > 0 (the fleet scenarios: every sensor from 127.0.0.1) the ingest's
    connection limits, in all and per address, are raised to fit them."""
    model = "".join(f"{k} = {_toml(v)}\n" for k, v in settings.model.items())
    wait = "" if settings.max_wait_ms is None else f"max_wait_ms = {settings.max_wait_ms}\n"
    if settings.adaptive:
        wait += f"adaptive = true\nslo_p99_ms = {settings.slo_p99_ms}\n"
    limits = ""
    if connections > 0:
        most = max(4096, connections + 64)
        limits = f"max_connections = {most}\nmax_connections_per_address = {most}\n"
    return (
        '[ingest]\ntcp = "127.0.0.1:0"\nudp = "127.0.0.1:0"\n'
        f"{limits}"
        '[output]\ntcp = "127.0.0.1:0"\nsubscriber_buffer = 65536\n'
        "subscriber_max_pending_bytes = 1073741824\n"
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        # Measured from ready: every bucket compiled by then, none in the background.
        f"[batching]\nbuckets = {_toml(settings.buckets)}\nserve_while_compiling = false\n{wait}"
        f"[model]\n{model}"
        f"[state]\ndir = {_toml(str(state_dir))}\n"
        f"max_streams = {max(4096, settings.streams, max(settings.buckets), streams)}\n"
        f"[device]\ncompilation_cache_dir = {_toml(cache_dir)}\n"
        "[log]\nstatus_interval_s = 0\n"
    )


def _model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(model) - set(MODEL_KEYS)
    if unknown:
        raise ValueError(f"model keys {sorted(unknown)}: expected some of {MODEL_KEYS}")
    return {k: tuple(v) if k == "som_grid" else v for k, v in model.items()}


def model_shapes(
    settings: BenchSettings,
) -> tuple[dict[str, Any], Dims, MomentSizes, dict[str, Any]]:
    """The model's keys as the daemon and the kernel get them, the frames' modality
    sizes, the moments' sizes, and the model as a result reports it."""
    from processors import ModelConfig

    kwargs = _model_kwargs(settings.model)
    model = ModelConfig(**kwargs)
    assert model.moment_dim is not None
    dims = Dims(model.state_dim, model.proprio_dim, model.tactile_dim, model.motor_dim)
    sizes = MomentSizes(model.moment_dim, model.state_dim, model.proprio_dim, model.motor_dim)
    return kwargs, dims, sizes, {**dims._asdict(), "moment_dim": model.moment_dim, **kwargs}


def _kernel(settings: BenchSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    from processors import ModelConfig

    # Imported here, not at the top: `python -m stream.bench.kernel` imports this package
    # first, and would otherwise find the module already imported (runpy warns).
    from .kernel import run_kernel_bench

    rows = run_kernel_bench(
        ModelConfig(**kwargs),
        settings.kernel_buckets,
        repeats=settings.kernel_repeats,
        min_time=settings.kernel_min_time,
        eager_frames=settings.kernel_eager_frames,
    )
    best = max(rows, key=lambda r: r["compiled_frames_per_s"])
    return {
        "buckets": rows,
        "ceiling_frames_per_s": best["compiled_frames_per_s"],
        "ceiling_bucket": best["bucket"],
    }


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _balance(proc: ServiceProcess) -> dict[str, float]:
    samples = proc.samples()

    def total(name: str, **labels: str) -> float:
        return sum(
            v
            for n, ls, v in samples
            if n == name and all(ls.get(k) == x for k, x in labels.items())
        )

    return {
        "received": total("enactive_frames_received_total"),
        "processed": total("enactive_frames_processed_total"),
        "rejected": total("enactive_frames_rejected_total"),
        "dropped": total("enactive_frames_dropped_total"),
        "dropped_overload": total("enactive_frames_dropped_total", reason="overload"),
    }


def _balanced(b: dict[str, float]) -> bool:
    return b["received"] == b["processed"] + b["rejected"] + b["dropped"]


def _daemon_phase(
    settings: BenchSettings,
    workdir: Path,
    cache_dir: str,
    dims: Dims,
    record_bytes: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    config = workdir / "daemon.toml"
    config.write_text(daemon_config(settings, workdir / "state", cache_dir))
    ready = workdir / "daemon-ready.json"
    argv = [sys.executable, "-m", "stream.cli", "run", "--config", str(config)]
    argv += ["--ready-file", str(ready)]
    out: dict[str, Any] = {}
    with ServiceProcess("daemon", argv, ready, workdir) as proc:
        out["first_start_s"] = proc.start(settings.timeout_s * 5)
        log(f"daemon ready in {out['first_start_s']:.2f} s (pid {proc.pid})")
        svc = Measured(proc, settings, dims, record_bytes, workdir, log)
        batches = proc.by_label("enactive_batches_total", "bucket")
        e2e = svc.throughput(settings.rounds, settings.runs)
        e2e["batches_by_bucket"] = _delta(
            proc.by_label("enactive_batches_total", "bucket"), batches
        )
        out["e2e"] = e2e
        out["latency"] = svc.latency(e2e["frames_per_s"])
        # Warmed up under full load: every buffer the load needs has been allocated.
        rss_warm, processed_warm = proc.rss(), proc.metric("enactive_frames_processed_total")
        if settings.soak_frames:
            rounds, repeats = rounds_for(settings.soak_frames, settings.streams)
            soak = svc.client("throughput", rounds, repeats)
            log(f"  soak: {soak['frames']:,} frames at {soak['frames_per_s']:,.0f} frames/s")
        rss_soak = proc.rss()
        out["memory"] = {
            "rss_after_warmup_bytes": rss_warm,
            "rss_after_frames_bytes": rss_soak,
            "frames": proc.metric("enactive_frames_processed_total") - processed_warm,
            "growth_pct": growth_pct(rss_warm, rss_soak),
        }
        compilations = proc.metric("enactive_jit_compilations_total", phase="runtime")
        warmup = proc.metric("enactive_jit_compilations_total", phase="warmup")
        out["exit_status"] = proc.stop()

        out["warm_restart_s"] = proc.start(settings.timeout_s * 5)
        log(f"daemon restarted, ready in {out['warm_restart_s']:.2f} s")
        svc.client("throughput", settings.warmup_rounds)
        out["overload"] = _overload(svc, e2e["frames_per_s"], rss_warm, log)
        compilations += proc.metric("enactive_jit_compilations_total", phase="runtime")
        out["compilations"] = {"runtime": compilations, "warmup_first_start": warmup}
        out["restart_exit_status"] = proc.stop()
    return out


def _overload(
    svc: Measured, max_rate: float, rss_full_load: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """UDP at `overload_factor` × `max_rate`: what was shed and counted, and the RSS —
    its peak against `rss_full_load` (the first daemon's RSS after warm-up under full
    load, the memory check's reference), and whether it still grew in the second half."""
    s, proc = svc.settings, svc.proc
    rate = s.overload_factor * max_rate
    before, rss_before = _balance(proc), proc.rss()
    samples: list[int] = []
    rounds, repeats = rounds_for(rate * s.overload_s, s.streams)
    sent = svc.client(
        "udp",
        rounds,
        repeats,
        rate,
        on_poll=lambda: samples.append(proc.rss()),
    )
    proc.wait_until(lambda: _balanced(_balance(proc)), "received = processed + rejected + dropped")
    after, rss_after = _balance(proc), proc.rss()
    delta = _delta(after, before)
    peak = max([rss_before, rss_after, *samples])
    log(
        f"  overload: {sent['sent_frames_per_s']:,.0f} frames/s offered over UDP, "
        f"{delta['dropped_overload']:,.0f} dropped (overload), "
        f"RSS peak {peak / 2**20:,.0f} MiB"
    )
    return {
        "offered_frames_per_s": rate,
        "sent_frames_per_s": sent["sent_frames_per_s"],
        "sent_frames": sent["frames"],
        "duration_s": sent["send_s"],
        **delta,
        "goodput_frames_per_s": delta["processed"] / sent["send_s"],
        "lost_before_daemon": sent["frames"] - delta["received"],
        "balanced": _balanced(after),
        "totals": after,
        "rss_full_load_bytes": rss_full_load,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": peak,
        "rss_after_bytes": rss_after,
        "rss_growth_pct": growth_pct(rss_full_load, peak),
        "rss_late_growth_pct": late_growth_pct(samples),
    }


def _baseline_phase(
    settings: BenchSettings,
    workdir: Path,
    cache_dir: str,
    model_kwargs: dict[str, Any],
    dims: Dims,
    record_bytes: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    ready = workdir / "baseline-ready.json"
    argv = [sys.executable, "-m", "stream.bench.baseline", "--ready-file", str(ready)]
    argv += ["--model", json.dumps(model_kwargs), "--cache-dir", cache_dir]
    with ServiceProcess("baseline", argv, ready, workdir) as proc:
        start = proc.start(settings.timeout_s * 5)
        log(f"baseline ready in {start:.2f} s (pid {proc.pid})")
        svc = Measured(proc, settings, dims, record_bytes, workdir, log)
        out = svc.throughput(settings.baseline_rounds, settings.baseline_runs)
        out["latency"] = svc.latency(out["frames_per_s"])
        out["start_s"] = start
        proc.stop()
    return out


def run_bench(
    settings: BenchSettings | None = None, *, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Run every phase and return the results (the `--json` document, see
    docs/benchmarks.md for its keys).

    **Arguments:**

    - `settings`: sizes of the phases (default: the full run).
    - `log`: called with one line of progress per step.

    **Returns:** a JSON-ready dict with `machine`, `settings`, `model`, `kernel`, `e2e`,
    `latency`, `baseline`, `compilations`, `restart`, `memory`, `overload`, `targets`,
    `elapsed_s`.

    **Raises:** `BenchError` when a service fails to start or a measurement fails.
    """
    import processors

    from ..config import load_config
    from .kernel import machine_info

    settings = settings or BenchSettings()
    t0 = time.perf_counter()
    kwargs, dims, sizes, reported = model_shapes(settings)
    id_bytes = len(stream_ids(settings.streams)[0])
    record_bytes = moment_record_bytes(id_bytes, sizes)
    cache_dir = settings.cache_dir or load_config().device.compilation_cache_dir
    cache_dir = processors.enable_compilation_cache(cache_dir)
    result: dict[str, Any] = {
        "schema": 1,
        "machine": machine_info(),
        "settings": settings.as_dict(),
        "model": reported,
        "record_bytes": record_bytes,
        "cache_dir": cache_dir,
    }
    log(f"kernel: buckets {list(settings.kernel_buckets)}…")
    result["kernel"] = _kernel(settings, kwargs)
    with tempfile.TemporaryDirectory(prefix="enactive-bench-") as tmp:
        work = Path(tmp)
        log(f"daemon: {settings.streams} streams over {settings.connections} connections…")
        daemon = _daemon_phase(settings, work, cache_dir, dims, record_bytes, log)
        e2e = daemon["e2e"]
        kernel = result["kernel"]
        per_bucket = {r["bucket"]: r["compiled_frames_per_s"] for r in kernel["buckets"]}
        used = max(e2e["batches_by_bucket"].items(), key=lambda kv: kv[1], default=("0", 0))[0]
        e2e["streams"], e2e["connections"] = settings.streams, settings.connections
        e2e["ratio_to_ceiling"] = e2e["frames_per_s"] / kernel["ceiling_frames_per_s"]
        e2e["main_bucket"] = int(used)
        e2e["ratio_to_kernel_same_bucket"] = (
            e2e["frames_per_s"] / per_bucket[int(used)] if int(used) in per_bucket else None
        )
        result["e2e"] = e2e
        result["latency"] = {"loads": daemon["latency"]}
        result["compilations"] = daemon["compilations"]
        result["restart"] = {
            "first_start_s": daemon["first_start_s"],
            "warm_restart_s": daemon["warm_restart_s"],
            "exit_status": daemon["exit_status"],
        }
        result["memory"] = daemon["memory"]
        result["overload"] = daemon["overload"]
        if settings.baseline:
            log("baseline: per-frame jitted asyncio service…")
            result["baseline"] = _baseline_phase(
                settings, work, cache_dir, kwargs, dims, record_bytes, log
            )
            result["baseline"]["ratio"] = e2e["frames_per_s"] / result["baseline"]["frames_per_s"]
        else:
            result["baseline"] = None
    result["targets"] = evaluate_targets(result)
    result["elapsed_s"] = time.perf_counter() - t0
    return result
