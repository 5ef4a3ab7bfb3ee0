"""The daemon: one anyio task group of bounded stages.

```
 sources ──► ingest ──► admit+batcher ──► executor ──► stepped ──► integrator ──► sinks
 tcp  (block)  stream     (one frame per     (AOT bucket   stream    (moments,     offer():
 udp  (drop_oldest)  [queue]  stream, deadline,  step, enqueued [2]      latency)      subscribers,
 synthetic (block)           ≤ limit frames)    not awaited)                           jsonl, stdout
```

Every arrow is a bounded memory object stream (the ingest's bounded in frames by
`Ingest`, the batcher's own buffer bounded by `limit`), so a full stage slows the one
before it; sources that cannot be slowed drop and count. On the TCP path a read's run
of like frames travels as one `FrameRun` and batches leave the batcher as columns
(`Batch`): no object per frame.
`/readyz` turns 200 once every bucket is compiled and every listener is bound.
SIGTERM/SIGINT: stop the sources, drain what was received, checkpoint, exit.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import jax
import numpy as np
from anyio.abc import TaskStatus

import processors
from processors import CompilationCounter, EnactiveModel, SlabStep

from .adaptive import AdaptiveBatching
from .affinity import cpu_split, pinned
from .batcher import Batcher
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError, parse_address
from .executor import Executor, Stepped
from .http import serve_http
from .ingest import Ingest, Item
from .integrator import integrate
from .metrics import Metrics
from .protocol import Frame, FrameRejected, FrameRun, MomentSizes
from .sinks import EncodingCache, JsonlSink, Sink, StdoutSink, SubscriberServer
from .sources import serve_tcp, serve_udp
from .status import StatusLine
from .streams import StreamTable
from .synthetic import run_synthetic

__all__ = ["Daemon", "build_model", "xla_cpu_threads"]


def xla_cpu_threads(config: Config, environ: dict[str, str] | None = None) -> int:
    """Size XLA's CPU thread pools (`[device] cpu_threads`); returns the size asked for.

    XLA's CPU client sizes its compute and dispatch pools from `PJRT_NPROC` when it is
    created, and by default gives them a thread per core. The daemon's event loop needs a
    core of its own: on the 2-core reference machine a second compute thread bought at
    most ~18 % more step throughput (at 256 rows; at 32–64 rows it lost some) for 30–75 %
    more CPU per frame, taken from the host pipeline; end to end, one thread did 30 %
    more (docs/benchmarks.md). So `cpu_threads = 0` (auto) keeps a `PJRT_NPROC` already set in
    the environment and otherwise leaves one core to the host (`cores - 1`); a positive
    value is used as given. Never fewer than `device.count`: XLA runs a sharded step's
    devices on that pool at once. Only a CPU client created after this call is affected
    (the daemon calls it before its first use of JAX); accelerator backends ignore it.
    """
    env = os.environ if environ is None else environ
    threads = config.device.cpu_threads
    if threads == 0:
        given = env.get("PJRT_NPROC", "").strip()
        threads = int(given) if given.isdigit() else len(os.sched_getaffinity(0)) - 1
    threads = max(threads, config.device.count, 1)
    if environ is None and _xla_backend_started() and env.get("PJRT_NPROC") != str(threads):
        log.warning(
            "device.cpu_threads = %d not applied: this process created its XLA client "
            "before the daemon (set PJRT_NPROC before the first use of JAX)",
            threads,
        )
    env["PJRT_NPROC"] = str(threads)
    return threads


def _xla_backend_started() -> bool:
    from jax._src import xla_bridge  # no public way to ask without starting it

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def build_model(config: Config) -> EnactiveModel:
    """The model the configuration describes: initialised from `model.seed`, then loaded
    from `model.params` when set."""
    m = config.model
    model_config = processors.ModelConfig(
        state_dim=m.state_dim,
        proprio_dim=m.proprio_dim,
        tactile_dim=m.tactile_dim,
        motor_dim=m.motor_dim,
        retention_depth=m.retention_depth,
        protention_horizon=m.protention_horizon,
        som_grid=(m.som_grid[0], m.som_grid[1]),
        hidden_dim=m.hidden_dim,
        attention_heads=m.attention_heads,
    )
    model = EnactiveModel(model_config, key=jax.random.PRNGKey(m.seed))
    if m.params:
        model = processors.load_params(model, m.params)
    return model


SOURCE_GRACE_S = 2.0
"""Seconds the sources get to finish the data in hand at shutdown."""


log = logging.getLogger(__name__)


class Daemon:
    """The whole service for one `Config`.

    **Arguments:**

    - `config`: the validated configuration.
    - `metrics`: where to count (default: a fresh `Metrics` on its own registry).
    - `status`: called with one line of live status every `log.status_interval_s`, and
        with progress lines while buckets compile (default: the `stream.daemon` logger
        at INFO).
    - `ready_file`: when set, the bound ports are written there (JSON, atomically) once
        the daemon is ready — so a supervisor or a test can use port 0.
    """

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        status: Callable[[str], None] | None = None,
        ready_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config
        # Before anything below creates the XLA client (jax.default_backend() does).
        self.xla_cpu_threads = xla_cpu_threads(config)
        # XLA's threads keep the affinity of the thread that creates the client: the compute
        # CPUs (`[device] pin_threads`). A client that already exists (JAX used before the
        # daemon) keeps its own, and then the loop is not pinned either: alone, that would
        # only take the other cores from it.
        split = cpu_split() if config.device.pin_threads and not _xla_backend_started() else None
        with pinned(split.compute if split else None) as applied:
            backend = jax.default_backend()
        self.cpus = split if applied else None
        self.metrics = metrics or Metrics(buckets=config.batching.buckets, backend=backend)
        self._status = status or log.info
        self._ready_file = ready_file
        self.ready = False
        self.ports: dict[str, int] = {}
        self._stop = anyio.Event()
        self.counter: CompilationCounter | None = None
        self._queue_waits: list[int] = []  # ns from receipt to admission, flushed per batch

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    # -- start-up ---------------------------------------------------------------------

    def _prepare(self) -> tuple[SlabStep, StreamTable, Any]:
        """Build, compile and restore (runs in a worker thread: it takes seconds)."""
        cfg = self.config
        processors.enable_compilation_cache(cfg.device.compilation_cache_dir)
        devices = jax.local_devices()
        if cfg.device.count > len(devices):
            raise ConfigError(
                f"device.count = {cfg.device.count}: only {len(devices)} "
                f"local {jax.default_backend()} device(s) present"
            )
        model = build_model(cfg)
        step = SlabStep(
            model,
            buckets=cfg.batching.buckets,
            capacity=cfg.state.max_streams,
            devices=devices[: cfg.device.count],
            on_fallback=self._on_fallback,
        )
        total = len(step.buckets)

        def progress(bucket: int, seconds: float) -> None:
            self.metrics.set_compile_seconds(bucket, seconds)
            done = sum(1 for b in step.buckets if b in step.compile_seconds)
            self._status(f"compiled bucket {bucket:>5} ({done}/{total}) in {seconds:.2f} s")

        backend = jax.default_backend()
        threads = f", {self.xla_cpu_threads} XLA CPU threads" if backend == "cpu" else ""
        if self.cpus:
            compute = ",".join(map(str, sorted(self.cpus.compute)))
            threads += f"; event loop on CPU {self.cpus.loop}, XLA on CPUs {compute}"
        self._status(
            f"compiling {total} buckets {step.buckets} on "
            f"{cfg.device.count} {backend} device(s){threads}…"
        )
        step.compile(progress)
        table = StreamTable(step.capacity, cfg.state.max_known_streams)
        fresh = step.host_slab()
        host = load_checkpoint(cfg.state.dir, fresh, table, self._fingerprint(step))
        slab = step.put_slab(fresh if host is None else host)
        if host is not None:
            self._status(
                f"restored {len(table.processed_seq)} streams from "
                f"{Path(cfg.state.dir) / 'checkpoint.npz'}"
            )
        return step, table, slab

    def _fingerprint(self, step: SlabStep) -> dict[str, Any]:
        m = self.config.model
        return {
            "dims": [m.state_dim, m.proprio_dim, m.tactile_dim, m.motor_dim],
            "model": [
                m.retention_depth,
                m.protention_horizon,
                m.hidden_dim,
                list(m.som_grid),
                m.attention_heads,
            ],
            "capacity": step.capacity,
        }

    def _on_fallback(self, name: str, reason: str) -> None:
        self.metrics.jit_fallback("slab_step", reason)
        self._status(f"JIT fallback: {name} runs eagerly ({reason})")

    # -- the service --------------------------------------------------------------------

    async def run(
        self, *, task_status: TaskStatus[dict[str, int]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until `request_stop()` or SIGTERM/SIGINT; `task_status.started(ports)`
        once ready."""
        cfg, metrics = self.config, self.metrics
        counter = self.counter = CompilationCounter(metrics.jit_compiled)
        try:
            async with anyio.create_task_group() as outer:
                if cfg.metrics.listen:
                    self.ports["metrics"] = await outer.start(
                        serve_http,
                        parse_address(cfg.metrics.listen),
                        metrics,
                        lambda: self.ready,
                    )
                outer.start_soon(self._signals)
                step, table, slab = await anyio.to_thread.run_sync(self._prepare)
                with pinned({self.cpus.loop} if self.cpus else None):
                    await self._serve(step, table, slab, counter, task_status)
                outer.cancel_scope.cancel()
        finally:
            counter.close()
            self.ready = False
            metrics.set_ready(False)

    async def _signals(self) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT)
        except (NotImplementedError, ValueError, RuntimeError):  # not the main thread
            return
        with receiver as signals:
            async for signum in signals:
                self._status(f"{signal.Signals(signum).name}: draining and checkpointing…")
                self.request_stop()
                return

    async def _serve(
        self,
        step: SlabStep,
        table: StreamTable,
        slab: Any,
        counter: CompilationCounter,
        task_status: TaskStatus[dict[str, int]],
    ) -> None:
        cfg, metrics = self.config, self.metrics
        sizes = MomentSizes(
            step.model.config.moment_dim or cfg.model.state_dim,
            cfg.model.state_dim,
            cfg.model.proprio_dim,
            cfg.model.motor_dim,
        )
        # Unbounded here: `Ingest` bounds it in frames (a run is one item of many frames).
        ingest_send, ingest_receive = anyio.create_memory_object_stream[Item](math.inf)
        stepped_send, stepped_receive = anyio.create_memory_object_stream[Stepped](2)
        ingest = Ingest(
            ingest_send,
            limit=cfg.ingest.queue,
            dims=cfg.dims,
            max_frame_bytes=cfg.ingest.max_frame_bytes,
            on_received=metrics.received,
            on_rejected=metrics.reject,
            on_dropped=metrics.drop,
        )
        batcher = Batcher(
            max(step.buckets),
            cfg.batching.max_wait_ms / 1000.0,
            idle=lambda: executor.pending == 0,  # `executor` is bound below, before any call
        )
        adaptive = (
            AdaptiveBatching(
                batcher,
                step.buckets,
                cfg.batching.slo_p99_ms / 1000.0,
                max_wait_s=cfg.batching.max_wait_ms / 1000.0,
            )
            if cfg.batching.adaptive
            else None
        )
        metrics.batch_max_wait.set(batcher.max_wait_ns / 1e9)
        metrics.batch_max_size.set(batcher.max_batch)
        directory = cfg.state.dir
        fingerprint = self._fingerprint(step)

        def checkpoint(rows: Any, t: StreamTable) -> None:
            save_checkpoint(directory, rows, t, fingerprint)

        status = StatusLine(metrics, table, counter)
        observe = self._observer(table, status, adaptive)
        executor = Executor(
            step,
            table,
            slab,
            checkpoint=checkpoint,
            checkpoint_interval_s=cfg.state.checkpoint_interval_s,
            observe=observe,
        )
        executor.on_idle = batcher.wake

        def admit(frame: Frame, now_ns: int) -> bool:
            try:
                table.admit(frame.stream_id, frame.seq)
            except FrameRejected as r:
                metrics.reject(frame.source, r.reason)
                return False
            self._queue_waits.append(now_ns - frame.received_ns)
            return True

        def admit_run(run: FrameRun, now_ns: int) -> bool:
            if not table.admit_run(run.stream_ids, run.seq):
                return False  # frame by frame, through `admit`
            self._queue_waits += [now_ns - run.received_ns] * len(run)
            return True

        metrics.watch_queue("ingest", lambda: ingest.queued)
        metrics.watch_queue("batcher", lambda: len(batcher))
        # Batches dispatched to the device whose records the integrator has not taken yet.
        metrics.watch_queue("device", lambda: stepped_send.statistics().current_buffer_used)

        async with anyio.create_task_group() as sink_group:
            sinks = await self._start_sinks(sink_group)
            async with anyio.create_task_group() as pipeline:
                pipeline.start_soon(batcher.collect, ingest_receive, admit, admit_run, ingest.taken)
                pipeline.start_soon(executor.run, batcher, stepped_send)
                pipeline.start_soon(
                    lambda: integrate(
                        stepped_receive, sinks, sizes, observe=observe, on_ready=executor.finished
                    )
                )
                async with ingest_send, anyio.create_task_group() as sources:
                    await self._start_sources(sources, ingest)
                    # Everything built so far (JAX, the model, the executables) lives as long
                    # as the process: keep it out of the collector's full passes, which
                    # would otherwise scan it in the hot path.
                    gc.collect()
                    gc.freeze()
                    counter.seal()
                    self.ready = True
                    metrics.set_ready(True)
                    self._write_ready_file()
                    task_status.started(dict(self.ports))
                    if cfg.log.status_interval_s > 0:
                        sink_group.start_soon(status.run, cfg.log.status_interval_s, self._status)
                    await self._stop.wait()
                    self.ready = False
                    metrics.set_ready(False)
                    # Sources finish the data in hand and return; a source still blocked
                    # after the grace period is cancelled.
                    ingest.stop()
                    sources.cancel_scope.deadline = anyio.current_time() + SOURCE_GRACE_S
            sink_group.cancel_scope.cancel()
        processed = metrics.registry.get_sample_value("enactive_frames_processed_total") or 0
        self._status(f"stopped: {int(processed)} frames processed, checkpoint in {directory}")

    async def _start_sinks(self, group: anyio.abc.TaskGroup) -> list[Sink]:
        cfg, metrics = self.config, self.metrics
        sinks: list[Any] = []
        counters: dict[str, Any] = {
            "on_emitted": metrics.emitted,
            "on_dropped": metrics.sink_drop,
            "cache": EncodingCache(),
        }
        if cfg.output.tcp:
            server = SubscriberServer(
                parse_address(cfg.output.tcp),
                buffer=cfg.output.subscriber_buffer,
                on_subscribers=metrics.subscribers.set,
                **counters,
            )
            self.ports["output"] = await group.start(server.run)
            sinks.append(server)
        if cfg.output.jsonl:
            sinks.append(
                JsonlSink(cfg.output.jsonl, buffer=cfg.output.subscriber_buffer, **counters)
            )
        if cfg.output.stdout:
            sinks.append(StdoutSink(buffer=cfg.output.subscriber_buffer, **counters))
        for sink in sinks[1 if cfg.output.tcp else 0 :]:
            await group.start(sink.run)
        return sinks

    async def _start_sources(self, group: anyio.abc.TaskGroup, ingest: Ingest) -> None:
        cfg = self.config
        if cfg.ingest.tcp:
            self.ports["tcp"] = await group.start(serve_tcp, ingest, parse_address(cfg.ingest.tcp))
        if cfg.ingest.udp:
            host, port = parse_address(cfg.ingest.udp)
            if port == 0 and cfg.ingest.tcp and parse_address(cfg.ingest.tcp)[0] == host:
                port = self.ports["tcp"]  # "same port number" also for ephemeral ports
            self.ports["udp"] = await group.start(
                lambda task_status: serve_udp(
                    ingest, (host, port), buffer=cfg.ingest.udp_buffer, task_status=task_status
                )
            )
        if cfg.synthetic.streams:
            await group.start(
                lambda task_status: run_synthetic(
                    ingest,
                    streams=cfg.synthetic.streams,
                    rate_hz=cfg.synthetic.rate_hz,
                    seed=cfg.model.seed,
                    task_status=task_status,
                )
            )

    def _observer(
        self, table: StreamTable, status: StatusLine, adaptive: AdaptiveBatching | None
    ) -> Callable[[str, Any], None]:
        metrics = self.metrics

        def observe(event: str, value: Any) -> None:
            if event == "batch":
                metrics.batch(*value)
                metrics.active_streams.set(table.active)
            elif event in ("device", "integrate", "emit"):
                metrics.observe_stage(event, value)
            elif event == "batch_done":
                if adaptive is not None:
                    adaptive.observe_batch(*value)
            elif event == "batch_wait":
                metrics.observe_stage("batch_wait", value)
                metrics.observe_stage("queue", np.asarray(self._queue_waits) / 1e9)
                self._queue_waits.clear()
            elif event == "end_to_end":
                metrics.observe_end_to_end(value)
                status.latencies(value)
                if adaptive is not None:
                    adaptive.observe(value)
                    metrics.batch_max_wait.set(adaptive.max_wait_s)
                    metrics.batch_max_size.set(adaptive.max_batch)
            elif event == "processed":
                metrics.processed(value)
            elif event == "evicted":
                metrics.evicted(value)
            elif event == "restored":
                metrics.restored(value)
            elif event == "checkpoint":
                metrics.checkpointed(value)
            elif event == "checkpoint_error":
                metrics.checkpoint_errors.inc()
                self._status(f"checkpoint failed, will retry: {value}")

        return observe

    def _write_ready_file(self) -> None:
        if self._ready_file is None:
            return
        path = Path(self._ready_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**self.ports, "pid": os.getpid()}))
        os.replace(tmp, path)
