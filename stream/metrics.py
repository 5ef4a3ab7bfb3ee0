"""Every Prometheus metric the daemon exposes, in one place.

`Metrics` owns its metric objects and registers them on the `registry` it is given (a new
`CollectorRegistry` by default, never the process-global one), together with
prometheus_client's process (`process_*`), garbage collector (`python_gc_*`) and platform
(`python_info`) collectors. Names use the `enactive_` prefix, base units and `_total`
counters; the label sets of the running configuration (its sources, sinks and buckets,
every reason and stage) start at 0 so dashboards and `rate()` see every series from the
first scrape. No label ever carries a stream id. The reference, with a PromQL example per
metric, is `docs/metrics.md`.

`Metrics` implements `stream.events.PipelineEvents`: the stages report to it (`received`,
`rejected`, `batch`, `moments`, ...), and each event looks up pre-bound label children in
dicts. A label value outside the known set is recorded as `"other"`, so no caller can grow
the number of series without bound. Queue depths and device memory are read at scrape time
by custom collectors.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from .histogram import BatchHistogram
from .protocol import REASONS

if TYPE_CHECKING:
    from .events import BatchTimes, PipelineEvents

__all__ = [
    "BATCH_FILL_BUCKETS",
    "CHECKPOINT_BUCKETS",
    "DEVICE_MEMORY_KINDS",
    "DROP_REASONS",
    "JIT_PROCESSORS",
    "LATENCY_BUCKETS",
    "LIMIT_REASONS",
    "LISTENERS",
    "MAX_FALLBACK_REASONS",
    "PHASES",
    "SINKS",
    "SINK_DROP_REASONS",
    "SOURCES",
    "STAGES",
    "MemoryStatsDevice",
    "Metrics",
]

# The `source` labels and sink names the code has. A configuration pre-declares the series
# of the ones it runs (`Metrics(sources=..., sinks=...)`); the others appear at first use.
SOURCES = ("tcp", "json", "udp", "synthetic", "nats", "mqtt", "lsl")
SINKS = ("tcp", "jsonl", "stdout", "nats", "mqtt")
LINKED_SOURCES = ("nats", "mqtt", "lsl")
"""Sources that connect to something that can go away (a broker, an outlet): they have a
connection state, disconnections and reconnections (`enactive_source_up`, ...)."""
BROKER_SOURCES = ("nats", "mqtt")
"""Sources that acknowledge to a broker: they have acknowledgements and redeliveries
(`enactive_source_acks_total`, ...), and NATS an acknowledgement lag."""
ACK_KINDS = ("ack", "term")
PARTITION_WRITES = ("written", "failed")
"""Outcomes of a partition checkpoint's write to JetStream (`fenced` is counted apart)."""
LISTENERS = ("ingest.tcp", "output.tcp", "metrics.listen")
LIMIT_REASONS = (
    "max_connections",
    "max_per_address",
    "idle_timeout",
    "frame_timeout",
    "header_timeout",
    "accept_error",
    "unauthorized",
    "tls_handshake",
)
DROP_REASONS = ("overload", "stale", "late")
STAGES = ("queue", "batch_wait", "device", "integrate", "emit")
PHASES = ("warmup", "background", "runtime")
SINK_DROP_REASONS = ("slow_sink", "slow_subscriber", "disconnected", "error")
JIT_PROCESSORS = ("temporal", "body_schema", "slab_step")
# `kind` label of `enactive_device_memory_bytes` -> key of `jax.Device.memory_stats()`.
DEVICE_MEMORY_KINDS = {
    "in_use": "bytes_in_use",
    "limit": "bytes_limit",
    "peak": "peak_bytes_in_use",
}
# Fallback reasons are the failing exception's class name (what `processors` reports); the
# first MAX_FALLBACK_REASONS distinct ones get their own series, later ones count as "other".
MAX_FALLBACK_REASONS = 16
OTHER = "other"

# Seconds, roughly log-spaced from 50 µs to 5 s, finer around the 1-10 ms batch deadline.
LATENCY_BUCKETS = (
    50e-6, 100e-6, 200e-6, 500e-6,
    1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
    10e-3, 20e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_FILL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
CHECKPOINT_BUCKETS = (1e-3, 5e-3, 10e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _QueueDepthCollector:
    """Reads `enactive_queue_depth{stage}` from registered callables at scrape time."""

    def __init__(self) -> None:
        self.watched: dict[str, Callable[[], int]] = {}

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "enactive_queue_depth", "Items waiting in a pipeline queue.", labels=["stage"]
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for stage, fn in list(self.watched.items()):
            try:
                depth = float(fn())
            except Exception:  # a scrape must not fail because one queue went away
                continue
            family.add_metric([stage], depth)
        yield family


class MemoryStatsDevice(Protocol):
    """What `Metrics.watch_devices` reads: a `jax.Device`, or anything with its `id` and
    `memory_stats()` (a dict, or None or an exception where the backend reports nothing)."""

    @property
    def id(self) -> int: ...

    def memory_stats(self) -> Mapping[str, Any] | None: ...


class _DeviceMemoryCollector:
    """Reads `enactive_device_memory_bytes{device, kind}` from `memory_stats()` at scrape
    time; a device whose backend reports nothing (the CPU) has no series."""

    def __init__(self) -> None:
        self.devices: tuple[MemoryStatsDevice, ...] = ()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "enactive_device_memory_bytes",
            "Accelerator memory as the backend reports it: in use, limit, peak in use.",
            labels=["device", "kind"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for device in self.devices:
            try:
                stats = device.memory_stats()
            except Exception:  # not supported by this backend, or the device went away
                continue
            if not stats:
                continue
            for kind, key in DEVICE_MEMORY_KINDS.items():
                value = stats.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    family.add_metric([str(device.id), kind], float(value))
        yield family


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The daemon's metrics, registered on one registry; a `PipelineEvents`.

    **Arguments:**

    - `registry`: where to register; default a new `CollectorRegistry()`.
    - `sources`: the `source` labels of the configured sources (e.g. `("tcp", "json")`);
        `frames_received_total` and `frames_rejected_total` start with their series
        (× every rejection reason). A label of `SOURCES` not given here gets its series
        at its first frame; any other label counts as `"other"`.
    - `sinks`: the names of the configured sinks (e.g. `("tcp",)`); likewise for
        `moments_emitted_total` and `moments_dropped_total` (× every sink drop reason),
        with `SINKS`.
    - `buckets`: the batch buckets (batch sizes, ints); `batches_total`,
        `jit_compile_seconds` and `bucket_ready` start with one series per bucket.
    - `version`, `jax_version`, `backend`: build metadata for `enactive_build_info`
        (defaults: installed distribution versions and `"unknown"`; see `set_build_info`).
    - `recording`: the daemon records every accepted frame (`record.path`): register
        `recorded_frames_total` and `recording_bytes` (without it they have no series).
    - `process_metrics`: also register prometheus_client's `ProcessCollector`
        (`process_*`: CPU, memory, file descriptors, start time; Linux only),
        `GCCollector` (`python_gc_*`) and `PlatformCollector` (`python_info`). Off for
        tests that count the `enactive_*` series exactly, and for a registry that already
        has them (the process-global `REGISTRY` does).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        sources: Sequence[str] = (),
        sinks: Sequence[str] = (),
        buckets: Sequence[int] = (),
        version: str | None = None,
        jax_version: str | None = None,
        backend: str = "unknown",
        recording: bool = False,
        partitions: Sequence[int] = (),
        process_metrics: bool = True,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.buckets = tuple(int(b) for b in buckets)
        self.sources = tuple(dict.fromkeys(sources))
        self.sinks = tuple(dict.fromkeys(sinks))
        # Label values counted under their own name; anything else is "other".
        self._known_sources = (*self.sources, *(s for s in SOURCES if s not in self.sources))
        self._known_sinks = (*self.sinks, *(s for s in SINKS if s not in self.sinks))

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"enactive_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"enactive_{name}", doc, labels, registry=r)

        def histogram(
            name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
        ) -> BatchHistogram:
            h = BatchHistogram(f"enactive_{name}", doc, buckets, labels)
            r.register(h)
            return h

        self.frames_received = counter(
            "frames_received_total", "Frames received, by transport.", ["source"]
        )
        self.frames_rejected = counter(
            "frames_rejected_total", "Frames rejected by protocol checks.", ["source", "reason"]
        )
        self.frames_dropped = counter(
            "frames_dropped_total", "Well-formed frames dropped by overload policy.", ["reason"]
        )
        self.connections_limited = counter(
            "connections_limited_total",
            "Connections refused or closed by a listener's limits.",
            ["listener", "reason"],
        )
        self.frames_processed = counter(
            "frames_processed_total", "Frames stepped through the model."
        )
        self.batches = counter("batches_total", "Device batches, by bucket size.", ["bucket"])
        self.batch_fill = histogram(
            "batch_fill_ratio", "Real rows / bucket size of each batch.", BATCH_FILL_BUCKETS
        )
        self.stage_latency = histogram(
            "stage_latency_seconds", "Time spent in one pipeline stage.", LATENCY_BUCKETS,
            ["stage"],
        )  # fmt: skip
        self.end_to_end = histogram(
            "end_to_end_latency_seconds", "From a frame's receipt to its moment's emission.",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.jit_fallbacks = counter(
            "jit_fallback_total", "Steps that fell back from compiled to eager code.",
            ["processor", "reason"],
        )  # fmt: skip
        self.jit_compilations = counter(
            "jit_compilations_total",
            "XLA compilations: at warm-up (before ready), in the background (the buckets "
            "still compiling after ready, off the hot path) or at runtime (the hot path).",
            ["phase"],
        )
        self.jit_compile_seconds = gauge(
            "jit_compile_seconds", "Seconds the bucket's executable took to compile.", ["bucket"]
        )
        self.bucket_ready = gauge(
            "bucket_ready",
            "1 once the bucket's executable is compiled and batches may use it, else 0.",
            ["bucket"],
        )
        self.active_streams = gauge("active_streams", "Streams holding a state slot.")
        self.known_streams = gauge(
            "known_streams",
            "Streams the daemon knows (holds a last seq for), on the device or evicted to the "
            "host; at most state.max_known_streams.",
        )
        self.batch_max_wait = gauge(
            "batch_max_wait_seconds", "The batch deadline now (adaptive batching moves it)."
        )
        self.batch_max_size = gauge(
            "batch_max_size", "The batch size cap now, a compiled bucket (adaptive batching)."
        )
        self.ready = gauge(
            "ready",
            "1 while serving: a bucket or more compiled and the sources bound (/readyz 200).",
        )
        self.checkpoints = counter("state_checkpoints_total", "State checkpoints written.")
        self.checkpoint_errors = counter(
            "state_checkpoint_errors_total", "State checkpoints that could not be written."
        )
        self.unsaved_age = gauge(
            "state_unsaved_age_seconds",
            "Age of the oldest effect on state no durable checkpoint holds yet (0: all saved).",
        )
        self.checkpoint_seconds = histogram(
            "checkpoint_seconds", "Time to write one state checkpoint.", CHECKPOINT_BUCKETS
        )
        self.evictions = counter("state_evictions_total", "Idle stream states evicted.")
        self.restores = counter("state_restores_total", "Stream states restored.")
        self.expirations = counter(
            "state_expirations_total", "Streams forgotten after state.stream_ttl_s idle."
        )
        self.moments_emitted = counter(
            "moments_emitted_total", "Moments delivered, by sink.", ["sink"]
        )
        self.moments_dropped = counter(
            "moments_dropped_total", "Moments a sink could not take.", ["sink", "reason"]
        )
        self.subscribers = gauge("subscribers", "Connected TCP moment subscribers.")
        self.recorded_frames: Counter | None = None
        self.recording_bytes: Gauge | None = None
        if recording:
            self.recorded_frames = counter(
                "recorded_frames_total", "Accepted frames written to the recording file."
            )
            self.recording_bytes = gauge(
                "recording_bytes", "Size of the recording file, as of its last write."
            )
        self.source_up = gauge(
            "source_up",
            "1 while the source can take frames (a broker source: connected), else 0.",
            ["source"],
        )
        self.source_sample_age = gauge(
            "source_sample_age_seconds",
            "Age of the newest sample from the source in the last batch stepped: the step's "
            "time minus the sample's (receipt, or for LSL its capture time).",
            ["source"],
        )
        linked = [s for s in self.sources if s in LINKED_SOURCES]
        if linked:
            self.source_disconnects = counter(
                "source_disconnects_total",
                "A source's connection (a broker, an LSL outlet) was lost.",
                ["source"],
            )
            self.source_reconnects = counter(
                "source_reconnects_total", "A source's lost connection came back.", ["source"]
            )
        brokers = [s for s in self.sources if s in BROKER_SOURCES]
        if brokers:
            self.source_redeliveries = counter(
                "source_redeliveries_total",
                "Messages the broker delivered again (not acknowledged in time, or delivered "
                "to a daemon that crashed).",
                ["source"],
            )
            self.source_acks = counter(
                "source_acks_total",
                "Messages acknowledged to the broker: ack (nats: effect durable, or a "
                "duplicate of one that is; mqtt: in the pipeline) or term (can never decode; "
                "never redelivered).",
                ["source", "kind"],
            )
        if "nats" in self.sources:
            self.source_ack_lag = gauge(
                "source_ack_lag_seconds",
                "Age of the oldest frame from the source not yet acknowledged (0: none).",
                ["source"],
            )
        self.partitions = tuple(partitions)
        if self.partitions:  # an instance of a scaled-out deployment
            self.owned_partitions = gauge(
                "cluster_partitions_owned", "Partitions this instance consumes now."
            )
            self.partition_pending_messages = gauge(
                "cluster_partition_pending_messages",
                "Messages of an owned partition waiting in the frames stream, not yet "
                "delivered (its consumer's num_pending, every 5 s).",
                ["partition"],
            )
            self.partition_checkpoints = counter(
                "cluster_checkpoint_writes_total",
                "Partition checkpoints written to the JetStream key-value bucket "
                "(written) or not (failed: retried at the next checkpoint).",
                ["outcome"],
            )
            self.fencing_losses = counter(
                "cluster_fencing_losses_total",
                "Partitions given up because another instance wrote their checkpoint "
                "first (two instances with the same number, or one that outlived its "
                "replacement).",
            )
        if "nats" in self.sinks:  # (a broker that drops duplicates by id)
            self.sink_duplicates_total = counter(
                "sink_duplicates_total",
                "Moments the broker dropped as duplicates of ones it had stored (re-emitted "
                "after a restart).",
                ["sink"],
            )
        self.build = Info("enactive_build", "Build metadata; the value is always 1.", registry=r)
        self._queues = _QueueDepthCollector()
        r.register(self._queues)
        self._devices = _DeviceMemoryCollector()
        r.register(self._devices)
        if process_metrics:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
            PlatformCollector(registry=r)

        # Pre-bound children: the running configuration's label sets exist (at 0) from the
        # first scrape.
        self._received = {s: self.frames_received.labels(s) for s in self.sources}
        self._rejected = {
            (s, why): self.frames_rejected.labels(s, why) for s in self.sources for why in REASONS
        }
        self._dropped = {why: self.frames_dropped.labels(why) for why in DROP_REASONS}
        self._batches = {b: self.batches.labels(str(b)) for b in self.buckets}
        self._compile_s = {b: self.jit_compile_seconds.labels(str(b)) for b in self.buckets}
        self._bucket_ready = {b: self.bucket_ready.labels(str(b)) for b in self.buckets}
        for stage in STAGES:
            self.stage_latency.labels(stage)
        self._phase = {p: self.jit_compilations.labels(p) for p in PHASES}
        self._fallback_reasons: set[str] = set()
        self._emitted = {s: self.moments_emitted.labels(s) for s in self.sinks}
        self._sink_dropped = {
            (s, why): self.moments_dropped.labels(s, why)
            for s in self.sinks
            for why in SINK_DROP_REASONS
        }
        self._was_down: set[str] = set()
        for source in self.sources:
            self.source_up.labels(source).set(0 if source in LINKED_SOURCES else 1)
            self.source_sample_age.labels(source)
        for source in linked:
            self.source_disconnects.labels(source)
            self.source_reconnects.labels(source)
        for source in brokers:
            self.source_redeliveries.labels(source)
            for kind in ACK_KINDS:
                self.source_acks.labels(source, kind)
            if source == "nats":
                self.source_ack_lag.labels(source)
        if "nats" in self.sinks:
            self.sink_duplicates_total.labels("nats")
        for partition in self.partitions:
            self.partition_pending_messages.labels(str(partition))
        if self.partitions:
            for outcome in PARTITION_WRITES:
                self.partition_checkpoints.labels(outcome)
        self.ready.set(0)
        self.set_build_info(
            version=version or _version("enactive-stream"),
            jax=jax_version or _version("jax"),
            backend=backend,
        )

    # --- events (`PipelineEvents`) -----------------------------------------------------

    def received(self, source: str, n: int) -> None:
        """Counts `n` frames received from `source`."""
        child = self._received.get(source)
        if child is None:
            child = _other(self.frames_received, (source, self._known_sources))
        child.inc(n)

    def rejected(self, source: str, reason: str) -> None:
        """Counts one frame rejected from `source` for `reason` (one of `protocol.REASONS`)."""
        child = self._rejected.get((source, reason))
        if child is None:
            child = _other(self.frames_rejected, (source, self._known_sources), (reason, REASONS))
        child.inc()

    def dropped(self, reason: str, n: int) -> None:
        """Counts `n` well-formed frames dropped for `reason` (one of `DROP_REASONS`)."""
        child = self._dropped.get(reason)
        if child is None:
            child = _other(self.frames_dropped, (reason, DROP_REASONS))
        child.inc(n)

    def limited(self, listener: str, reason: str) -> None:
        """Counts one connection refused or closed by a limit (`LIMIT_REASONS`) of
        `listener` (`LISTENERS`). Rare: not cached."""
        self.connections_limited.labels(
            _known(listener, LISTENERS), _known(reason, LIMIT_REASONS)
        ).inc()

    def batch(self, bucket: int, rows: int, queue_s: np.ndarray, batch_wait_s: np.ndarray) -> None:
        """Records one batch of `rows` real frames padded to `bucket` rows. `queue_s`,
        `batch_wait_s`: float64 `(rows,)`, seconds, per frame: receipt to admission, and
        receipt to the batch leaving the batcher."""
        child = self._batches.get(bucket)
        if child is None:
            child = self.batches.labels(OTHER)
        child.inc()
        self.batch_fill.observe(rows / bucket if bucket > 0 else 0.0)
        self.stage_latency.observe(queue_s, "queue")
        self.stage_latency.observe(batch_wait_s, "batch_wait")

    def evicted(self, n: int) -> None:
        """Counts `n` stream states evicted from the slab."""
        self.evictions.inc(n)

    def expired(self, n: int) -> None:
        """Counts `n` idle streams forgotten."""
        self.expirations.inc(n)

    def restored(self, n: int) -> None:
        """Counts `n` stream states restored into the slab."""
        self.restores.inc(n)

    def checkpointed(self, seconds: float, positions: int) -> None:
        """Records one checkpoint that took `seconds` to write (`positions` is not a
        metric)."""
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)

    def checkpoint_failed(self, message: str) -> None:
        """Counts one checkpoint that could not be written (`message` is for the log)."""
        self.checkpoint_errors.inc()

    def moments(self, t: BatchTimes) -> None:
        """Records one batch's stage times and its moments' end-to-end latencies (one per
        processed frame)."""
        stage = self.stage_latency
        stage.observe(t.device_s, "device")
        stage.observe(t.integrate_s, "integrate")
        stage.observe(t.emit_s, "emit")
        self.end_to_end.observe(t.end_to_end_s)
        self.frames_processed.inc(int(np.size(t.end_to_end_s)))

    def emitted(self, sink: str, n: int) -> None:
        """Counts `n` moments delivered by `sink`."""
        child = self._emitted.get(sink)
        if child is None:
            child = _other(self.moments_emitted, (sink, self._known_sinks))
        child.inc(n)

    def sink_dropped(self, sink: str, reason: str, n: int) -> None:
        """Counts `n` moments `sink` could not take, for `reason` (`SINK_DROP_REASONS`)."""
        child = self._sink_dropped.get((sink, reason))
        if child is None:
            child = _other(
                self.moments_dropped, (sink, self._known_sinks), (reason, SINK_DROP_REASONS)
            )
        child.inc(n)

    def source_state(self, source: str, up: bool) -> None:
        """Sets `enactive_source_up`; counts a disconnection, and a reconnection after one."""
        self.source_up.labels(source).set(1 if up else 0)
        if source not in LINKED_SOURCES:
            return
        if not up and source not in self._was_down:
            self._was_down.add(source)
            self.source_disconnects.labels(source).inc()
        elif up and source in self._was_down:
            self._was_down.discard(source)
            self.source_reconnects.labels(source).inc()

    def source_redelivered(self, source: str, n: int) -> None:
        """Counts `n` messages `source`'s broker delivered again."""
        if source in BROKER_SOURCES:
            self.source_redeliveries.labels(source).inc(n)

    def source_acknowledged(self, source: str, kind: str, n: int) -> None:
        """Counts `n` messages acknowledged to `source`'s broker (`ACK_KINDS`)."""
        if source in BROKER_SOURCES and kind in ACK_KINDS:
            self.source_acks.labels(source, kind).inc(n)

    def sample_age(self, source: str, seconds: float) -> None:
        """Sets `enactive_source_sample_age_seconds`."""
        self.source_sample_age.labels(source).set(seconds)

    def partitions_owned(self, n: int) -> None:
        """Sets `enactive_cluster_partitions_owned`."""
        if self.partitions:
            self.owned_partitions.set(n)

    def partition_pending(self, partition: int, n: int) -> None:
        """Sets `enactive_cluster_partition_pending_messages{partition}` (owned ones)."""
        if partition in self.partitions:
            self.partition_pending_messages.labels(str(partition)).set(n)

    def partition_checkpoint(self, partition: int, outcome: str) -> None:
        """Counts a partition checkpoint's write, or a fencing loss."""
        if not self.partitions:
            return
        if outcome == "fenced":
            self.fencing_losses.inc()
        elif outcome in PARTITION_WRITES:
            self.partition_checkpoints.labels(outcome).inc()

    def sink_duplicates(self, sink: str, n: int) -> None:
        """Counts `n` moments the broker dropped as duplicates."""
        if sink == "nats" and "nats" in self.sinks:
            self.sink_duplicates_total.labels(sink).inc(n)

    # --- other observations ---------------------------------------------------------------

    def recorded(self, frames: int, size_bytes: int) -> None:
        """Counts `frames` written to the recording, which is now `size_bytes` long (called
        from the recorder's writer thread)."""
        if self.recorded_frames is not None and self.recording_bytes is not None:
            self.recorded_frames.inc(frames)
            self.recording_bytes.set(size_bytes)

    def observe_stage(self, stage: str, seconds: npt.ArrayLike) -> None:
        """Records the time spent in `stage` (one of `STAGES`): one value, or an array of
        one value per frame of a batch, in seconds."""
        self.stage_latency.observe(seconds, stage if stage in STAGES else OTHER)

    # --- lifecycle and state ------------------------------------------------------------

    def jit_fallback(self, processor: str, reason: str) -> None:
        """Counts one eager fallback of `processor` (one of `JIT_PROCESSORS`); `reason` is
        the failure's exception class name, e.g. `"XlaRuntimeError"`. Rare: not cached."""
        if reason not in self._fallback_reasons:
            if len(self._fallback_reasons) < MAX_FALLBACK_REASONS:
                self._fallback_reasons.add(reason)
            else:
                reason = OTHER
        self.jit_fallbacks.labels(_known(processor, JIT_PROCESSORS), reason).inc()

    def jit_compiled(self, phase: str, n: int = 1) -> None:
        """Counts `n` compilations in `phase` (`"warmup"` or `"runtime"`)."""
        child = self._phase.get(phase)
        if child is None:
            child = _other(self.jit_compilations, (phase, PHASES))
        child.inc(n)

    def set_compile_seconds(self, bucket: int, seconds: float) -> None:
        """Sets how long `bucket`'s executable took to compile."""
        child = self._compile_s.get(bucket)
        if child is None:
            child = self.jit_compile_seconds.labels(OTHER)
        child.set(seconds)

    def set_bucket_ready(self, bucket: int) -> None:
        """Sets `enactive_bucket_ready{bucket}` to 1: batches may use `bucket` now."""
        child = self._bucket_ready.get(bucket)
        if child is None:
            child = self.bucket_ready.labels(OTHER)
        child.set(1)

    def set_ready(self, ready: bool) -> None:
        """Sets `enactive_ready` to 1 or 0."""
        self.ready.set(1 if ready else 0)

    def set_build_info(self, *, version: str, jax: str, backend: str) -> None:
        """Sets the labels of `enactive_build_info` (e.g. once the JAX backend is known)."""
        self.build.info({"version": version, "jax": jax, "backend": backend})

    def watch_queue(self, stage: str, depth: Callable[[], int]) -> None:
        """Reports `depth()` as `enactive_queue_depth{stage}` at every scrape."""
        self._queues.watched[stage] = depth

    def unwatch_queue(self, stage: str) -> None:
        """Stops reporting `stage`'s queue depth."""
        self._queues.watched.pop(stage, None)

    def watch_devices(self, devices: Iterable[MemoryStatsDevice]) -> None:
        """Reports the memory of `devices` (the `jax.Device`s in use) as
        `enactive_device_memory_bytes{device, kind}` at every scrape, replacing any devices
        watched before. Devices whose `memory_stats()` returns None or raises (the CPU)
        have no series."""
        self._devices.devices = tuple(devices)

    def exposition(self) -> bytes:
        """Returns the registry in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)


def _known(value: str, known: Sequence[str]) -> str:
    return value if value in known else OTHER


_M = TypeVar("_M", Counter, Gauge)


def _other(metric: _M, *pairs: tuple[str, Sequence[str]]) -> _M:
    """The child for label values outside the known sets: each unknown one is `"other"`."""
    return metric.labels(*(_known(value, known) for value, known in pairs))


if TYPE_CHECKING:
    # mypy checks that `Metrics` implements every event, with the protocol's signature.
    _IMPLEMENTS: type[PipelineEvents] = Metrics
