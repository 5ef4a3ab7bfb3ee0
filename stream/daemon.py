"""The daemon's lifecycle: configuration → prepare → serve → drain.

```
 config ──► Daemon(config)          XLA threads sized, CPUs split, metrics registered
              │ run()
              ├─ HTTP /metrics /healthz /readyz      (up first: 503 and what it is doing
              │                                     until ready)
              ├─ prepare (worker thread)            build the model, compile every bucket,
              │                                     restore the checkpoint
              ├─ serve: Pipeline(sources, sinks)    stream/pipeline.py draws the stages
              │    ready: /readyz 200, ready file, READY=1, status line every second
              ├─ SIGHUP                             logged and ignored (no reload)
              └─ SIGTERM/SIGINT/request_stop()      STOPPING=1, stop the sources, drain,
                                                    final checkpoint, exit
```

Progress (`starting`, `compiling: 3/8 buckets`, `ready`, `draining`) goes to the status
callable (the log), to `/readyz`, and to the service manager (`stream/notify.py`).

Everything between a frame's arrival and its moment's emission is the pipeline's; this
module only builds it from the configuration and runs it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import jax
from anyio.abc import TaskStatus

import processors
from processors import CompilationCounter, SlabStep

from .affinity import cpu_split, pinned
from .checkpoint import discard_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, parse_address
from .events import Events, Listener
from .http import serve_http
from .metrics import Metrics
from .net import ConnectionLimits
from .notify import Notifier
from .pipeline import Pipeline, PipelineSettings
from .security import prepare as prepare_security
from .sinks import EncodingCache, JsonlSink, Sink, StdoutSink, SubscriberServer
from .sources import Source, SyntheticSource, TcpSource, UdpSource
from .status import StatusLine
from .streams import StreamTable
from .xla import xla_backend_started, xla_cpu_threads

__all__ = ["Daemon", "sink_names"]

log = logging.getLogger(__name__)


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
    - `status`: called with each line of progress (starting, each bucket compiled,
        ready, SIGHUP ignored, stopped) and with one line of live status every
        `log.status_interval_s` (default: the `stream.daemon` logger at INFO). Compile
        progress comes from a worker thread.
    - `ready_file`: when set, the bound ports are written there (JSON, atomically) once
        the daemon is ready — so a supervisor or a test can use port 0.
    - `notifier`: the service manager to tell about start-up, readiness and stopping
        (default: `NOTIFY_SOCKET`'s, which does nothing when it is unset).
    - `discard_checkpoint`: move the checkpoint files in `state.dir` aside (renamed with a
        timestamp, never deleted; logged) before the restore, and start fresh.

    Constructed in the main thread, it ignores SIGHUP for the rest of the process: the
    configuration cannot be reloaded in place, and a hang-up must not end the process
    without its final checkpoint. While `run()` serves, a SIGHUP is logged as ignored.
    """

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        status: Callable[[str], None] | None = None,
        ready_file: str | os.PathLike[str] | None = None,
        notifier: Notifier | None = None,
        discard_checkpoint: bool = False,
    ) -> None:
        self.config = config
        # Who may connect, checked before anything slow: a listener beyond loopback without
        # TLS and authentication refuses the start (ConfigError), unless security.insecure.
        self.security = prepare_security(config)
        self.sources = self._sources()
        self._discard_checkpoint = discard_checkpoint
        self._started = time.monotonic()
        self._status = status or log.info
        self._notifier = notifier if notifier is not None else Notifier.from_environment()
        self._phase = "starting"
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # `_signals` logs it while serving
        # Initialising the backend takes seconds (JAX probes every platform): say so first.
        self._say(f"starting: initialising JAX {jax.__version__} (pid {os.getpid()})…")
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
            sources=tuple(label for source in self.sources for label in source.labels),
            sinks=sink_names(config),
        )
        self._ready_file = ready_file
        self.ready = False
        self.ports: dict[str, int] = {}
        self._stop = anyio.Event()
        self.counter: CompilationCounter | None = None

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        if not self._stop.is_set():
            self._notifier.stopping("draining and checkpointing")
        self._stop.set()

    def progress(self) -> str:
        """One line: `starting`, `compiling: 3/8 buckets`, …, `ready` or `draining`."""
        if self._stop.is_set():
            return "draining"
        return "ready" if self.ready else self._phase

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
                        partial(
                            serve_http,
                            progress=self.progress,
                            tls=self.security.metrics_tls,
                            identities=self.security.identities,
                        ),
                        parse_address(cfg.metrics.listen),
                        metrics,
                        self._is_ready,
                    )
                outer.start_soon(self._signals)
                step, table, slab = await anyio.to_thread.run_sync(self._prepare)
                with pinned({self.cpus.loop} if self.cpus else None):
                    await self._serve(step, table, slab, counter, task_status)
                outer.cancel_scope.cancel()
        finally:
            counter.close()
            self._set_ready(False)
            if not self._stop.is_set():  # it failed: the manager learns it from the exit
                self._notifier.stopping()
            self._notifier.close()

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
        self.metrics.watch_devices(devices[: cfg.device.count])  # memory read at scrape time
        self._phase = f"compiling: 0/{len(step.buckets)} buckets"
        self._say(f"compiling {len(step.buckets)} buckets {step.buckets} on {self._where()}…")
        step.compile(lambda bucket, seconds: self._compiled(step, bucket, seconds))
        self._phase = "restoring the checkpoint"
        table = StreamTable(
            step.capacity,
            cfg.state.max_known_streams,
            max_seq_jump=cfg.ingest.max_seq_jump,
            reclaim_idle_s=cfg.state.reclaim_idle_s,
        )
        fresh = step.host_slab()
        if self._discard_checkpoint:
            discard_checkpoint(cfg.state.dir)
        restored = load_checkpoint(
            cfg.state.dir,
            fresh,
            table,
            self._fingerprint(step),
            fallback_to_previous=cfg.state.fallback_to_previous,
        )
        if restored is not None:
            self._say(f"restored {len(table.processed_seq)} streams from {restored.path}")
        return step, table, step.put_slab(fresh if restored is None else restored.slab)

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
        self._phase = f"compiling: {done}/{total} buckets"
        self._say(f"compiled bucket {bucket:>5} ({done}/{total}) in {seconds:.2f} s")

    def _fingerprint(self, step: SlabStep) -> dict[str, Any]:
        return processors.model_fingerprint(self.config.model_config, step.capacity)

    def _on_fallback(self, name: str, reason: str) -> None:
        self.metrics.jit_fallback("slab_step", reason)
        self._say(f"JIT fallback: {name} runs eagerly ({reason})")

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
        events = Events([metrics, status, _CheckpointLog(self._notifier.status)])
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
            sources=self.sources,
            sinks=self._sinks(events),
            events=events,
            settings=PipelineSettings(
                dims=cfg.dims,
                max_frame_bytes=cfg.ingest.max_frame_bytes,
                ingest_queue=cfg.ingest.queue,
                max_wait_s=cfg.batching.max_wait_ms / 1000.0,
                checkpoint_interval_s=cfg.state.checkpoint_interval_s,
                slo_p99_s=cfg.batching.slo_p99_ms / 1000.0 if cfg.batching.adaptive else None,
                session_start=cfg.ingest.session_start,
                stream_ttl_s=cfg.state.stream_ttl_s,
                new_streams_per_batch=cfg.ingest.new_streams_per_batch,
            ),
            checkpoint=checkpoint,
            on_adapt=adapted,
        )
        for stage, depth in pipeline.queue_depths().items():
            metrics.watch_queue(stage, depth)
        metrics.active_streams.set_function(lambda: table.active)  # read at scrape time
        metrics.unsaved_age.set_function(pipeline.executor.unsaved_age_s)
        self._phase = "starting the pipeline"
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
            if not self._stop.is_set():  # (stopped while it started: never ready)
                self._set_ready(True)
                self._write_ready_file()
                self._announce_ready()
            task_status.started(dict(self.ports))
            async with anyio.create_task_group() as serving:
                if cfg.log.status_interval_s > 0:
                    serving.start_soon(status.run, cfg.log.status_interval_s, self._say)
                await self._stop.wait()
                serving.cancel_scope.cancel()
            self._set_ready(False)
            pipeline.stop()  # the task group waits for the drain
        processed = metrics.registry.get_sample_value("enactive_frames_processed_total") or 0
        self._say(f"stopped: {int(processed)} frames processed, checkpoint in {cfg.state.dir}")

    def _sources(self) -> list[Source]:
        cfg = self.config
        sources: list[Source] = []
        limits = ConnectionLimits(
            max_connections=cfg.ingest.max_connections,
            max_per_address=cfg.ingest.max_connections_per_address,
            idle_timeout_s=cfg.ingest.idle_timeout_s,
            frame_timeout_s=cfg.ingest.frame_timeout_s,
        )
        sec = self.security
        tcp = None
        if cfg.ingest.tcp:
            address = parse_address(cfg.ingest.tcp)
            tcp = TcpSource(
                address,
                limits=limits,
                tls=sec.tls,
                identities=sec.identities,
                poll_interval_s=cfg.ingest.poll_interval_ms / 1000.0,
            )
            sources.append(tcp)
        if cfg.ingest.udp:
            address = parse_address(cfg.ingest.udp)
            sources.append(
                UdpSource(
                    address, buffer=cfg.ingest.udp_buffer, same_port_as=tcp, allow=sec.udp_allow
                )
            )
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
                    limits=ConnectionLimits(
                        max_connections=out.max_subscribers,
                        max_per_address=out.max_subscribers_per_address,
                    ),
                    max_pending_bytes=out.subscriber_max_pending_bytes,
                    socket_buffer_bytes=out.subscriber_socket_buffer_bytes,
                    tls=self.security.tls,
                    identities=self.security.identities,
                )
            )
        if out.jsonl:
            sinks.append(
                JsonlSink(out.jsonl, buffer=out.subscriber_buffer, events=events, cache=cache)
            )
        if out.stdout:
            sinks.append(StdoutSink(buffer=out.subscriber_buffer, events=events, cache=cache))
        return sinks

    # -- signals, readiness, progress ----------------------------------------------------------

    async def _signals(self) -> None:
        try:
            receiver = anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        except (NotImplementedError, ValueError, RuntimeError):  # not the main thread
            return
        draining = False
        try:
            with receiver as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        self._hangup()
                    elif not draining:
                        draining = True
                        self._say(f"{name}: draining and checkpointing…")
                        self.request_stop()
                    else:  # asked twice: the signal's default action, at once
                        self._say(f"{name} again: exiting now, without the final checkpoint")
                        signal.signal(signum, signal.SIG_DFL)
                        os.kill(os.getpid(), signum)
        finally:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # closing the receiver set SIG_DFL

    def _hangup(self) -> None:
        self._status(
            "SIGHUP: ignored — the configuration is read once at start and cannot be "
            "reloaded in place; restart to apply a change (systemctl restart enactive-stream)"
        )

    def _say(self, line: str) -> None:
        """A line of progress or status: to the status callable and the service manager."""
        self._status(line)
        self._notifier.status(line)

    def _announce_ready(self) -> None:
        ports = ", ".join(f"{name} {port}" for name, port in self.ports.items())
        line = f"ready in {time.monotonic() - self._started:.1f} s: {ports}"
        self._status(line)
        self._notifier.ready(line)

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
    """Says so, as a warning (and to the service manager), when a checkpoint fails."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say

    def checkpoint_failed(self, message: str) -> None:
        line = f"checkpoint failed, will retry at the next interval: {message}"
        log.warning(line)
        self._say(line)
