"""`python -m stream.bench.cluster`: what scaling out over NATS JetStream costs, measured
on one machine (docs/benchmarks.md, "Scaled out over NATS JetStream").

```
balance   frames per instance, 3 instances over 12 partitions, for 1,000 and 100,000
          stream ids (`partition_of`: where the server puts them; no server needed)
cluster   3 `nats-server -js` nodes on loopback; every stream R3
cost      for n = 1, 2, 3 instances (streams of their own per n, so each starts empty):
          S streams × R rounds published as fast as JetStream stores them (a window of
          unconfirmed publications), every moment awaited; each instance's CPU seconds
          per million frames it processed; the publisher's own CPU (this process)
failover  3 instances, frames published at a steady rate; SIGKILL instance 1 and start
          its replacement at once on an empty state directory (what an orchestrator does,
          less its scheduling): seconds from the kill to the replacement's readiness, and
          to the first moment of a frame of one of its partitions published after the kill
```

One machine cannot show linear scaling in wall-clock throughput (every instance and node
shares its cores); CPU per frame per instance flat as instances are added shows that
scaling out adds no work per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.config import load_config
from stream.partitions import partition_of
from stream.protocol import MomentReader, encode_frame

from .broker import NatsServerProcess, nats_cluster, nats_missing
from .procfs import cpu_seconds
from .runner import daemon_config
from .services import BenchError, ServiceProcess
from .settings import BenchSettings

__all__ = [
    "ClusterBenchSettings",
    "balance",
    "format_cluster_table",
    "main",
    "run_cluster_bench",
]

PARTITIONS = 12
PREFIX = "c-"
WINDOW = 1024
"""Publications awaiting JetStream's confirmation at most."""


def balance(ids: int, instances: int = 3, partitions: int = PARTITIONS) -> dict[str, Any]:
    """How `ids` stream ids (`c-000000`, …) spread: streams per partition and per instance."""
    per_partition = np.bincount(
        [partition_of(f"{PREFIX}{i:06d}", partitions) for i in range(ids)], minlength=partitions
    )
    per_instance = [int(per_partition[i::instances].sum()) for i in range(instances)]
    even = ids / instances
    return {
        "ids": ids,
        "per_partition": per_partition.tolist(),
        "per_instance": per_instance,
        "max_over_even": max(per_instance) / even,
        "min_over_even": min(per_instance) / even,
    }


def _frames(streams: int, rounds: int, first: int = 1) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(1)
    sensory, proprio, tactile, motor = (
        rng.standard_normal(d).astype(np.float32) for d in (32, 64, 32, 32)
    )
    ids = [f"{PREFIX}{s:06d}" for s in range(streams)]
    return [
        (
            f"sensors.{sid}",
            encode_frame(
                sid, k, k * 0.01, sensory=sensory, proprio=proprio, tactile=tactile, motor=motor
            ),
        )
        for k in range(first, first + rounds)
        for sid in ids
    ]


class _Deployment:
    """n instances of one deployment (names of its own: stream, consumers, buckets)."""

    def __init__(self, work: Path, url: str, n: int, cache_dir: str, tag: str) -> None:
        self.work, self.url, self.n, self.cache_dir, self.tag = work, url, n, cache_dir, tag
        self.daemons: list[ServiceProcess] = []

    def daemon(self, i: int, name: str) -> ServiceProcess:
        home = self.work / name
        home.mkdir(parents=True, exist_ok=True)
        config = home / "daemon.toml"
        config.write_text(
            daemon_config(BenchSettings(), home / "state", self.cache_dir)
            + f'[nats]\nurl = "{self.url}"\nreplicas = 3\nstream = "SENSORS_{self.tag}"\n'
            f'durable = "enactive-{self.tag}"\nmoments_stream = "MOMENTS_{self.tag}"\n'
            f"[cluster]\ninstances = {self.n}\ninstance = {i}\npartitions = {PARTITIONS}\n"
            f'state_bucket = "STATE_{self.tag}"\n'
        )
        ready = home / "ready.json"
        argv = [sys.executable, "-m", "stream.cli", "run", "--config", str(config)]
        return ServiceProcess(name, [*argv, "--ready-file", str(ready)], ready, home)

    def start(self) -> None:
        self.daemons = [self.daemon(i, f"{self.tag}-i{i}") for i in range(self.n)]
        for d in self.daemons:
            d.start()

    def stop(self) -> None:
        for d in self.daemons:
            d.kill()

    async def remove(self, js: Any) -> None:
        """Delete its streams and buckets (the next deployment's subjects are the same)."""
        tag = self.tag
        for name in (f"SENSORS_{tag}", f"MOMENTS_{tag}", f"KV_STATE_{tag}", f"OBJ_STATE_{tag}"):
            try:
                await js.delete_stream(name)
            except Exception as e:  # (absent)
                print(f"  ({name}: {e})", file=sys.stderr)


async def _publish(js: Any, messages: list[tuple[str, bytes]]) -> None:
    window: collections.deque[Any] = collections.deque()
    for subject, payload in messages:
        window.append(await js.publish_async(subject, payload))
        if len(window) >= WINDOW:
            await window.popleft()
    await asyncio.gather(*window)


async def _paced(
    js: Any, streams: int, rate: float, rounds: int, published: dict[int, float] | None = None
) -> None:
    """Publish `rounds` rounds of one frame per stream, a round every `streams / rate`
    seconds (absolute due times), each round's publication time in `published`."""
    period, start = streams / rate, time.monotonic()
    for k in range(1, rounds + 1):
        await asyncio.sleep(max(0.0, start + (k - 1) * period - time.monotonic()))
        if published is not None:
            published[k] = time.monotonic()
        await _publish(js, _frames(streams, 1, k))


async def _wait_moments(js: Any, stream: str, n: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while (await js.stream_info(stream)).state.messages < n:
        if time.monotonic() > deadline:
            raise BenchError(f"not every moment in {stream} within {within_s} s")
        await asyncio.sleep(0.05)


async def _cost(url: str, work: Path, cache: str, n: int, run: int, streams: int, rate: float,
                rounds: int, log: Any) -> dict[str, Any]:  # fmt: skip
    import nats

    deployment = _Deployment(work, url, n, cache, f"N{n}R{run}")
    await asyncio.to_thread(deployment.start)
    nc = await nats.connect(url.split(",")[0])
    try:
        js = nc.jetstream()
        total = n * streams  # the same load per instance whatever n
        before = [cpu_seconds(d.pid) for d in deployment.daemons]
        me0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        await _paced(js, total, n * rate, rounds)
        await _wait_moments(js, f"MOMENTS_{deployment.tag}", total * rounds, 600)
        wall, me = time.perf_counter() - t0, cpu_seconds(os.getpid()) - me0
        after = [cpu_seconds(d.pid) for d in deployment.daemons]
        frames = [
            await asyncio.to_thread(d.metric, "enactive_frames_processed_total")
            for d in deployment.daemons
        ]
    finally:
        await asyncio.to_thread(deployment.stop)
        await deployment.remove(nc.jetstream())
        await nc.close()
    per_instance = [(b - a) / f * 1e6 for a, b, f in zip(before, after, frames, strict=True) if f]
    out = {
        "instances": n,
        "streams": total,
        "offered_frames_per_s": n * rate,
        "frames": total * rounds,
        "frames_per_instance": frames,
        "cpu_s_per_million_frames": per_instance,
        "median_cpu_s_per_million_frames": statistics.median(per_instance),
        "frames_per_s": total * rounds / wall,
        "publisher_cpu_s": me,
    }
    log(
        f"  cost n={n} run {run}: {out['frames_per_s']:,.0f} frames/s, CPU s per million frames "
        f"per instance {', '.join(f'{x:.1f}' for x in per_instance)}; publisher {me:.1f} s"
    )
    return out


async def _failover(url: str, work: Path, cache: str, streams: int, rate: float, log: Any
                    ) -> dict[str, Any]:  # fmt: skip
    import nats

    deployment = _Deployment(work, url, 3, cache, "F")
    await asyncio.to_thread(deployment.start)
    owned = {f"{PREFIX}{s:06d}" for s in range(streams)
             if partition_of(f"{PREFIX}{s:06d}", PARTITIONS) % 3 == 1}  # fmt: skip
    nc = await nats.connect(url.split(",")[0])
    published: dict[int, float] = {}  # round -> when it was published
    seen: list[tuple[float, str, int]] = []
    reader = MomentReader()

    async def moment(msg: Any) -> None:
        for m in reader.feed(msg.data):
            if m.stream_id in owned:
                seen.append((time.monotonic(), m.stream_id, m.seq))

    await nc.subscribe("moments.>", cb=moment)
    js = nc.jetstream()
    publisher = asyncio.create_task(_paced(js, streams, rate, 10**6, published))
    try:
        await asyncio.sleep(5.0)  # steady flow, checkpoints written
        victim = deployment.daemons[1]
        killed = time.monotonic()
        await asyncio.to_thread(victim.kill)  # SIGKILL
        replacement = deployment.daemon(1, "F-i1-replacement")
        deployment.daemons[1] = replacement
        ready_s = await asyncio.to_thread(replacement.start)
        ready_at = time.monotonic()
        after_kill = {k for k, t in published.items() if t > killed}
        deadline = time.monotonic() + 60
        first = None
        while first is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            first = next((t for t, _, seq in seen if seq in after_kill), None)
        if first is None:
            raise BenchError("no moment of instance 1's partitions within 60 s of its replacement")
    finally:
        publisher.cancel()
        await asyncio.to_thread(deployment.stop)
        await deployment.remove(js)
        await nc.close()
    out = {
        "streams": streams,
        "rate": rate,
        "kill_to_ready_s": ready_at - killed,
        "replacement_start_to_ready_s": ready_s,
        "kill_to_first_moment_s": first - killed,
    }
    log(
        f"  failover: ready {out['kill_to_ready_s']:.2f} s after the SIGKILL, first moment of "
        f"its partitions {out['kill_to_first_moment_s']:.2f} s after it"
    )
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterBenchSettings:
    """- `streams`, `rate`: streams and frames/s per instance (the same load per instance
        whatever the instance count); the failover run has 3 × both.
    - `rounds`: frames per stream of each cost run; `runs`: cost runs per instance count.
    - `cache_dir`: the JAX compilation cache ("" → the user's, from `load_config()`)."""

    streams: int = 333
    rate: float = 1000.0
    rounds: int = 30
    runs: int = 3
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if min(self.streams, self.rounds, self.runs) < 1 or not self.rate > 0:
            raise ValueError("streams, rounds and runs must be >= 1, rate > 0")

    @classmethod
    def of(cls, *, quick: bool = False, **given: Any) -> ClusterBenchSettings:
        """The defaults (`--quick`: one run of 10 rounds), with what is given (not None)."""
        base = {"runs": 1, "rounds": 10} if quick else {}
        return cls(**{**base, **{k: v for k, v in given.items() if v is not None}})


async def run_cluster_bench(settings: ClusterBenchSettings, log: Any) -> dict[str, Any]:
    """Balance; cost per instance for 1, 2 and 3 instances (interleaved, `runs` each);
    failover. **Raises:** `BenchError` (one line, then the failed service's output)."""
    missing = nats_missing()
    if missing:
        raise BenchError(missing)
    s = settings
    cache = s.cache_dir or load_config().device.compilation_cache_dir
    result: dict[str, Any] = {
        "schema": 1,
        "kind": "cluster",
        "settings": dataclasses.asdict(s),
        "partitions": PARTITIONS,
        "balance": [balance(1_000), balance(100_000)],
    }
    for b in result["balance"]:
        log(f"balance {b['ids']:,} ids: per instance {b['per_instance']} "
            f"(max {b['max_over_even']:.3f} × even)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="enactive-cluster-bench-") as tmp:
        work = Path(tmp)
        nodes: list[NatsServerProcess] = await asyncio.to_thread(nats_cluster, work / "nats", work)
        url = ",".join(node.url for node in nodes)
        try:
            cost = []
            for run in range(1, s.runs + 1):  # (n = 1, 2, 3 interleaved)
                for n in (1, 2, 3):
                    cost.append(
                        await _cost(url, work, cache, n, run, s.streams, s.rate, s.rounds, log)
                    )
            result["cost"] = cost
            result["failover"] = await _failover(url, work, cache, 3 * s.streams, 3 * s.rate, log)
        finally:
            for node in nodes:
                node.stop()
    result["cost_medians"] = {
        str(n): statistics.median(
            x for c in result["cost"] if c["instances"] == n
            for x in c["cpu_s_per_million_frames"]
        )
        for n in (1, 2, 3)
    }  # fmt: skip
    return result


def format_cluster_table(result: dict[str, Any]) -> str:
    """The figures as Markdown tables."""
    medians = result["cost_medians"]
    lines = [
        "| instances | CPU s per million frames, per instance (median) | ÷ 1 instance |",
        "|---:|---:|---:|",
        *(f"| {n} | {v:.1f} | {v / medians['1']:.2f} |" for n, v in medians.items()),
        "",
        "| stream ids | streams per instance | max ÷ even | min ÷ even |",
        "|---:|---|---:|---:|",
        *(
            f"| {b['ids']:,} | {', '.join(f'{x:,}' for x in b['per_instance'])} "
            f"| {b['max_over_even']:.3f} | {b['min_over_even']:.3f} |"
            for b in result["balance"]
        ),
        "",
        "| failover | seconds |",
        "|---|---:|",
        f"| SIGKILL → replacement ready | {result['failover']['kill_to_ready_s']:.2f} |",
        "| SIGKILL → first moment of its partitions "
        f"| {result['failover']['kill_to_first_moment_s']:.2f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m stream.bench.cluster` (the same as `enactive-stream bench --cluster`)."""
    parser = argparse.ArgumentParser(prog="python -m stream.bench.cluster", description=__doc__)
    parser.add_argument("--streams", type=int, help="streams per instance (333)")
    parser.add_argument("--rate", type=float, help="frames/s per instance (1000)")
    parser.add_argument("--rounds", type=int, help="frames per stream of a cost run (30)")
    parser.add_argument("--runs", type=int, help="cost runs per instance count (3)")
    parser.add_argument("--quick", action="store_true", help="1 run of 10 rounds")
    parser.add_argument("--cache-dir")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    settings = ClusterBenchSettings.of(
        quick=args.quick,
        streams=args.streams,
        rate=args.rate,
        rounds=args.rounds,
        runs=args.runs,
        cache_dir=args.cache_dir,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = asyncio.run(run_cluster_bench(settings, log))
    except BenchError as e:
        print(f"error: bench: {e}", file=sys.stderr)
        return 1
    print(format_cluster_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
