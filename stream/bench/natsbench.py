"""`enactive-stream bench --nats`: NATS JetStream ingest → moments published, end to end
and exactly once, against the TCP path, in one run.

```
broker    nats-server -js of its own: loopback, free ports, file storage in a temp dir
daemons   tcp: the classic benchmark daemon; nats: the same configuration + [nats] url
warm-up   one unmeasured TCP throughput run, one unmeasured NATS run (warmup_rounds)
run 1..N  TCP max ─► NATS max ─► NATS at load × NATS max ─► TCP at the same frames/s
stop      both daemons (SIGTERM), the broker
```

The phases are interleaved, so a busy spell of the host falls on both paths. Each path
has a daemon of its own, identical but for `[nats]`: a daemon with `[nats]` publishes
every moment to JetStream, those of TCP frames too, and its sink is reliable (the
pipeline waits for the server's confirmations), so the TCP path inside it is not the TCP
path. Both run the whole time; each run records what the idle one cost meanwhile.

- **TCP max**: `stream.bench.client` closed loop (`Measured.client("throughput")`).
- **NATS max**: `stream.bench.natsload` (its own process) publishes `streams × rounds`
    frames to `sensors.<id>` as fast as JetStream stores them and counts the moments on
    `moments.>`: frames/s = frames ÷ (first publication → last moment received).
- **NATS at load × max**: the same generator, open loop; latency = moment receipt −
    the frame's due time; the daemon's ack lag read every `sample_s`.
- **TCP at the same frames/s**: `Measured.client("latency")`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream.protocol import Dims

from .broker import NatsServerProcess
from .measure import MAX_BLOCK_ROUNDS, Measured, rounds_for
from .natsfigures import (
    as_latency_runs,
    latency_combined,
    load_rate,
    nats_figures,
    nats_summary,
    summary,
    tcp_load_figures,
    tcp_max_figures,
    throughput_target,
)
from .natsload import NatsLoadSpec
from .procfs import cpu_seconds
from .runner import daemon_config, model_shapes
from .services import BenchError, ServiceProcess, _clean_env
from .settings import BenchSettings, NatsBenchSettings
from .stats import median
from .wire import moment_record_bytes, stream_ids

__all__ = ["NATS_PREFIX", "run_nats_bench"]

NATS_PREFIX = "n-"
"""Stream ids of the NATS path: as long as the TCP client's `b-…`, so every moment record
has one size."""
NATSLOAD_ARGV = (
    sys.executable,
    "-c",
    "import sys; from stream.bench.natsload import main; sys.exit(main(sys.argv[1:]))",
)


def _launch(spec: NatsLoadSpec, workdir: Path, timeout: float) -> dict[str, Any]:
    """Run `stream.bench.natsload` on `spec` in a fresh process; its result."""
    spec_path = workdir / "natsload-spec.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    out_path, err_path = workdir / "natsload-out.json", workdir / "natsload-err.log"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        try:
            rc = subprocess.run(
                [*NATSLOAD_ARGV, str(spec_path)],
                stdout=out,
                stderr=err,
                env=_clean_env(),
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            raise BenchError(f"natsload ({spec.mode}) took over {timeout:.0f} s") from None
    if rc != 0:
        raise BenchError(
            f"natsload ({spec.mode}) exited {rc}: {err_path.read_text(errors='replace')[-2000:]}"
        )
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


class _Nats:
    """NATS generator runs against the NATS daemon; seq continues across runs."""

    def __init__(
        self,
        proc: ServiceProcess,
        broker: NatsServerProcess,
        settings: BenchSettings,
        nats: NatsBenchSettings,
        dims: Dims,
        record_bytes: int,
        workdir: Path,
    ) -> None:
        self.proc, self.broker, self.settings, self.nats = proc, broker, settings, nats
        self.dims, self.record_bytes, self.workdir = dims, record_bytes, workdir
        self.next_seq = 1

    def run(self, mode: str, rounds: int, rate: float = 0.0, warmup_s: float = 0.0) -> dict:
        s = self.settings
        spec = NatsLoadSpec(
            mode=mode,
            url=self.broker.url,
            metrics_port=self.proc.ports["metrics"],
            streams=s.streams,
            rounds=rounds,
            first_seq=self.next_seq,
            rate=rate,
            warmup_s=warmup_s,
            window=self.nats.window,
            dims=(self.dims.sensory, self.dims.proprio, self.dims.tactile, self.dims.motor),
            record_bytes=self.record_bytes,
            daemon_pid=self.proc.pid,
            broker_pid=self.broker.pid,
            sample_s=self.nats.sample_s,
            prefix=NATS_PREFIX,
            timeout_s=s.timeout_s,
        )
        self.next_seq += rounds
        return _launch(spec, self.workdir, timeout=120 + 3 * s.timeout_s + spec.frames / 200)


def _us(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _cpu_of(proc: ServiceProcess) -> float:
    try:
        return cpu_seconds(proc.pid)
    except OSError:
        return 0.0


def _phases(
    tcp: ServiceProcess,
    nd: ServiceProcess,
    broker: NatsServerProcess,
    settings: BenchSettings,
    nats: NatsBenchSettings,
    dims: Dims,
    record_bytes: int,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    s = settings
    svc = Measured(tcp, s, dims, record_bytes, workdir, log)
    svc.watch_pid = tcp.pid
    gen = _Nats(nd, broker, s, nats, dims, record_bytes, workdir)
    # Unmeasured: every stream admitted once, buffers grown, the consumer created.
    svc.client("throughput", s.warmup_rounds)
    gen.run("max", s.warmup_rounds)
    log("warm-up runs done (TCP, NATS)")
    repeats = math.ceil(s.rounds / MAX_BLOCK_ROUNDS)
    raw: dict[str, list[dict[str, Any]]] = {k: [] for k in ("tcp_max", "nats_max", "nats", "tcp")}
    figs: dict[str, list[dict[str, Any]]] = {k: [] for k in raw}
    rates: list[float] = []
    for i in range(nats.runs):
        head = f"  run {i + 1}/{nats.runs}:"
        idle = _cpu_of(nd)
        r = svc.client("throughput", math.ceil(s.rounds / repeats), repeats)
        raw["tcp_max"].append(r)
        figs["tcp_max"].append(tcp_max_figures(r, _cpu_of(nd) - idle))
        f = figs["tcp_max"][-1]
        log(
            f"{head} TCP max {f['frames_per_s']:,.0f} frames/s, daemon "
            f"{_us(f['daemon_cpu_us_per_frame'])} µs CPU/frame"
        )
        idle = _cpu_of(tcp)
        r = gen.run("max", s.rounds)
        raw["nats_max"].append(r)
        figs["nats_max"].append(nats_figures(r, _cpu_of(tcp) - idle))
        f = figs["nats_max"][-1]
        log(
            f"{head} NATS max {f['frames_per_s']:,.0f} frames/s end to end (publish alone "
            f"{f['publish_frames_per_s']:,.0f}/s), daemon {_us(f['daemon_cpu_us_per_frame'])} "
            f"µs CPU/frame ({_us(f['daemon_cpu_us_per_frame_acked'])} to every ack), "
            f"generator {_us(f['generator_cpu_us_per_frame'])}, broker "
            f"{_us(f['broker_cpu_us_per_frame'])}; exactly once: "
            f"{'yes' if f['exactly_once'] else 'NO'}"
        )
        rate = load_rate([x["frames_per_s"] for x in figs["nats_max"]], nats.load)
        rates.append(rate)
        rounds = max(1, math.ceil(rate * (s.latency_warmup_s + s.latency_s) / s.streams))
        idle = _cpu_of(tcp)
        r = gen.run("paced", rounds, rate, s.latency_warmup_s)
        raw["nats"].append(r)
        figs["nats"].append(nats_figures(r, _cpu_of(tcp) - idle))
        f = figs["nats"][-1]
        lat = r["latency_ms"]
        log(
            f"{head} NATS at {rate:,.0f} frames/s: p50 {_ms(lat['p50'])} ms, p99 "
            f"{_ms(lat['p99'])} ms; ack lag median {_s(f['ack_lag_median_s'])} s, max "
            f"{_s(f['ack_lag_max_s'])} s; redeliveries {f['redeliveries']:.0f}; exactly "
            f"once: {'yes' if f['exactly_once'] else 'NO'}"
        )
        if nats.tcp_load:
            blocks, reps = rounds_for(rate * (s.latency_warmup_s + s.latency_s), s.streams)
            idle = _cpu_of(nd)
            r = svc.client("latency", blocks, reps, rate, warmup_s=s.latency_warmup_s)
            raw["tcp"].append(r)
            figs["tcp"].append(tcp_load_figures(r, _cpu_of(nd) - idle))
            lat = r["latency_ms"]
            log(f"{head} TCP at {rate:,.0f} frames/s: p50 {_ms(lat['p50'])} ms, p99 "
                f"{_ms(lat['p99'])} ms")  # fmt: skip
    tcp_max = {
        **summary(figs["tcp_max"]),
        "streams": s.streams,
        "connections": s.connections,
        "frames_per_run": s.streams * s.rounds,
        "frames": sum(f["frames"] for f in figs["tcp_max"]),
    }
    nats_max = {**nats_summary(figs["nats_max"], raw["nats_max"]), "streams": s.streams}
    nats_max["frames_per_run"] = s.streams * s.rounds
    nats_load = {
        **nats_summary(figs["nats"], raw["nats"]),
        **latency_combined(as_latency_runs(raw["nats"])),
        "fraction": nats.load,
        "offered_frames_per_s": median(rates),
        "runs_offered_frames_per_s": rates,
    }
    tcp_load = None
    if raw["tcp"]:
        tcp_load = {
            **summary(figs["tcp"]),
            **latency_combined(raw["tcp"]),
            "fraction": nats.load,
            "offered_frames_per_s": median(rates),
            "runs_offered_frames_per_s": rates,
        }
    return {
        "tcp_max": tcp_max,
        "nats_max": nats_max,
        "nats_load": nats_load,
        "tcp_load": tcp_load,
    }


def _nats_section(url: str) -> str:
    return f'[nats]\nurl = "{url}"\n'


def run_nats_bench(
    settings: BenchSettings | None = None,
    nats: NatsBenchSettings | None = None,
    *,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the NATS-against-TCP benchmark; return the results (the `--json` document of
    `enactive-stream bench --nats`, docs/benchmarks.md).

    **Arguments:**

    - `settings`: streams, connections, rounds per max run, warm-up rounds, the
        open-loop runs' `latency_s` and `latency_warmup_s`, the daemons' model and
        buckets, the cache, the timeouts.
    - `nats`: runs, the open-loop load, the generator's window, the ack-lag sampling.
    - `log`: called with one line of progress per step.

    **Returns:** a JSON-ready dict: `schema`, `kind` (`"nats"`), `machine`, `settings`,
    `nats_settings`, `model`, `record_bytes`, `cache_dir`, `broker`, `daemons`,
    `tcp_max`, `nats_max`, `nats_load`, `tcp_load` (null without `tcp_load`), `ratio`,
    `target`, `targets` (`{}`: no exit-status target), `compilations`, `elapsed_s`.

    **Raises:** `BenchError` when a service fails to start or a measurement fails.
    """
    import processors

    from ..config import load_config
    from .kernel import machine_info

    settings = settings or BenchSettings()
    nats = nats or NatsBenchSettings()
    t0 = time.perf_counter()
    _, dims, sizes, reported = model_shapes(settings)
    id_bytes = len(stream_ids(settings.streams)[0])
    assert id_bytes == len(stream_ids(settings.streams, NATS_PREFIX)[0])
    record_bytes = moment_record_bytes(id_bytes, sizes)
    cache_dir = settings.cache_dir or load_config().device.compilation_cache_dir
    cache_dir = processors.enable_compilation_cache(cache_dir)
    result: dict[str, Any] = {
        "schema": 1,
        "kind": "nats",
        "machine": machine_info(),
        "settings": settings.as_dict(),
        "nats_settings": nats.as_dict(),
        "model": reported,
        "record_bytes": record_bytes,
        "cache_dir": cache_dir,
    }
    with tempfile.TemporaryDirectory(prefix="enactive-nats-") as tmp:
        work = Path(tmp)
        (work / "js").mkdir()
        with NatsServerProcess(work / "js", work) as broker:
            start = broker.start(settings.timeout_s)
            result["broker"] = {"version": broker.version(), "storage": "file", "start_s": start}
            log(f"nats-server {result['broker']['version']} ready in {start:.2f} s "
                f"(pid {broker.pid}, store {work / 'js'})")  # fmt: skip
            tcp_config, nats_config = work / "daemon-tcp.toml", work / "daemon-nats.toml"
            tcp_config.write_text(daemon_config(settings, work / "state-tcp", cache_dir))
            nats_config.write_text(
                daemon_config(settings, work / "state-nats", cache_dir) + _nats_section(broker.url)
            )
            daemons: dict[str, Any] = {}
            procs = []
            for name, config in (("tcp", tcp_config), ("nats", nats_config)):
                ready = work / f"daemon-{name}-ready.json"
                argv = [sys.executable, "-m", "stream.cli", "run", "--config", str(config)]
                procs.append(ServiceProcess(f"daemon-{name}", [*argv, "--ready-file", str(ready)],
                                            ready, work))  # fmt: skip
            with procs[0] as tcp, procs[1] as nd:
                for name, proc in (("tcp", tcp), ("nats", nd)):
                    daemons[name] = {"start_s": proc.start(settings.timeout_s * 5)}
                    log(f"daemon-{name} ready in {daemons[name]['start_s']:.2f} s "
                        f"(pid {proc.pid})")  # fmt: skip
                result.update(
                    _phases(tcp, nd, broker, settings, nats, dims, record_bytes, work, log)
                )
                result["compilations"] = {
                    name: proc.metric("enactive_jit_compilations_total", phase="runtime")
                    for name, proc in (("tcp", tcp), ("nats", nd))
                }
                for name, proc in (("tcp", tcp), ("nats", nd)):
                    daemons[name]["exit_status"] = proc.stop()
            result["daemons"] = daemons
    target = throughput_target(
        result["nats_max"]["frames_per_s"], result["tcp_max"]["frames_per_s"]
    )
    result["ratio"] = target["value"]
    result["target"] = target
    result["targets"] = {}
    result["elapsed_s"] = time.perf_counter() - t0
    return result
