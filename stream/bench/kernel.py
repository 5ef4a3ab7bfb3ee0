"""Kernel benchmark: the compiled slab step against eager execution, in one run.

For every bucket it measures, with `time.perf_counter`, each figure the median of
`repeats` timed runs:

- **compiled**: the AOT-compiled `SlabStep` for that bucket, inputs already on the device,
    called in a tight loop with the slab threaded through (donated), blocking once at the
    end of each run — the kernel ceiling the daemon can approach;
- **eager batch**: the same batched step (`gather → vmap(model) → scatter`) executed op by
    op under `jax.disable_jit()` — what a bucket that failed to compile costs;
- **eager frame**: one frame through `model(state, …)` under `jax.disable_jit()` — the
    research framework's per-frame call. It is slow, so only `eager_frames` frames per run.

`speedup` is compiled frames/s divided by eager per-frame frames/s.

`run_paced_steps` (`run_paced_step` for one point) measures the compiled step the other
way: called as the daemon calls it (host arrays in, the records copied back to the host
each call) at a given cadence, `batches_per_s`, with idle gaps between the calls, and
reports the process CPU per frame over that window. A step after an idle gap costs more
than one right after another (caches cold in every thread that runs it), so a lightly
loaded daemon's steps cost more than the tight-loop figure (`stream.bench.scenarios`).

```
python -m stream.bench.kernel [--quick] [--json FILE]
```

It uses only `processors`' public API (`SlabStep.put_batch`, `SlabStep.step_fn`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from processors import FLAG_VALID, EnactiveModel, ModelConfig, SlabStep, get_jit_info

from ..cli import bucket_list
from ..config import DEFAULT_BUCKETS

__all__ = [
    "BUCKETS",
    "format_table",
    "machine_info",
    "main",
    "run_kernel_bench",
    "run_paced_step",
    "run_paced_steps",
]

ALL_PRESENT = 0b1111
BUCKETS: tuple[int, ...] = DEFAULT_BUCKETS
"""The buckets measured by default: the daemon's default buckets (`stream.config`)."""


def _timed(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) for `n` back-to-back calls of
    `fn`, blocking on the last result only."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, time.process_time() - c0


def _seconds_per_call(fn: Callable[[], Any], repeats: int, min_time: float) -> tuple[float, float]:
    """(median seconds per call, median cores busy) over `repeats` runs, each run at
    least `min_time` long. Cores busy = process CPU time ÷ wall time: how much of the
    machine the call takes (XLA's CPU client runs a step on several threads)."""
    jax.block_until_ready(fn())  # warm-up: first-call costs are not the steady state
    n, (elapsed, cpu) = 1, _timed(fn, 1)
    while elapsed < min_time:
        n = max(2 * n, int(n * 1.2 * min_time / max(elapsed, 1e-9)))
        elapsed, cpu = _timed(fn, n)
    runs = [(elapsed, cpu)] + [_timed(fn, n) for _ in range(repeats - 1)]
    return (
        statistics.median(wall / n for wall, _ in runs),
        statistics.median(cpu / wall for wall, cpu in runs),
    )


def _batch(step: SlabStep, bucket: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(bucket, step.input_width)).astype(np.float32)
    meta = np.stack(
        [np.arange(bucket, dtype=np.int32), np.full(bucket, FLAG_VALID | ALL_PRESENT, np.int32)],
        axis=1,
    )
    return x, meta


def _eager_frame_seconds(model: EnactiveModel, repeats: int, frames: int) -> float:
    """Median seconds of one eager per-frame call of `model`."""
    cfg = model.config
    rng = np.random.default_rng(0)
    sensory, proprio, tactile, motor = (
        jnp.asarray(rng.normal(size=n).astype(np.float32))
        for n in (cfg.state_dim, cfg.proprio_dim, cfg.tactile_dim, cfg.motor_dim)
    )
    present = jnp.ones(4, bool)
    samples = []
    with jax.disable_jit():
        state, out = model(model.init_state(), sensory, proprio, tactile, motor, present)  # warm
        jax.block_until_ready(out)
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(frames):
                state, out = model(state, sensory, proprio, tactile, motor, present)
            jax.block_until_ready(out)
            samples.append((time.perf_counter() - t0) / frames)
    return statistics.median(samples)


def run_kernel_bench(
    config: ModelConfig | None = None,
    buckets: Sequence[int] = BUCKETS,
    *,
    repeats: int = 5,
    min_time: float = 0.2,
    eager_frames: int = 3,
) -> list[dict[str, Any]]:
    """Measure the compiled slab step, the eager batched step and the eager per-frame call.

    **Arguments:**

    - `config`: the model's `ModelConfig` (default: `ModelConfig()`, the original
        framework's sizes).
    - `buckets`: batch sizes to compile and measure.
    - `repeats`: timed runs per figure; each figure is their median.
    - `min_time`: the shortest a timed run of a batched step may be, in seconds (the
        number of calls per run is chosen to reach it).
    - `eager_frames`: frames per timed run of the eager per-frame call.

    **Returns:** one dict per bucket (ascending): `bucket`, `compile_s`,
    `compiled_step_us`, `compiled_frames_per_s`, `compiled_cores` (process CPU time ÷
    wall time while the compiled step runs), `compiled_core_us_per_frame` (CPU µs per
    frame, all threads), `eager_batch_step_us`,
    `eager_batch_frames_per_s`, `eager_frame_us`, `eager_frames_per_s`, `speedup`
    (compiled frames/s ÷ eager per-frame frames/s) — floats except `bucket`.
    """
    if repeats < 1 or eager_frames < 1 or min_time < 0:
        raise ValueError(
            f"repeats = {repeats}, eager_frames = {eager_frames}, min_time = {min_time}: "
            "need repeats >= 1, eager_frames >= 1, min_time >= 0"
        )
    config = ModelConfig() if config is None else config
    model = EnactiveModel(config, key=jax.random.PRNGKey(0))
    step = SlabStep(model, buckets=buckets, capacity=max(buckets))
    compile_seconds = step.compile()
    frame_s = _eager_frame_seconds(model, repeats, eager_frames)
    rows = []
    for bucket in step.buckets:
        x, meta = _batch(step, bucket, bucket)
        xs, ms = step.put_batch(x, meta)
        box = [step.init_slab()]

        def compiled(box: list[Any] = box, xs: Any = xs, ms: Any = ms, b: int = bucket) -> Any:
            box[0], records, eager = step(box[0], xs, ms)
            if eager:
                raise RuntimeError(f"bucket {b} ran eagerly: {step.eager_buckets.get(b)}")
            return records

        slab, step_fn = step.init_slab(), step.step_fn

        def eager_batch(slab: Any = slab, xs: Any = xs, ms: Any = ms, fn: Any = step_fn) -> Any:
            with jax.disable_jit():
                return fn(slab, xs, ms)

        step_s, cores = _seconds_per_call(compiled, repeats, min_time)
        eager_step_s, _ = _seconds_per_call(eager_batch, repeats, min_time)
        rows.append(
            {
                "bucket": bucket,
                "compile_s": compile_seconds[bucket],
                "compiled_step_us": step_s * 1e6,
                "compiled_frames_per_s": bucket / step_s,
                "compiled_cores": cores,
                "compiled_core_us_per_frame": step_s * cores * 1e6 / bucket,
                "eager_batch_step_us": eager_step_s * 1e6,
                "eager_batch_frames_per_s": bucket / eager_step_s,
                "eager_frame_us": frame_s * 1e6,
                "eager_frames_per_s": 1.0 / frame_s,
                "speedup": (bucket / step_s) * frame_s,
            }
        )
    return rows


def _paced_point(step: SlabStep, bucket: int, batches_per_s: float, calls: int) -> dict[str, Any]:
    """One paced window of `calls` calls of `step`'s bucket `bucket`, the i-th due at
    start + (i + 1) / `batches_per_s` (absolute due times: a late call is not made up by
    the ones after it, and a step slower than the interval runs back to back)."""
    x, meta = _batch(step, bucket, bucket)
    box = [step.init_slab()]

    def call() -> None:
        box[0], records, eager = step(box[0], x, meta)
        if eager:
            raise RuntimeError(f"bucket {bucket} ran eagerly: {step.eager_buckets.get(bucket)}")
        records.copy_to_host_async()  # as the daemon's executor, then its integrator
        np.asarray(records)

    call()  # first-call costs are not the steady state
    call()
    interval = 1.0 / batches_per_s
    start = time.perf_counter()
    cpu0, thread0 = time.process_time(), time.thread_time()
    for i in range(calls):
        wait = start + (i + 1) * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        call()
    wall = time.perf_counter() - start
    cpu, thread = time.process_time() - cpu0, time.thread_time() - thread0
    frames = calls * bucket
    return {
        "bucket": bucket,
        "batches_per_s": batches_per_s,
        "calls": calls,
        "wall_s": wall,
        "achieved_batches_per_s": calls / wall,
        "cpu_s": cpu,
        "cores": cpu / wall,
        "cpu_us_per_frame": 1e6 * cpu / frames,
        "caller_cpu_us_per_frame": 1e6 * thread / frames,
    }


def run_paced_steps(
    config: ModelConfig | None,
    points: Sequence[tuple[int, float]],
    *,
    duration_s: float = 3.0,
    min_calls: int = 50,
    capacity: int | None = None,
) -> list[dict[str, Any]]:
    """Measure the compiled step called at a cadence: for each `(bucket, batches_per_s)`
    of `points`, in order, one window of calls of that bucket's step, one every
    1 / `batches_per_s` s (sleeping until each is due), each call as the daemon makes
    it (host `x` and `meta` in, records copied to the host and waited for).

    **Arguments:**

    - `config`: the model's `ModelConfig` (default: `ModelConfig()`); its parameters
        from `jax.random.PRNGKey(0)`, as `run_kernel_bench`'s.
    - `points`: `(bucket, batches_per_s)` pairs; buckets compiled once for all of them.
    - `duration_s`: the window of each point: max(`min_calls`, round(`batches_per_s` ·
        `duration_s`)) calls.
    - `capacity`: the slab's streams (default: the largest bucket of `points`; pass
        `run_kernel_bench`'s, the largest of its buckets, to measure the same executables).

    **Returns:** one dict per point, in order: `bucket`, `batches_per_s` (asked),
    `calls`, `wall_s`, `achieved_batches_per_s`, `cpu_s` (process CPU time over the
    window, every thread), `cores` (÷ `wall_s`), `cpu_us_per_frame` (`cpu_s` ÷ (`calls` ·
    `bucket`), µs; padding included, as `compiled_core_us_per_frame`),
    `caller_cpu_us_per_frame` (the calling thread's alone).
    """
    if duration_s <= 0 or min_calls < 1 or any(b < 1 or r <= 0 for b, r in points):
        raise ValueError(
            f"duration_s = {duration_s}, min_calls = {min_calls}, points = {list(points)}: "
            "need duration_s > 0, min_calls >= 1, buckets >= 1 and rates > 0"
        )
    if not points:
        return []
    config = ModelConfig() if config is None else config
    model = EnactiveModel(config, key=jax.random.PRNGKey(0))
    buckets = sorted({b for b, _ in points})
    step = SlabStep(model, buckets=buckets, capacity=capacity or max(buckets))
    step.compile()
    return [_paced_point(step, b, r, max(min_calls, round(r * duration_s))) for b, r in points]


def run_paced_step(
    config: ModelConfig | None, bucket: int, batches_per_s: float, duration_s: float = 3.0
) -> dict[str, Any]:
    """`run_paced_steps` for one `(bucket, batches_per_s)`: its row."""
    return run_paced_steps(config, [(bucket, batches_per_s)], duration_s=duration_s)[0]


def machine_info() -> dict[str, Any]:
    """Where the figures were measured: CPU count and model, platform, JAX and devices."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    info = get_jit_info()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": info["jax_version"],
        "jaxlib": info["jaxlib_version"],
        "backend": info["backend"],
        "devices": info["devices"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| bucket | compile s | compiled µs/step | compiled frames/s | cores busy "
        "| core-µs/frame | eager batch µs/step | eager batch frames/s | eager µs/frame "
        "| eager frames/s | speedup |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bucket']} | {r['compile_s']:.2f} | {r['compiled_step_us']:,.1f} "
            f"| {r['compiled_frames_per_s']:,.0f} | {r['compiled_cores']:.2f} "
            f"| {r['compiled_core_us_per_frame']:.2f} "
            f"| {r['eager_batch_step_us']:,.0f} | {r['eager_batch_frames_per_s']:,.0f} "
            f"| {r['eager_frame_us']:,.0f} | {r['eager_frames_per_s']:,.1f} "
            f"| {r['speedup']:,.0f}× |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stream.bench.kernel [--quick] [--json FILE]`: run and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m stream.bench.kernel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="buckets 1, 8, 64; 3 repeats of 0.05 s; 2 eager frames"
    )
    parser.add_argument("--json", metavar="FILE", help="also write machine + results as JSON")
    parser.add_argument(
        "--buckets",
        metavar="B1,B2,…",
        type=bucket_list,
        help=f"batch sizes to measure (default: {','.join(map(str, BUCKETS))}; --quick: 1,8,64)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        buckets: tuple[int, ...] = (1, 8, 64)
        kwargs: dict[str, Any] = {"repeats": 3, "min_time": 0.05, "eager_frames": 2}
    else:
        buckets = BUCKETS
        kwargs = {"repeats": 5, "min_time": 0.2, "eager_frames": 3}
    if args.buckets:
        buckets = args.buckets
    config = ModelConfig()
    machine = machine_info()
    print(
        f"machine: {machine['nproc']} × {machine['cpu']}, {machine['platform']}, "
        f"jax {machine['jax']} ({machine['backend']}: {', '.join(machine['devices'])})"
    )
    print(f"model: {config}")
    rows = run_kernel_bench(config, buckets, **kwargs)
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "config": dataclasses.asdict(config),
                    "settings": {"buckets": list(buckets), **kwargs},
                    "results": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
