"""What one benchmark run measures, and how much of it: `BenchSettings`, for the fleet
scenarios (`enactive-stream bench --fleet`) `FleetSettings`, and for NATS JetStream against
TCP (`enactive-stream bench --nats`) `NatsBenchSettings`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..config import DEFAULT_BUCKETS

__all__ = ["SCENARIOS", "BenchSettings", "FleetSettings", "NatsBenchSettings"]


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Sizes of every phase of `run_bench`. `BenchSettings()` is the full run,
    `BenchSettings.quick()` the short one.

    - `streams`, `connections`: the client's streams (ids `b-00000`, …) and TCP connections.
    - `rounds`: frames per stream in one throughput run; `runs`: throughput runs (the
        median is the max e2e rate); `warmup_rounds`: frames per stream of the unmeasured
        run before them (also after the restart).
    - `loads`: offered loads for the latency runs, as fractions of the service's max rate;
        `latency_s`: seconds of load per latency run; `latency_runs`: runs per load (each
        percentile reported is the median over them); `latency_warmup_s`: seconds of
        the same load before each run's measured `latency_s` (left out: the client
        process and its connections starting); `tick_s`: the pacing tick.
    - `soak_frames`: frames sent between the two RSS readings of the memory check (the
        first is taken after the throughput and latency runs: warmed up under full load).
    - `overload_factor`, `overload_s`: UDP load (× the max e2e rate) and its duration.
    - `baseline`: measure the per-frame baseline; `baseline_rounds`, `baseline_runs`: its
        throughput runs (its latency runs use `loads` and `latency_s` too).
    - `buckets`: the daemon's batch buckets; `max_wait_ms`: its batch deadline (None: the
        daemon's default); `adaptive`: turn on its adaptive batching, steering for
        `slo_p99_ms`.
    - `kernel_buckets`, `kernel_repeats`, `kernel_min_time`, `kernel_eager_frames`: passed
        to `stream.bench.kernel.run_kernel_bench`.
    - `model`: `[model]` keys for the daemon, the baseline and the kernel (empty: defaults).
    - `cache_dir`: the JAX compilation cache ("" → the user's, from `load_config()`).
    - `timeout_s`: how long a client waits for the next byte, and a service to get ready.
    """

    streams: int = 1024
    connections: int = 2
    rounds: int = 100
    runs: int = 5
    warmup_rounds: int = 20
    loads: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)
    latency_s: float = 5.0
    latency_runs: int = 3
    latency_warmup_s: float = 0.5
    tick_s: float = 0.001
    soak_frames: int = 1_000_000
    overload_factor: float = 2.0
    overload_s: float = 5.0
    baseline: bool = True
    baseline_rounds: int = 10
    baseline_runs: int = 3
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_wait_ms: float | None = None
    adaptive: bool = False
    slo_p99_ms: float = 5.0
    kernel_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    kernel_repeats: int = 5
    kernel_min_time: float = 0.2
    kernel_eager_frames: int = 3
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cache_dir: str = ""
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        counts = {
            "streams": self.streams,
            "connections": self.connections,
            "rounds": self.rounds,
            "runs": self.runs,
            "latency_runs": self.latency_runs,
            "warmup_rounds": self.warmup_rounds,
            "baseline_rounds": self.baseline_rounds,
            "baseline_runs": self.baseline_runs,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} = {value}: must be >= 1")
        if not self.loads or not all(0 < f <= 1 for f in self.loads):
            raise ValueError(f"loads = {self.loads}: need fractions in (0, 1]")
        if min(self.latency_s, self.tick_s, self.overload_s, self.overload_factor) <= 0:
            raise ValueError("latency_s, tick_s, overload_s, overload_factor must be > 0")
        if self.soak_frames < 0 or self.latency_warmup_s < 0:
            raise ValueError(
                f"soak_frames = {self.soak_frames}, latency_warmup_s = "
                f"{self.latency_warmup_s}: both must be >= 0"
            )

    @classmethod
    def quick(cls, **changes: Any) -> BenchSettings:
        """The short run (under 2 minutes on 2 cores): fewer frames, runs and loads."""
        base: dict[str, Any] = {
            "rounds": 30,
            "runs": 3,
            "loads": (0.25, 0.5),
            "latency_s": 2.0,
            "latency_runs": 1,
            "latency_warmup_s": 0.25,
            "soak_frames": 100_000,
            "overload_s": 2.0,
            "baseline_rounds": 3,
            "kernel_repeats": 3,
            "kernel_min_time": 0.05,
            "kernel_eager_frames": 2,
        }
        return cls(**{**base, **changes})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists, the model as a plain dict."""
        out = dataclasses.asdict(self)
        out["model"] = dict(self.model)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


SCENARIOS = ("default", "tcp-fleet", "udp-fleet", "closed-loop")
"""The fleet scenarios, in the order they run (docs/benchmarks.md, "Fleet scenarios")."""


@dataclasses.dataclass(frozen=True)
class FleetSettings:
    """Sizes of the fleet scenarios of `stream.bench.scenarios.run_fleet_bench`.

    - `scenarios`: which of `SCENARIOS` to run.
    - `sensors`, `rate_hz`: `tcp-fleet` and `udp-fleet`: sensors, each its own TCP
        connection (or UDP socket), each at `rate_hz` frames/s, phases spread evenly over
        the period.
    - `default_streams`, `default_rate_hz`, `default_connections`: `default`, the embedded
        default's shape (64 streams at 100 Hz), sent over a few TCP connections, every
        stream's frame of a tick at once.
    - `duration_s`: measured seconds per run; `warmup_s`: seconds of the same load
        before them, left out of every figure.
    - `runs`: runs per scenario (medians reported), interleaved: run 1 of every
        scenario, then run 2, …; `closed-loop` does `runs` throughput runs and `runs`
        latency runs per load.
    - `loads`: `closed-loop`'s open-loop runs, as fractions of its measured maximum.
    - `drain_s`: UDP: how long the client waits for more moments once all is sent.
    - `paced_s`, `paced_min_calls`: the paced step phase (after the daemon's): each
        bucket a scenario used, its compiled step called at the scenario's batch rate
        for `paced_s` seconds, at least `paced_min_calls` calls
        (`stream.bench.kernel.run_paced_steps`).
    """

    scenarios: tuple[str, ...] = SCENARIOS
    sensors: int = 1000
    rate_hz: float = 25.0
    default_streams: int = 64
    default_rate_hz: float = 100.0
    default_connections: int = 4
    duration_s: float = 10.0
    warmup_s: float = 1.0
    runs: int = 3
    loads: tuple[float, ...] = (0.1, 0.25, 0.5)
    drain_s: float = 0.5
    paced_s: float = 3.0
    paced_min_calls: int = 50

    def __post_init__(self) -> None:
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown or not self.scenarios:
            raise ValueError(f"scenarios = {list(self.scenarios)}: expected some of {SCENARIOS}")
        counts = ("sensors", "default_streams", "default_connections", "runs", "paced_min_calls")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.default_connections > self.default_streams:
            raise ValueError("default_connections must be <= default_streams")
        if min(self.rate_hz, self.default_rate_hz, self.duration_s, self.paced_s) <= 0:
            raise ValueError("rate_hz, default_rate_hz, duration_s, paced_s must be > 0")
        if self.warmup_s < 0 or self.drain_s < 0:
            raise ValueError("warmup_s, drain_s must be >= 0")
        if not self.loads or not all(0 < f <= 1 for f in self.loads):
            raise ValueError(f"loads = {self.loads}: need fractions in (0, 1]")

    @classmethod
    def quick(cls, **changes: Any) -> FleetSettings:
        """The short run: 3 s per run, no `closed-loop`, 1 s paced windows."""
        base: dict[str, Any] = {
            "duration_s": 3.0,
            "scenarios": SCENARIOS[:3],
            "paced_s": 1.0,
            "paced_min_calls": 20,
        }
        return cls(**{**base, **changes})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclasses.dataclass(frozen=True)
class NatsBenchSettings:
    """Sizes of `stream.bench.natsbench.run_nats_bench` beyond its `BenchSettings` (which
    give both paths their streams, `rounds` per max run, `warmup_rounds`, the half-load
    runs' `latency_s` and `latency_warmup_s`, the daemons' model and buckets, the cache
    and the timeouts).

    - `runs`: rounds of the phases (TCP max, NATS max, NATS at `load` × max, TCP at the
        same frames/s), interleaved; medians reported.
    - `load`: the open-loop load as a fraction of the NATS max (the median of the NATS
        max runs so far).
    - `window`: frames the NATS generator has published and JetStream not yet stored,
        at most.
    - `sample_s`: how often the daemon's ack lag is read from `/metrics` during a run.
    - `tcp_load`: also run the TCP path open loop at the NATS half load's frames/s.
    """

    runs: int = 3
    load: float = 0.5
    window: int = 2048
    sample_s: float = 0.5
    tcp_load: bool = True

    def __post_init__(self) -> None:
        if self.runs < 1 or self.window < 1:
            raise ValueError(f"runs = {self.runs}, window = {self.window}: both must be >= 1")
        if not 0 < self.load <= 1:
            raise ValueError(f"load = {self.load}: need a fraction in (0, 1]")
        if self.sample_s <= 0:
            raise ValueError(f"sample_s = {self.sample_s}: must be > 0")

    @classmethod
    def quick(cls, **changes: Any) -> NatsBenchSettings:
        """The short run: 2 runs."""
        return cls(**{"runs": 2, **changes})

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)
