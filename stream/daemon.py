"""The daemon's lifecycle: configuration → prepare → serve → drain.

```
 config ──► Daemon(config)          XLA threads sized, CPUs split, metrics registered
              │ run()
              ├─ HTTP /metrics /healthz /readyz      (up first: 503 and what it is doing
              │                                     until ready)
              ├─ compile (a thread of its own)      the buckets, the largest first (from the
              │                                     model's shapes: no values needed), and
              │                                     after the first the slot helpers
              ├─ [cluster]: claim the partitions    their checkpoints read from JetStream
              │    (stream/partition_state.py)      (the pointers checked every second after)
              ├─ prepare (worker thread, meanwhile) build the model (or read its cached
              │                                     initialisation), restore the checkpoint
              ├─ serve: Pipeline(sources, sinks)    stream/pipeline.py draws the stages
              │    ready: /readyz 200, ready file, READY=1, status line every second —
              │    once the first bucket is compiled (`batching.serve_while_compiling`,
              │    else once all are); batches use the compiled buckets only; the others
              │    compile from then on, at the lowest CPU priority
              ├─ SIGHUP                             logged and ignored (no reload)
              └─ SIGTERM/SIGINT/request_stop()      STOPPING=1, stop the sources, drain,
                                                    final checkpoint, exit
```

Progress (`starting`, `compiling: 1/8 buckets, building the model`, `ready: 3/8 buckets
compiled, compiling the rest`, `ready`, `draining`) goes to the status callable (the log),
to `/readyz`, and to the service manager (`stream/notify.py`).

No bucket is used before it is compiled, and the hot path never compiles: compilations
after ready count as `runtime` (which must stay 0), except the compile thread's, which
count as `background` (`processors.CompilationCounter.in_background`).

Everything between a frame's arrival and its moment's emission is the pipeline's; this
module only builds it from the configuration and runs it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import jax
from anyio.abc import TaskStatus

import processors
from processors import CompilationCounter, SlabStep

from .affinity import cpu_split, pinned
from .alignment import bodies
from .checkpoint import discard_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, parse_address
from .events import Events, Listener
from .freshness import Freshness
from .http import serve_http
from .jetstream import NatsSettings, require_nats
from .metrics import Metrics
from .net import ConnectionLimits
from .notify import Notifier
from .partitions import Cluster, instance_from_hostname
from .pipeline import Pipeline, PipelineSettings
from .recording import Recorder
from .security import prepare as prepare_security
from .sinks import EncodingCache, JsonlSink, Sink, StdoutSink, SubscriberServer
from .sources import Source, SyntheticSource, TcpSource, UdpSource
from .status import StatusLine
from .streams import StreamTable
from .xla import xla_backend_started, xla_cpu_threads

if TYPE_CHECKING:
    from .mqtt import MqttSettings
    from .partition_state import PartitionStore

__all__ = ["Daemon", "compile_order", "sink_names"]

log = logging.getLogger(__name__)


def compile_order(buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The order the daemon compiles its buckets in: the largest first, then the others
    from the smallest up.

    Each takes about as long to compile as any other, and the daemon serves from the
    first: the largest takes any batch, so whatever the load the daemon keeps up while
    the rest compile (a small batch pads up to it: a slower step, not a backlog). The
    smallest alone could not: bucket 1 carried ~1,500 frames/s through the pipeline on
    the 2-core reference machine, a quarter of the embedded default's synthetic 6,400,
    and the backlog grew by seconds (docs/benchmarks.md, "Start-up"). Then the smallest
    up: each takes the batches below it off the padded largest.
    """
    ordered = sorted(set(buckets))
    return (ordered[-1], *ordered[:-1])


def sink_names(config: Config) -> tuple[str, ...]:
    """The names of the configured sinks."""
    out = config.output
    return tuple(
        name
        for name, on in (
            ("tcp", out.tcp),
            ("jsonl", out.jsonl),
            ("stdout", out.stdout),
            ("nats", config.nats.url and config.nats.publish_moments),
            ("mqtt", config.mqtt.url and config.mqtt.publish_moments),
        )
        if on
    )


def freshness_policies(config: Config) -> dict[str, Freshness]:
    """Each source label's freshness policy (`stream.freshness`); NATS has none."""
    ingest = Freshness.parse(config.ingest.freshness)
    return {
        "tcp": ingest,
        "json": ingest,
        "udp": ingest,
        "mqtt": Freshness.parse(config.mqtt.freshness),
        "lsl": Freshness.parse(config.lsl.freshness),
    }


def mqtt_settings(config: Config) -> MqttSettings:
    """How the MQTT source and sink connect (the `[mqtt]` section)."""
    from .mqtt import MqttSettings

    m = config.mqtt
    return MqttSettings(
        url=m.url,
        client_id=m.client_id,
        persistent_session=m.persistent_session,
        session_expiry_s=m.session_expiry_s,
        keepalive_s=m.keepalive_s,
        protocol=m.protocol,
        connect_timeout_s=m.connect_timeout_s,
        username=m.username,
        password=m.password,
        tls_ca_file=m.tls_ca_file,
        tls_cert_file=m.tls_cert_file,
        tls_key_file=m.tls_key_file,
    )


def cluster_of(config: Config, hostname: str | None = None) -> Cluster | None:
    """This instance's place in a scaled-out deployment (`[cluster]`; None without it),
    `instance = "auto"` taken from the host name's ordinal.

    **Raises:** `ConfigError` when the host name has no ordinal, or one out of range."""
    c = config.cluster
    if not c.instances:
        return None
    instance = c.instance
    if instance == "auto":
        try:
            instance = instance_from_hostname(hostname)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if instance >= c.instances:
            raise ConfigError(
                f'cluster.instance = "auto": the host name gives {instance}, but instances are '
                f"numbered 0 to {c.instances - 1} (cluster.instances = {c.instances})"
            )
    assert isinstance(instance, int)
    return Cluster(c.instances, instance, c.partitions, c.state_bucket)


def nats_settings(config: Config) -> NatsSettings:
    """How the NATS source and sink connect, and how the streams are created."""
    n = config.nats
    return NatsSettings(
        url=n.url,
        credentials_file=n.credentials_file,
        token=n.token,
        nkey_seed_file=n.nkey_seed_file,
        user=n.user,
        password=n.password,
        tls_ca_file=n.tls_ca_file,
        tls_cert_file=n.tls_cert_file,
        tls_key_file=n.tls_key_file,
        connect_timeout_s=n.connect_timeout_s,
        storage=n.storage,
        replicas=n.replicas,
        max_age_s=n.max_age_s,
        duplicate_window_s=n.duplicate_window_s,
    )


class _Links(Listener):
    """Which broker sources are disconnected now (not ready while one is), logged as
    their connections come and go. (An LSL outlet that goes away is logged by the
    source; the daemon stays ready: the other outlets and sources still flow.)"""

    BROKERS = ("nats", "mqtt")

    def __init__(self) -> None:
        self.down: set[str] = set()

    def source_state(self, source: str, up: bool) -> None:
        if source not in self.BROKERS:
            return
        if up and source in self.down:
            self.down.discard(source)
            log.info("%s: connected again", source)
        elif not up and source not in self.down:
            self.down.add(source)
            log.warning("%s: disconnected; reconnecting", source)


class Daemon:
    """The whole service for one `Config`.

    **Arguments:**

    - `config`: the validated configuration.
    - `metrics`: where to count (default: a fresh `Metrics` on its own registry, with
        series for the configured sources and sinks).
    - `status`: called with each line of progress (starting, each bucket compiled, the
        model built, ready, all buckets compiled, SIGHUP ignored, stopped) and with one
        line of live status every `log.status_interval_s` (default: the `stream.daemon`
        logger at INFO). The model's line comes from a worker thread, the rest from the
        event loop: it must not block.
    - `ready_file`: when set, the bound ports are written there (JSON, atomically) once
        the daemon is ready (serving, perhaps with buckets still compiling: `/readyz`
        says `ready` once they are all in) — so a supervisor or a test can use port 0.
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
        self.cluster = cluster_of(config)
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
            recording=bool(config.record.path),
            partitions=self.cluster.owned if self.cluster else (),
        )
        # The recording is checked (a crash's tail cut away) before anything slow.
        self.recorder = (
            Recorder.open(config.record.path, config.dims, on_written=self.metrics.recorded)
            if config.record.path
            else None
        )
        if self.recorder is not None:
            kept = self.recorder.frames
            after = f", appending after its {kept} frames" if kept else ""
            self._say(f"recording every accepted frame to {self.recorder.path}{after}")
        self._ready_file = ready_file
        self.ready = False
        self.ports: dict[str, int] = {}
        self._stop = anyio.Event()
        self.counter: CompilationCounter | None = None
        self._step: SlabStep | None = None
        self._pipeline: Pipeline | None = None
        self._serving = anyio.Event()  # ready once: the rest compiles from then on
        self._compiled_buckets: list[int] = []  # as announced, on the event loop
        self._links = _Links()  # broker sources' connections
        self._store: PartitionStore | None = None  # the partitions' state (with [cluster])
        if self.cluster is not None and discard_checkpoint:
            raise ConfigError(
                "--discard-checkpoint: with [cluster] the state is in the JetStream "
                f"buckets {self.cluster.state_bucket} (delete partition.<p> there to start "
                "a partition fresh)"
            )

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        if not self._stop.is_set():
            self._notifier.stopping("draining and checkpointing")
        self._stop.set()

    def progress(self) -> str:
        """One line: `starting`, `compiling: 3/8 buckets, building the model`, …, `ready:
        3/8 buckets compiled, compiling the rest`, `ready` or `draining`."""
        if self._stop.is_set():
            return "draining"
        step = self._step
        if step is None:
            return "ready" if self.ready else self._phase
        buckets = f"{len(self._compiled_buckets)}/{len(step.buckets)} buckets"
        if self.ready and self._links.down:
            return f"not ready: {', '.join(sorted(self._links.down))} disconnected, reconnecting"
        if self.ready:
            if len(self._compiled_buckets) == len(step.buckets):
                return "ready"
            return f"ready: {buckets} compiled, compiling the rest"
        return ", ".join(part for part in (f"compiling: {buckets}", self._phase) if part)

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
                devices = await anyio.to_thread.run_sync(self._devices)
                # The model first (the longest part of a cold start), the step and its
                # compilation beside it; then the checkpoint, into the model's slab.
                built: list[Any] = []
                built_event = anyio.Event()
                outer.start_soon(self._build, built, built_event)
                step = await anyio.to_thread.run_sync(self._make_step, devices)
                compiled = anyio.Event()  # enough buckets to serve
                outer.start_soon(self._compile, step, compiled)
                async with self._state_store(step) as found:
                    await built_event.wait()  # (a failure cancels this wait: the error is its)
                    table, slab = await anyio.to_thread.run_sync(
                        self._prepare, step, built[0], found
                    )
                    await compiled.wait()
                    with pinned({self.cpus.loop} if self.cpus else None):
                        async with self._recording():
                            await self._serve(step, table, slab, counter, task_status)
                outer.cancel_scope.cancel()  # (a compilation under way is finished first)
        finally:
            counter.close()
            self._set_ready(False)
            if not self._stop.is_set():  # it failed: the manager learns it from the exit
                self._notifier.stopping()
            self._notifier.close()

    # -- prepare: build the model, compile beside it, restore (worker threads: seconds) -----

    def _devices(self) -> list[jax.Device]:
        """The devices to run on (the compilation cache on first: every compilation from
        here on is cached)."""
        cfg = self.config
        processors.enable_compilation_cache(cfg.device.compilation_cache_dir)
        devices = jax.local_devices()
        if cfg.device.count > len(devices):
            raise ConfigError(
                f"device.count = {cfg.device.count}: only {len(devices)} "
                f"local {jax.default_backend()} device(s) present"
            )
        return devices[: cfg.device.count]

    async def _build(self, built: list[Any], done: anyio.Event) -> None:
        """Build the model (or read its cached initialisation) in a worker thread, into
        `built`; then set `done`."""
        built.append(await anyio.to_thread.run_sync(self._build_model))
        done.set()

    def _build_model(self) -> Any:
        cfg = self.config
        self._phase = "building the model"
        t0 = time.monotonic()
        model = processors.build_model(
            cfg.model_config,
            seed=cfg.model.seed,
            params=cfg.model.params or None,
            cache_dir=cfg.device.compilation_cache_dir,
        )
        self._say(f"built the model in {time.monotonic() - t0:.2f} s")
        return model

    def _make_step(self, devices: list[jax.Device]) -> SlabStep:
        """The step, from the model's structure: compiling needs its shapes only."""
        cfg = self.config
        step = SlabStep(
            processors.abstract_model(cfg.model_config),
            buckets=cfg.batching.buckets,
            capacity=cfg.state.max_streams,
            devices=devices,
            on_fallback=self._on_fallback,
        )
        self.metrics.watch_devices(devices)  # memory read at scrape time
        self._step = step
        self._say(f"compiling {len(step.buckets)} buckets {step.buckets} on {self._where()}…")
        return step

    async def _compile(self, step: SlabStep, enough: anyio.Event) -> None:
        """Compile the buckets one after another on the compile thread (the slot helpers
        right after the first); set `enough` once the daemon may serve.

        Serving while compiling, the other buckets wait until the daemon is ready: the
        first moment needs the model too, and on a busy host more compilation beside its
        building (tens of small compilations) only slows it down (one cold start each on
        the 2-core reference machine: 23.9 s to ready with every bucket compiling beside
        the model, 11.4 s with the first alone).
        """
        assert self.counter is not None
        cpus = {self.cpus.loop, *self.cpus.compute} if self.cpus else None
        compiler = _Compiler(self.counter, cpus)
        try:
            for i, bucket in enumerate(compile_order(step.buckets)):
                if self._stop.is_set() and enough.is_set():
                    return  # stopping: what is compiled serves the drain
                seconds = await compiler.run(step.compile_bucket, bucket)
                self._compiled(step, bucket, seconds)
                if i == 0:
                    await compiler.run(step.compile_helpers)
                    if self.config.batching.serve_while_compiling:
                        enough.set()
                        await self._serving.wait()
                        compiler.yield_to_the_hot_path()
            enough.set()
        finally:
            compiler.close()
        after = time.monotonic() - self._started
        self._say(f"all {len(step.buckets)} buckets compiled, {after:.1f} s after start")

    @contextlib.asynccontextmanager
    async def _state_store(self, step: SlabStep) -> AsyncIterator[dict[int, bytes] | None]:
        """With [cluster], the partitions' state in JetStream, open while the daemon
        runs: what it holds of the owned partitions (None without [cluster])."""
        if self.cluster is None:
            yield None
            return
        from .partition_state import PartitionStore
        from .sources.nats import NatsSource

        self._phase = "reading the partitions' state from JetStream"
        source = next(s for s in self.sources if isinstance(s, NatsSource))
        metrics = self.metrics

        def fenced(partition: int) -> None:
            source.release(partition)
            metrics.partitions_owned(len(store.owned))

        store = PartitionStore(
            nats_settings(self.config),
            self.cluster,
            self._fingerprint(step),
            on_fenced=fenced,
            on_write=metrics.partition_checkpoint,
        )
        async with store.open():
            found = await store.fetch()
            self._store = store
            metrics.partitions_owned(len(store.owned))
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.watch)
                yield found
                tg.cancel_scope.cancel()

    def _prepare(
        self, step: SlabStep, model: Any, found: dict[int, bytes] | None = None
    ) -> tuple[StreamTable, Any]:
        cfg = self.config
        step.bind(model)
        self._phase = "restoring the checkpoint"
        table = StreamTable(
            step.capacity,
            cfg.state.max_known_streams,
            max_seq_jump=cfg.ingest.max_seq_jump,
            reclaim_idle_s=cfg.state.reclaim_idle_s,
        )
        fresh = step.host_slab()
        if self._store is not None and found is not None:
            streams = self._store.restore(found, fresh, table)
            where = f"{len(found)} of {len(self._store.owned)} partitions"
            bucket = self._store.cluster.state_bucket
            self._say(f"restored {streams} streams from {where} in {bucket}")
            slab = step.put_slab(fresh)
            self._phase = ""
            return table, slab
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
        slab = step.put_slab(fresh if restored is None else restored.slab)
        self._phase = ""
        return table, slab

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
        """On the event loop, once `bucket` is ready: batches may grow to it."""
        self.metrics.set_compile_seconds(bucket, seconds)
        self.metrics.set_bucket_ready(bucket)
        self._compiled_buckets.append(bucket)  # what progress() and the log say
        done, total = len(self._compiled_buckets), len(step.buckets)
        self._say(f"compiled bucket {bucket:>5} ({done}/{total}) in {seconds:.2f} s")
        if self._pipeline is not None:
            self._pipeline.buckets_compiled()

    def _fingerprint(self, step: SlabStep) -> dict[str, Any]:
        return processors.model_fingerprint(self.config.model_config, step.capacity)

    def _on_fallback(self, name: str, reason: str) -> None:
        self.metrics.jit_fallback("slab_step", reason)
        self._say(f"JIT fallback: {name} runs eagerly ({reason})")

    # -- serve ------------------------------------------------------------------------------

    def _recording(self) -> contextlib.AbstractAsyncContextManager[object]:
        """The recorder's writer, while the daemon serves (nothing without `record.path`);
        on the way out it writes what is queued, fsyncs and closes the file."""
        return self.recorder.writing() if self.recorder else contextlib.nullcontext()

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
        events = Events([metrics, status, _CheckpointLog(self._notifier.status), self._links])
        fingerprint = self._fingerprint(step)

        store = self._store

        def checkpoint(rows: Any, snapshot: StreamTable) -> None:
            if store is None:
                save_checkpoint(cfg.state.dir, rows, snapshot, fingerprint)
                return
            blobs = store.encode(rows, snapshot)  # (a worker thread: the loop goes on)
            if blobs:
                anyio.from_thread.run(store.write, blobs)

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
                freshness=freshness_policies(cfg),
                bodies=bodies(cfg.align),
                # a broker's unacknowledged messages never reach its limit
                checkpoint_positions=cfg.nats.max_ack_pending // 2
                if cfg.nats.url and cfg.nats.consume
                else 0,
            ),
            checkpoint=checkpoint,
            on_adapt=adapted,
            on_batch=self.recorder.record if self.recorder else None,
        )
        self._pipeline = pipeline  # told of each bucket compiled from now on
        for stage, depth in pipeline.queue_depths().items():
            metrics.watch_queue(stage, depth)
        metrics.active_streams.set_function(lambda: table.active)  # read at scrape time
        metrics.known_streams.set_function(lambda: len(table.admitted_seq))
        metrics.unsaved_age.set_function(pipeline.executor.unsaved_age_s)
        for source in self.sources:
            lag = getattr(source, "ack_lag_s", None)
            if lag is not None:
                metrics.source_ack_lag.labels(source.name).set_function(lag)
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
                self._serving.set()
            task_status.started(dict(self.ports))
            async with anyio.create_task_group() as serving:
                if cfg.log.status_interval_s > 0:
                    serving.start_soon(status.run, cfg.log.status_interval_s, self._say)
                await self._stop.wait()
                serving.cancel_scope.cancel()
            self._set_ready(False)
            pipeline.stop()  # the task group waits for the drain
        processed = metrics.registry.get_sample_value("enactive_frames_processed_total") or 0
        where = cfg.state.dir if self.cluster is None else self.cluster.state_bucket
        self._say(f"stopped: {int(processed)} frames processed, checkpoint in {where}")

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
        if cfg.nats.url and cfg.nats.consume:
            require_nats()
            from .sources.nats import NatsSource, NatsSourceSettings

            n = cfg.nats
            cluster = self.cluster
            sources.append(
                NatsSource(
                    nats_settings(cfg),
                    NatsSourceSettings(
                        subjects=n.subjects,
                        stream=n.stream,
                        durable=n.durable,
                        fetch_batch=n.fetch_batch or max(cfg.batching.buckets),
                        max_ack_pending=n.max_ack_pending,
                        ack_wait_s=n.effective_ack_wait_s(cfg.state.checkpoint_interval_s),
                    ),
                    partitions=cluster.partitions if cluster else 0,
                    owned=cluster.owned if cluster else (),
                )
            )
        if cfg.mqtt.url and cfg.mqtt.consume:
            from .mqtt import require_mqtt

            require_mqtt()
            from .sources.mqtt import MqttSource

            sources.append(
                MqttSource(mqtt_settings(cfg), topics=cfg.mqtt.topics, qos=cfg.mqtt.qos)
            )
        if cfg.lsl.predicate:
            from .lsl import require_lsl

            require_lsl()
            from .sources.lsl import LslSettings, LslSource

            sources.append(LslSource(LslSettings.of(cfg.lsl), dims=cfg.dims))
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
        n = self.config.nats
        if n.url and n.publish_moments:
            require_nats()
            from .sinks.nats import NatsMomentSink

            sinks.append(
                NatsMomentSink(
                    nats_settings(self.config),
                    stream=n.moments_stream,
                    buffer=n.moments_buffer,
                    in_flight=n.publish_in_flight,
                    events=events,
                )
            )
        m = self.config.mqtt
        if m.url and m.publish_moments:
            from .mqtt import require_mqtt

            require_mqtt()
            from .sinks.mqtt import MqttMomentSink

            sinks.append(
                MqttMomentSink(
                    mqtt_settings(self.config),
                    topic=m.moments_topic,
                    qos=m.moments_qos,
                    buffer=m.moments_buffer,
                    events=events,
                    cache=cache,
                )
            )
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
        step = self._step
        if step is not None and len(self._compiled_buckets) < len(step.buckets):
            rest = len(step.buckets) - len(self._compiled_buckets)
            buckets = ", ".join(map(str, sorted(self._compiled_buckets)))
            line += f"; buckets {buckets} compiled, {rest} more compiling"
        self._status(line)
        self._notifier.ready(line)

    def _is_ready(self) -> bool:
        return self.ready and not self._links.down

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


class _Compiler:
    """The thread the daemon compiles on: a thread of its own, on every CPU, so that once
    the daemon serves it can take the lowest CPU priority (`nice` 19: the event loop and
    XLA's threads first, compilation in the time they leave) without lowering a thread
    that does anything else. Its compilations count as background once the daemon is
    ready (`CompilationCounter.in_background`), never as the hot path's."""

    def __init__(self, counter: CompilationCounter, cpus: set[int] | None) -> None:
        self._counter = counter
        self._nice = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="enactive-compile", initializer=self._start, initargs=(cpus,)
        )

    @staticmethod
    def _start(cpus: set[int] | None) -> None:
        if cpus is not None:  # every CPU the process has, whatever thread started it
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    def yield_to_the_hot_path(self) -> None:
        """From the next compilation on, run at the lowest priority (one way: an
        unprivileged process cannot raise it again)."""
        self._nice = True

    async def run(self, compile: Callable[..., Any], *args: Any) -> Any:
        future = self._pool.submit(self._call, compile, *args)
        return await anyio.to_thread.run_sync(future.result)

    def _call(self, compile: Callable[..., Any], *args: Any) -> Any:
        if self._nice and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):  # Linux: the calling thread's nice value
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        with self._counter.in_background():
            return compile(*args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _CheckpointLog(Listener):
    """Says so, as a warning (and to the service manager), when a checkpoint fails."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say

    def checkpoint_failed(self, message: str) -> None:
        line = f"checkpoint failed, will retry at the next interval: {message}"
        log.warning(line)
        self._say(line)
