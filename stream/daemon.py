"""The daemon's lifecycle: configuration → prepare → serve → drain.

```
 config ──► Daemon(config)          XLA threads sized, CPUs split, metrics registered
              │ run()
              ├─ HTTP /metrics /healthz /readyz      (up first: 503 until ready)
              ├─ prepare (worker thread)            build the model, compile every bucket,
              │                                     restore the checkpoint
              ├─ serve: Pipeline(sources, sinks)    stream/pipeline.py draws the stages
              │    ready: /readyz 200, ready file, status line every second
              └─ SIGTERM/SIGINT/request_stop()      stop the sources, drain, final
                                                    checkpoint, exit
```

Everything between a frame's arrival and its moment's emission is the pipeline's; this
module only builds it from the configuration and runs it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import jax
from anyio.abc import TaskStatus

import processors
from processors import CompilationCounter, SlabStep

from .affinity import cpu_split, pinned
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, ConfigError, parse_address
from .events import Events, Listener
from .http import serve_http
from .metrics import Metrics
from .pipeline import Pipeline, PipelineSettings
from .sinks import EncodingCache, JsonlSink, Sink, StdoutSink, SubscriberServer
from .sources import Source, SyntheticSource, TcpSource, UdpSource
from .status import StatusLine
from .streams import StreamTable
from .xla import xla_backend_started, xla_cpu_threads

__all__ = ["Daemon", "sink_names", "source_labels"]

log = logging.getLogger(__name__)


def source_labels(config: Config) -> tuple[str, ...]:
    """The `source` label values the configured sources carry."""
    labels: list[str] = []
    if config.ingest.tcp:
        labels += TcpSource.labels
    if config.ingest.udp:
        labels += UdpSource.labels
    if config.synthetic.streams:
        labels += SyntheticSource.labels
    return tuple(labels)


def sink_names(config: Config) -> tuple[str, ...]:
    """The names of the configured sinks."""
    out = config.output
    return tuple(
        name
        for name, on in (("tcp", out.tcp), ("jsonl", out.jsonl), ("stdout", out.stdout))
        if on
    )


class Daemon:
    """The whole service for one `Config`.

    **Arguments:**

    - `config`: the validated configuration.
    - `metrics`: where to count (default: a fresh `Metrics` on its own registry, with
        series for the configured sources and sinks).
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
        split = cpu_split() if config.device.pin_threads and not xla_backend_started() else None
        with pinned(split.compute if split else None) as applied:
            backend = jax.default_backend()
        self.cpus = split if applied else None
        self.metrics = metrics or Metrics(
            buckets=config.batching.buckets,
            backend=backend,
            sources=source_labels(config),
            sinks=sink_names(config),
        )
        self._status = status or log.info
        self._ready_file = ready_file
        self.ready = False
        self.ports: dict[str, int] = {}
        self._stop = anyio.Event()
        self.counter: CompilationCounter | None = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

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
                        serve_http, parse_address(cfg.metrics.listen), metrics, self._is_ready
                    )
                outer.start_soon(self._signals)
                step, table, slab = await anyio.to_thread.run_sync(self._prepare)
                with pinned({self.cpus.loop} if self.cpus else None):
                    await self._serve(step, table, slab, counter, task_status)
                outer.cancel_scope.cancel()
        finally:
            counter.close()
            self._set_ready(False)

    # -- prepare: build, compile, restore (in a worker thread: it takes seconds) -----------

    def _prepare(self) -> tuple[SlabStep, StreamTable, Any]:
        cfg = self.config
        processors.enable_compilation_cache(cfg.device.compilation_cache_dir)
        devices = jax.local_devices()
        if cfg.device.count > len(devices):
            raise ConfigError(
                f"device.count = {cfg.device.count}: only {len(devices)} "
                f"local {jax.default_backend()} device(s) present"
            )
        model = processors.build_model(
            cfg.model_config, seed=cfg.model.seed, params=cfg.model.params or None
        )
        step = SlabStep(
            model,
            buckets=cfg.batching.buckets,
            capacity=cfg.state.max_streams,
            devices=devices[: cfg.device.count],
            on_fallback=self._on_fallback,
        )
        self._status(f"compiling {len(step.buckets)} buckets {step.buckets} on {self._where()}…")
        step.compile(lambda bucket, seconds: self._compiled(step, bucket, seconds))
        table = StreamTable(step.capacity, cfg.state.max_known_streams)
        fresh = step.host_slab()
        host = load_checkpoint(cfg.state.dir, fresh, table, self._fingerprint(step))
        if host is not None:
            self._status(
                f"restored {len(table.processed_seq)} streams from "
                f"{Path(cfg.state.dir) / 'checkpoint.npz'}"
            )
        return step, table, step.put_slab(fresh if host is None else host)

    def _where(self) -> str:
        backend = jax.default_backend()
        where = f"{self.config.device.count} {backend} device(s)"
        if backend == "cpu":
            where += f", {self.xla_cpu_threads} XLA CPU threads"
        if self.cpus:
            compute = ",".join(map(str, sorted(self.cpus.compute)))
            where += f"; event loop on CPU {self.cpus.loop}, XLA on CPUs {compute}"
        return where

    def _compiled(self, step: SlabStep, bucket: int, seconds: float) -> None:
        self.metrics.set_compile_seconds(bucket, seconds)
        done = sum(1 for b in step.buckets if b in step.compile_seconds)
        total = len(step.buckets)
        self._status(f"compiled bucket {bucket:>5} ({done}/{total}) in {seconds:.2f} s")

    def _fingerprint(self, step: SlabStep) -> dict[str, Any]:
        return processors.model_fingerprint(self.config.model_config, step.capacity)

    def _on_fallback(self, name: str, reason: str) -> None:
        self.metrics.jit_fallback("slab_step", reason)
        self._status(f"JIT fallback: {name} runs eagerly ({reason})")

    # -- serve ------------------------------------------------------------------------------

    async def _serve(
        self,
        step: SlabStep,
        table: StreamTable,
        slab: Any,
        counter: CompilationCounter,
        task_status: TaskStatus[dict[str, int]],
    ) -> None:
        cfg, metrics = self.config, self.metrics
        status = StatusLine(metrics, table, counter)
        events = Events([metrics, status, _CheckpointLog(self._status)])
        fingerprint = self._fingerprint(step)

        def checkpoint(rows: Any, snapshot: StreamTable) -> None:
            save_checkpoint(cfg.state.dir, rows, snapshot, fingerprint)

        def adapted(max_wait_s: float, max_batch: int) -> None:
            metrics.batch_max_wait.set(max_wait_s)
            metrics.batch_max_size.set(max_batch)

        pipeline = Pipeline(
            step,
            table,
            slab,
            sources=self._sources(),
            sinks=self._sinks(events),
            events=events,
            settings=PipelineSettings(
                dims=cfg.dims,
                max_frame_bytes=cfg.ingest.max_frame_bytes,
                ingest_queue=cfg.ingest.queue,
                max_wait_s=cfg.batching.max_wait_ms / 1000.0,
                checkpoint_interval_s=cfg.state.checkpoint_interval_s,
                slo_p99_s=cfg.batching.slo_p99_ms / 1000.0 if cfg.batching.adaptive else None,
            ),
            checkpoint=checkpoint,
            on_adapt=adapted,
        )
        for stage, depth in pipeline.queue_depths().items():
            metrics.watch_queue(stage, depth)
        metrics.active_streams.set_function(lambda: table.active)  # read at scrape time
        async with anyio.create_task_group() as tg:
            ports = await tg.start(pipeline.run)
            self.ports.update(ports.sources)
            if "tcp" in ports.sinks:
                self.ports["output"] = ports.sinks["tcp"]
            # Everything built so far (JAX, the model, the executables) lives as long as
            # the process: keep it out of the collector's full passes, which would
            # otherwise scan it in the hot path.
            gc.collect()
            gc.freeze()
            counter.seal()
            self._set_ready(True)
            self._write_ready_file()
            task_status.started(dict(self.ports))
            async with anyio.create_task_group() as serving:
                if cfg.log.status_interval_s > 0:
                    serving.start_soon(status.run, cfg.log.status_interval_s, self._status)
                await self._stop.wait()
                serving.cancel_scope.cancel()
            self._set_ready(False)
            pipeline.stop()  # the task group waits for the drain
        processed = metrics.registry.get_sample_value("enactive_frames_processed_total") or 0
        self._status(
            f"stopped: {int(processed)} frames processed, checkpoint in {cfg.state.dir}"
        )

    def _sources(self) -> list[Source]:
        cfg = self.config
        sources: list[Source] = []
        tcp = TcpSource(parse_address(cfg.ingest.tcp)) if cfg.ingest.tcp else None
        if tcp is not None:
            sources.append(tcp)
        if cfg.ingest.udp:
            address = parse_address(cfg.ingest.udp)
            sources.append(UdpSource(address, buffer=cfg.ingest.udp_buffer, same_port_as=tcp))
        if cfg.synthetic.streams:
            sources.append(
                SyntheticSource(
                    streams=cfg.synthetic.streams,
                    rate_hz=cfg.synthetic.rate_hz,
                    seed=cfg.model.seed,
                )
            )
        return sources

    def _sinks(self, events: Events) -> list[Sink]:
        out = self.config.output
        cache = EncodingCache()
        sinks: list[Sink] = []
        if out.tcp:
            sinks.append(
                SubscriberServer(
                    parse_address(out.tcp),
                    buffer=out.subscriber_buffer,
                    events=events,
                    on_subscribers=self.metrics.subscribers.set,
                    cache=cache,
                )
            )
        if out.jsonl:
            sinks.append(
                JsonlSink(out.jsonl, buffer=out.subscriber_buffer, events=events, cache=cache)
            )
        if out.stdout:
            sinks.append(StdoutSink(buffer=out.subscriber_buffer, events=events, cache=cache))
        return sinks

    # -- signals, readiness -------------------------------------------------------------------

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

    def _is_ready(self) -> bool:
        return self.ready

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.set_ready(ready)

    def _write_ready_file(self) -> None:
        if self._ready_file is None:
            return
        path = Path(self._ready_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**self.ports, "pid": os.getpid()}))
        os.replace(tmp, path)


class _CheckpointLog(Listener):
    """Says so in the status output when a checkpoint fails."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say

    def checkpoint_failed(self, message: str) -> None:
        self._say(f"checkpoint failed, will retry: {message}")
