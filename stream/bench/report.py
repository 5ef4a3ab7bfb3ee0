"""The benchmark result as Markdown tables (what `enactive-stream bench` prints)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_fleet_table", "format_nats_table", "format_table"]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _kernel(result: dict[str, Any]) -> list[str]:
    lines = [
        "| bucket | compiled µs/step | compiled frames/s | eager µs/frame | speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["kernel"]["buckets"]:
        lines.append(
            f"| {r['bucket']} | {r['compiled_step_us']:,.1f} | {r['compiled_frames_per_s']:,.0f} "
            f"| {r['eager_frame_us']:,.0f} | {r['speedup']:,.0f}× |"
        )
    return lines


def _throughput(result: dict[str, Any]) -> list[str]:
    e2e, kernel, base = result["e2e"], result["kernel"], result.get("baseline")
    runs = ", ".join(f"{x:,.0f}" for x in e2e["runs_frames_per_s"])
    lines = [
        "| what | frames/s | note |",
        "|---|---:|---|",
        f"| kernel ceiling (bucket {kernel['ceiling_bucket']}) "
        f"| {kernel['ceiling_frames_per_s']:,.0f} | compiled step, tight loop |",
        f"| end to end (median) | {e2e['frames_per_s']:,.0f} | {e2e['streams']} streams, "
        f"{e2e['connections']} TCP connections; runs: {runs} |",
    ]
    if base:
        base_runs = ", ".join(f"{x:,.0f}" for x in base["runs_frames_per_s"])
        lines.append(
            f"| baseline (median) | {base['frames_per_s']:,.0f} | per-frame jit, asyncio; "
            f"runs: {base_runs} |"
        )
    return lines


def _latency(result: dict[str, Any]) -> list[str]:
    lines = [
        "| service | load × max | offered frames/s | p50 ms | p90 ms | p99 ms | max ms "
        "| daemon-side p99 ms | p99 per run ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [("ours", load) for load in result["latency"]["loads"]]
    if result.get("baseline"):
        rows += [("baseline", load) for load in result["baseline"]["latency"]]
    for name, load in rows:
        lat, server = load["latency_ms"], load["server_latency_ms"]
        lines.append(
            f"| {name} | {load['fraction']:g} | {load['offered_frames_per_s']:,.0f} "
            f"| {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} "
            f"| {server['p99']:.2f} | {', '.join(f'{x:.1f}' for x in load['runs_p99_ms'])} |"
        )
    return lines


STAGE_COLUMNS = ("queue", "batch_wait", "device", "integrate", "emit", "end_to_end")


def _stages(result: dict[str, Any]) -> list[str]:
    head = " | ".join(f"{c} ms" for c in STAGE_COLUMNS)
    lines = [f"| load × max | {head} | batch fill |", "|---:|" + "---:|" * (len(STAGE_COLUMNS) + 1)]
    for load in result["latency"]["loads"]:
        st = load["stage_mean_ms"]
        cells = " | ".join(f"{st[c]:.2f}" if c in st else "—" for c in STAGE_COLUMNS)
        fill = f"{st['batch_fill']:.2f}" if "batch_fill" in st else "—"
        lines.append(f"| {load['fraction']:g} | {cells} | {fill} |")
    return lines


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f} %"


def _other(result: dict[str, Any]) -> list[str]:
    restart, memory, over = result["restart"], result["memory"], result["overload"]
    return [
        "| check | value |",
        "|---|---:|",
        f"| runtime compilations | {result['compilations']['runtime']:.0f} |",
        f"| first start → ready | {restart['first_start_s']:.2f} s |",
        f"| warm restart → ready | {restart['warm_restart_s']:.2f} s |",
        f"| RSS after warm-up | {_mib(memory['rss_after_warmup_bytes'])} |",
        f"| RSS after {memory['frames']:,.0f} more frames | "
        f"{_mib(memory['rss_after_frames_bytes'])} ({memory['growth_pct']:+.1f} %) |",
        f"| overload offered (UDP) | {over['sent_frames_per_s']:,.0f} frames/s for "
        f"{over['duration_s']:.1f} s |",
        f"| overload received / processed / dropped | {over['received']:,.0f} / "
        f"{over['processed']:,.0f} / {over['dropped_overload']:,.0f} |",
        f"| overload goodput (processed ÷ send time) | {over['goodput_frames_per_s']:,.0f} "
        "frames/s |",
        f"| overload balanced (received = processed + rejected + dropped) "
        f"| {'yes' if over['balanced'] else 'NO'} |",
        f"| overload RSS before → peak | {_mib(over['rss_before_bytes'])} → "
        f"{_mib(over['rss_peak_bytes'])} ({over['rss_growth_pct']:+.1f} % vs the full-load "
        f"{_mib(over['rss_full_load_bytes'])}) |",
        f"| overload RSS growth, 2nd half vs 1st | {_pct(over['rss_late_growth_pct'])} |",
    ]


def _targets(result: dict[str, Any]) -> list[str]:
    lines = ["| target | value | bound | met |", "|---|---:|---:|---|"]
    for name, t in result["targets"].items():
        value = "—" if t["value"] is None else f"{t['value']:,.3g}"
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {name} | {value} | {t['op']} {t['target']:g} | {met} |")
    return lines


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _fleet_kernel(result: dict[str, Any]) -> list[str]:
    lines = [
        "| bucket | compiled µs/step | compiled frames/s | cores busy | core-µs/frame |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["kernel"]["buckets"]:
        lines.append(
            f"| {r['bucket']} | {r['compiled_step_us']:,.1f} | {r['compiled_frames_per_s']:,.0f} "
            f"| {r['compiled_cores']:.2f} | {r['compiled_core_us_per_frame']:.2f} |"
        )
    return lines


def _fleet_rows(result: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, shape, figures) per row of the fleet tables."""
    rows = []
    for name, sc in result["fleet"].items():
        if name == "closed-loop":
            top = sc["max"]
            shape = f"{top['streams']} streams / {top['connections']} TCP, closed loop"
            rows.append(("closed-loop max", shape, top))
            for load in sc["loads"]:
                shape = f"{top['streams']} streams / {top['connections']} TCP, open loop"
                rows.append((f"closed-loop {load['fraction']:g} × max", shape, load))
        else:
            phases = "spread" if sc["spread"] else "aligned"
            shape = (
                f"{sc['sensors']:,} × {sc['rate_hz']:g} Hz / {sc['connections']:,} "
                f"{sc['transport'].upper()}, {phases}"
            )
            rows.append((name, shape, sc))
    return rows


def _fleet(result: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | shape | frames/s | daemon CPU µs/frame | of which loop "
        "| step CPU µs/frame | daemon ÷ step | daemon cores | frames/batch | fill "
        "| daemon p50 / p99 ms | client p50 / p99 ms | client CPU s | lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, shape, f in _fleet_rows(result):
        lost = f.get("frames_lost")
        offered = f.get("offered_frames_per_s")
        rate = _num(f["frames_per_s"], ",.0f")
        if offered and name != "closed-loop max":
            rate += f" of {offered:,.0f}"
        lines.append(
            f"| {name} | {shape} | {rate} "
            f"| {_num(f['daemon_cpu_us_per_frame'], '.1f')} "
            f"| {_num(f['loop_cpu_us_per_frame'], '.1f')} "
            f"| {_num(f['step_cpu_us_per_frame'], '.1f')} | {_num(f['daemon_to_step'], '.1f')} "
            f"| {_num(f['daemon_cores'], '.2f')} | {_num(f['frames_per_batch'], '.1f')} "
            f"| {_num(f['batch_fill'], '.2f')} "
            f"| {_num(f['daemon_p50_ms'], '.2f')} / {_num(f['daemon_p99_ms'], '.2f')} "
            f"| {_num(f.get('client_p50_ms'), '.2f')} / {_num(f.get('client_p99_ms'), '.2f')} "
            f"| {_num(f.get('client_cpu_s'), '.2f')} | {'—' if lost is None else f'{lost:,.0f}'} |"
        )
    return lines


def _fleet_batches(result: dict[str, Any]) -> list[str]:
    buckets = sorted({int(b) for _, _, f in _fleet_rows(result) for b in f["batches_by_bucket"]})
    head = " | ".join(str(b) for b in buckets)
    lines = [f"| scenario | batches | {head} |", "|---|---:|" + "---:|" * len(buckets)]
    for name, _, f in _fleet_rows(result):
        mix = f["batches_by_bucket"]
        total = sum(mix.values())
        cells = " | ".join(
            f"{100 * mix.get(str(b), 0) / total:.1f} %" if total else "—" for b in buckets
        )
        lines.append(f"| {name} | {total:,.0f} | {cells} |")
    return lines


def format_fleet_table(result: dict[str, Any]) -> str:
    """The figures of a `run_fleet_bench` result as Markdown tables."""
    m = result["machine"]
    head = (
        f"machine: {m['nproc']} × {m['cpu']}, jax {m['jax']} ({m['backend']}); "
        f"{result['elapsed_s']:.0f} s in all; runs per scenario: "
        f"{result['fleet_settings']['runs']} (medians), {result['fleet_settings']['duration_s']:g}"
        f" s each after {result['fleet_settings']['warmup_s']:g} s of warm-up"
    )
    threads = result["kernel"]["xla_threads"]
    sections = [
        (f"Kernel (XLA CPU threads: {threads}, as the daemon's)", _fleet_kernel(result)),
        ("Fleet scenarios (medians over runs; measured window only)", _fleet(result)),
        ("Batches formed, by bucket (share of batches, all runs)", _fleet_batches(result)),
    ]
    parts = [head]
    for title, lines in sections:
        parts.append(f"\n{title}\n\n" + "\n".join(lines))
    return "\n".join(parts)


def _mix(mix: dict[str, float]) -> str:
    """Batches by bucket as shares: `64: 80.0 %, 128: 20.0 %`."""
    total = sum(mix.values())
    if not total:
        return "—"
    return ", ".join(f"{b}: {100 * n / total:.1f} %" for b, n in mix.items() if n)


def _runs(values: list[float]) -> str:
    return ", ".join(f"{x:,.0f}" for x in values)


def _nats_throughput(result: dict[str, Any]) -> list[str]:
    tcp, nats = result["tcp_max"], result["nats_max"]
    lines = [
        "| path | frames/s | runs | daemon CPU µs/frame | of which loop | daemon cores "
        "| generator CPU µs/frame | broker CPU µs/frame | frames/batch | batches by bucket |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        f"| TCP max (closed loop) | {tcp['frames_per_s']:,.0f} | {_runs(tcp['runs_frames_per_s'])} "
        f"| {_num(tcp['daemon_cpu_us_per_frame'], '.1f')} "
        f"| {_num(tcp['loop_cpu_us_per_frame'], '.1f')} | {_num(tcp['daemon_cores'], '.2f')} "
        f"| — | — | {_num(tcp['frames_per_batch'], '.1f')} | {_mix(tcp['batches_by_bucket'])} |",
        f"| NATS max, end to end | {nats['frames_per_s']:,.0f} | "
        f"{_runs(nats['runs_frames_per_s'])} | {_num(nats['daemon_cpu_us_per_frame'], '.1f')} "
        f"({_num(nats['daemon_cpu_us_per_frame_acked'], '.1f')} to every ack) "
        f"| {_num(nats['loop_cpu_us_per_frame'], '.1f')} | {_num(nats['daemon_cores'], '.2f')} "
        f"| {_num(nats['generator_cpu_us_per_frame'], '.1f')} "
        f"| {_num(nats['broker_cpu_us_per_frame'], '.1f')} "
        f"| {_num(nats['frames_per_batch'], '.1f')} | {_mix(nats['batches_by_bucket'])} |",
        f"| NATS publish alone (stored by JetStream) | {nats['publish_frames_per_s']:,.0f} "
        f"| {_runs([r['publish_frames_per_s'] for r in nats['runs']])} | | | | | | | |",
    ]
    return lines


def _nats_latency(result: dict[str, Any]) -> list[str]:
    lines = [
        "| path | offered frames/s | p50 ms | p90 ms | p99 ms | max ms | daemon p50 / p99 ms "
        "| daemon CPU µs/frame | max send lag ms | p99 per run ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [("NATS", result["nats_load"])]
    if result.get("tcp_load"):
        rows.append(("TCP", result["tcp_load"]))
    for name, load in rows:
        lat = load["latency_ms"]
        cpu = load.get("daemon_measured_cpu_us_per_frame", load.get("daemon_cpu_us_per_frame"))
        lines.append(
            f"| {name} | {load['offered_frames_per_s']:,.0f} | {lat['p50']:.2f} "
            f"| {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} "
            f"| {_num(load.get('daemon_p50_ms'), '.2f')} / "
            f"{_num(load.get('daemon_p99_ms'), '.2f')} "
            f"| {_num(cpu, '.1f')} | {load['max_send_lag_ms']:.2f} "
            f"| {', '.join(f'{x:.1f}' for x in load['runs_p99_ms'])} |"
        )
    return lines


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def _received_once(p: dict[str, Any]) -> str:
    bad = p["moments_duplicated"] or p["moments_missing"] or p["moments_unexpected"]
    return (
        f"{_yes(not bad)} ({p['moments_received']:,.0f} received, "
        f"{p['moments_duplicated']:,.0f} twice, {p['moments_missing']:,.0f} missing, "
        f"{p['moments_unexpected']:,.0f} unexpected)"
    )


_NATS_CHECKS: tuple[tuple[str, Any], ...] = (
    ("frames published", lambda p: f"{p['frames']:,.0f}"),
    ("every moment received exactly once", _received_once),
    (
        "MOMENTS grew by the frames published",
        lambda p: f"{_yes(p['stored_moments'] == p['frames'])} (+{p['stored_moments']:,.0f})",
    ),
    ("exactly once (all of the above, none refused)", lambda p: _yes(p["exactly_once"])),
    (
        "ack lag median / max (sampled)",
        lambda p: f"{_num(p['ack_lag_median_s'], '.2f')} / {_num(p['ack_lag_max_s'], '.2f')} s "
        f"({p['ack_lag_samples']} samples)",
    ),
    (
        "last moment → every frame acknowledged",
        lambda p: f"{_num(p['ack_drain_s'], '.2f')} s (median; all acknowledged: "
        f"{_yes(p['all_acknowledged'])})",
    ),
    ("redeliveries", lambda p: f"{p['redeliveries']:.0f}"),
    ("sink duplicates", lambda p: f"{p['sink_duplicates']:.0f}"),
)
"""The rows of the NATS checks table: (what, the cell of one phase's figures)."""


def _nats_checks(result: dict[str, Any]) -> list[str]:
    lines = ["| check | NATS max runs | NATS open-loop runs |", "|---|---|---|"]
    phases = (result["nats_max"], result["nats_load"])
    for name, cell in _NATS_CHECKS:
        lines.append(f"| {name} | " + " | ".join(cell(p) for p in phases) + " |")
    return lines


def format_nats_table(result: dict[str, Any]) -> str:
    """The figures of a `run_nats_bench` result as Markdown tables."""
    m, s, n = result["machine"], result["settings"], result["nats_settings"]
    head = (
        f"machine: {m['nproc']} × {m['cpu']}, jax {m['jax']} ({m['backend']}); "
        f"{result['elapsed_s']:.0f} s in all; runs: {n['runs']} (medians); {s['streams']} "
        f"streams, {s['rounds']} frames each per max run; buckets {s['buckets']}; "
        f"nats-server {result['broker']['version']} ({result['broker']['storage']} storage)"
    )
    t = result["target"]
    met = "—" if t["met"] is None else ("met" if t["met"] else "**not met**")
    ratio = (
        f"NATS max ÷ TCP max: {_num(t['value'], '.2f')} (target {t['op']} {t['target']:g}: "
        f"{met})"
    )
    load = result["nats_load"]
    sections = [
        ("Throughput (medians over runs; each path its own daemon, same buckets)",
         _nats_throughput(result)),
        (f"Open loop at {load['fraction']:g} × NATS max (latency = moment receipt − the "
         "frame's due time; medians over runs)", _nats_latency(result)),
        ("Exactly once and acknowledgements (NATS)", _nats_checks(result)),
    ]  # fmt: skip
    parts = [head]
    for title, lines in sections:
        parts.append(f"\n{title}\n\n" + "\n".join(lines))
    parts.append(f"\n{ratio}")
    return "\n".join(parts)


def format_table(result: dict[str, Any]) -> str:
    """All figures of a `run_bench` result as Markdown tables, one per section (a
    `run_fleet_bench` result: `format_fleet_table`; a `run_nats_bench` result:
    `format_nats_table`)."""
    if result.get("kind") == "fleet":
        return format_fleet_table(result)
    if result.get("kind") == "nats":
        return format_nats_table(result)
    m = result["machine"]
    head = (
        f"machine: {m['nproc']} × {m['cpu']}, jax {m['jax']} ({m['backend']}); "
        f"{result['elapsed_s']:.0f} s in all"
    )
    sections = [
        ("Kernel", _kernel(result)),
        ("Throughput", _throughput(result)),
        ("Latency (client-measured, open loop; medians over runs)", _latency(result)),
        ("Daemon stages during the latency runs (means, from /metrics)", _stages(result)),
        ("Compilations, restart, memory, overload", _other(result)),
        ("Targets", _targets(result)),
    ]
    parts = [head]
    for title, lines in sections:
        parts.append(f"\n{title}\n\n" + "\n".join(lines))
    return "\n".join(parts)
