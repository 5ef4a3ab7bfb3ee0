"""Metrics: names, types, initial label sets, scrape-time queue depths and device memory,
process and GC collectors, events."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from stream.config import EMBEDDED_DEFAULT_OVERRIDES, load_config
from stream.events import BatchTimes, PipelineEvents
from stream.metrics import (
    DROP_REASONS,
    LATENCY_BUCKETS,
    MAX_FALLBACK_REASONS,
    PHASES,
    SINK_DROP_REASONS,
    SINKS,
    SOURCES,
    STAGES,
    Metrics,
)
from stream.protocol import REASONS

BUCKETS = (1, 8, 64)
# The embedded default's shape: the TCP listener (binary `tcp` and JSON-lines `json`), UDP
# and the synthetic feed in; the TCP subscriber server out.
DEFAULT_SOURCES = ("tcp", "json", "udp", "synthetic")
DEFAULT_SINKS = ("tcp",)

# family name (as the parser reports it) -> type
EXPECTED = {
    "enactive_frames_received": "counter",
    "enactive_frames_rejected": "counter",
    "enactive_frames_dropped": "counter",
    "enactive_connections_limited": "counter",
    "enactive_frames_processed": "counter",
    "enactive_batches": "counter",
    "enactive_batch_fill_ratio": "histogram",
    "enactive_stage_latency_seconds": "histogram",
    "enactive_end_to_end_latency_seconds": "histogram",
    "enactive_jit_fallback": "counter",  # no series until the first fallback
    "enactive_jit_compilations": "counter",
    "enactive_jit_compile_seconds": "gauge",
    "enactive_bucket_ready": "gauge",
    "enactive_active_streams": "gauge",
    "enactive_known_streams": "gauge",
    "enactive_batch_max_wait_seconds": "gauge",
    "enactive_batch_max_size": "gauge",
    "enactive_queue_depth": "gauge",
    "enactive_ready": "gauge",
    "enactive_state_checkpoints": "counter",
    "enactive_state_checkpoint_errors": "counter",
    "enactive_state_evictions": "counter",
    "enactive_state_restores": "counter",
    "enactive_state_expirations": "counter",
    "enactive_state_unsaved_age_seconds": "gauge",
    "enactive_checkpoint_seconds": "histogram",
    "enactive_build_info": "gauge",  # an Info metric; the text format shows a gauge
    "enactive_moments_emitted": "counter",
    "enactive_moments_dropped": "counter",
    "enactive_subscribers": "gauge",
    "enactive_source_up": "gauge",
    "enactive_source_sample_age_seconds": "gauge",
    "enactive_source_disconnects": "counter",  # these two with nats, mqtt or lsl
    "enactive_source_reconnects": "counter",
    "enactive_source_redeliveries": "counter",  # these three with a broker that acks (nats)
    "enactive_source_acks": "counter",
    "enactive_source_ack_lag_seconds": "gauge",
    "enactive_sink_duplicates": "counter",  # with the nats sink
    "enactive_device_memory_bytes": "gauge",  # no series where the backend reports nothing
}
GPU_STATS = {"bytes_in_use": 3 << 30, "bytes_limit": 80 << 30, "peak_bytes_in_use": 5 << 30}


@dataclass
class FakeDevice:
    """A `jax.Device` stand-in: `memory_stats()` returns `stats`, or raises `error`."""

    id: int
    stats: Mapping[str, Any] | None = None
    error: Exception | None = None
    calls: list[int] = field(default_factory=list)

    def memory_stats(self) -> Mapping[str, Any] | None:
        self.calls.append(1)
        if self.error is not None:
            raise self.error
        return self.stats


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(
        registry,
        sources=SOURCES,
        sinks=SINKS,
        buckets=BUCKETS,
        version="1.2.3",
        jax_version="0.0.1",
        backend="cpu",
        process_metrics=False,
    )


def families(m: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(m.exposition().decode())}


def test_every_metric_present_with_its_type(metrics: Metrics) -> None:
    metrics.watch_queue("ingest", lambda: 0)
    metrics.watch_devices([FakeDevice(0, GPU_STATS)])
    found = families(metrics)
    for name, kind in EXPECTED.items():
        assert found.get(name) == kind, (name, found.get(name))
    assert all(name.startswith("enactive_") for name in found)


def test_exposition_sample_names(metrics: Metrics) -> None:
    text = metrics.exposition().decode()
    for sample in [
        "enactive_frames_received_total{",
        "enactive_frames_processed_total ",
        "enactive_end_to_end_latency_seconds_bucket{",
        "enactive_build_info{",
        "enactive_state_checkpoints_total ",
        "enactive_jit_compilations_total{",
    ]:
        assert sample in text, sample


def test_own_registry_by_default() -> None:
    a, b = Metrics(), Metrics()  # would clash with "Duplicated timeseries" on a shared one
    assert a.registry is not b.registry


def test_metrics_implements_pipeline_events(metrics: Metrics) -> None:
    events: PipelineEvents = metrics  # mypy (and `stream/metrics.py` itself) check this
    assert events is metrics


def test_known_label_sets_start_at_zero(registry: CollectorRegistry, metrics: Metrics) -> None:
    get = registry.get_sample_value
    for source in SOURCES:
        assert get("enactive_frames_received_total", {"source": source}) == 0
        for reason in REASONS:
            labels = {"source": source, "reason": reason}
            assert get("enactive_frames_rejected_total", labels) == 0
    for reason in DROP_REASONS:
        assert get("enactive_frames_dropped_total", {"reason": reason}) == 0
    for bucket in BUCKETS:
        assert get("enactive_batches_total", {"bucket": str(bucket)}) == 0
        assert get("enactive_jit_compile_seconds", {"bucket": str(bucket)}) == 0
        assert get("enactive_bucket_ready", {"bucket": str(bucket)}) == 0
    for phase in PHASES:
        assert get("enactive_jit_compilations_total", {"phase": phase}) == 0
    for stage in STAGES:
        assert get("enactive_stage_latency_seconds_count", {"stage": stage}) == 0
    for sink in SINKS:
        assert get("enactive_moments_emitted_total", {"sink": sink}) == 0
        for reason in SINK_DROP_REASONS:
            labels = {"sink": sink, "reason": reason}
            assert get("enactive_moments_dropped_total", labels) == 0
    assert get("enactive_ready") == 0
    assert get("enactive_frames_processed_total") == 0


def test_build_info(registry: CollectorRegistry, metrics: Metrics) -> None:
    labels = {"version": "1.2.3", "jax": "0.0.1", "backend": "cpu"}
    assert registry.get_sample_value("enactive_build_info", labels) == 1
    metrics.set_build_info(version="1.2.3", jax="0.0.1", backend="gpu")
    assert registry.get_sample_value("enactive_build_info", labels) is None
    assert registry.get_sample_value("enactive_build_info", {**labels, "backend": "gpu"}) == 1


def test_queue_depth_is_read_at_scrape_time(registry: CollectorRegistry, metrics: Metrics) -> None:
    depth = [3]
    metrics.watch_queue("ingest", lambda: depth[0])
    assert registry.get_sample_value("enactive_queue_depth", {"stage": "ingest"}) == 3
    depth[0] = 41
    assert registry.get_sample_value("enactive_queue_depth", {"stage": "ingest"}) == 41
    assert 'enactive_queue_depth{stage="ingest"} 41.0' in metrics.exposition().decode()
    metrics.unwatch_queue("ingest")
    assert registry.get_sample_value("enactive_queue_depth", {"stage": "ingest"}) is None


def test_failing_queue_callable_does_not_break_the_scrape(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    def gone() -> int:
        raise RuntimeError("queue closed")

    metrics.watch_queue("sink", gone)
    metrics.watch_queue("batch", lambda: 2)
    assert registry.get_sample_value("enactive_queue_depth", {"stage": "batch"}) == 2
    assert registry.get_sample_value("enactive_queue_depth", {"stage": "sink"}) is None


def test_device_memory_is_read_at_scrape_time(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    stats = dict(GPU_STATS)
    gpu = FakeDevice(0, stats)
    cpu = FakeDevice(1, None)  # what the CPU backend returns
    broken = FakeDevice(2, error=RuntimeError("memory_stats is not supported"))
    partial = FakeDevice(3, {"bytes_in_use": 7, "num_allocs": 2})  # no limit, no peak
    metrics.watch_devices([gpu, cpu, broken, partial])
    get = registry.get_sample_value
    name = "enactive_device_memory_bytes"
    assert get(name, {"device": "0", "kind": "in_use"}) == 3 << 30
    assert get(name, {"device": "0", "kind": "limit"}) == 80 << 30
    assert get(name, {"device": "0", "kind": "peak"}) == 5 << 30
    assert get(name, {"device": "3", "kind": "in_use"}) == 7
    stats["bytes_in_use"] = 4 << 30
    assert get(name, {"device": "0", "kind": "in_use"}) == 4 << 30
    text = metrics.exposition().decode()
    samples = [line for line in text.splitlines() if line.startswith(name + "{")]
    assert len(samples) == 4, samples  # 3 kinds for the GPU, 1 for the partial one
    assert not any(f'device="{d}"' in line for line in samples for d in ("1", "2"))
    assert cpu.calls and broken.calls  # asked at every scrape, and skipped


def test_no_device_memory_series_on_the_cpu(metrics: Metrics) -> None:
    metrics.watch_devices([FakeDevice(0, None), FakeDevice(1, {})])
    before = series(metrics)
    assert before["enactive_device_memory_bytes"] == 0
    metrics.watch_devices([FakeDevice(0, GPU_STATS)])  # replaces the devices watched
    assert series(metrics)["enactive_device_memory_bytes"] == 3


def test_process_and_gc_collectors() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, sources=("tcp",), sinks=("tcp",), buckets=(1,))
    found = families(m)
    assert found.get("python_gc_objects_collected") == "counter"
    assert found.get("python_gc_collections") == "counter"
    assert found.get("python_info") == "gauge"
    if Path("/proc/self/stat").exists():  # ProcessCollector reads /proc: Linux only
        assert registry.get_sample_value("process_resident_memory_bytes")
        assert registry.get_sample_value("process_cpu_seconds_total") is not None
        assert registry.get_sample_value("process_start_time_seconds")
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    # They add process and runtime series only: the `enactive_*` ones are the same.
    bare = Metrics(sources=("tcp",), sinks=("tcp",), buckets=(1,), process_metrics=False)
    own = {k: v for k, v in series(m).items() if k.startswith("enactive_")}
    assert own == series(bare)
    assert set(series(m)) - set(own) <= {
        *(f for f in found if f.startswith(("process_", "python_gc_"))),
        "python_info",
    }


def series(m: Metrics) -> dict[str, int]:
    """`{family: number of series}`: histograms count label sets, not their samples;
    `_created` samples (which the daemon turns off) are left out."""
    label_sets: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        if family.name.endswith("_created"):
            continue
        found = label_sets.setdefault(family.name, set())
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            found.add(tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le")))
    return {name: len(found) for name, found in label_sets.items()}


def test_series_of_the_embedded_default_shape() -> None:
    buckets = load_config(None, env={}, overrides=EMBEDDED_DEFAULT_OVERRIDES).batching.buckets
    m = Metrics(
        sources=DEFAULT_SOURCES, sinks=DEFAULT_SINKS, buckets=buckets, process_metrics=False
    )
    got = series(m)
    assert got == {
        "enactive_frames_received": len(DEFAULT_SOURCES),
        "enactive_frames_rejected": len(DEFAULT_SOURCES) * len(REASONS),
        "enactive_frames_dropped": len(DROP_REASONS),
        "enactive_frames_processed": 1,
        "enactive_batches": len(buckets),
        "enactive_batch_fill_ratio": 1,
        "enactive_stage_latency_seconds": len(STAGES),
        "enactive_end_to_end_latency_seconds": 1,
        "enactive_jit_fallback": 0,
        "enactive_jit_compilations": len(PHASES),
        "enactive_jit_compile_seconds": len(buckets),
        "enactive_bucket_ready": len(buckets),
        "enactive_active_streams": 1,
        "enactive_known_streams": 1,
        "enactive_source_up": len(DEFAULT_SOURCES),
        "enactive_source_sample_age_seconds": len(DEFAULT_SOURCES),
        "enactive_batch_max_wait_seconds": 1,
        "enactive_batch_max_size": 1,
        "enactive_ready": 1,
        "enactive_state_checkpoints": 1,
        "enactive_state_checkpoint_errors": 1,
        "enactive_checkpoint_seconds": 1,
        "enactive_state_evictions": 1,
        "enactive_state_restores": 1,
        "enactive_state_expirations": 1,
        "enactive_state_unsaved_age_seconds": 1,
        "enactive_moments_emitted": len(DEFAULT_SINKS),
        "enactive_moments_dropped": len(DEFAULT_SINKS) * len(SINK_DROP_REASONS),
        "enactive_subscribers": 1,
        "enactive_connections_limited": 0,  # at first use: few ever happen
        "enactive_build_info": 1,
        "enactive_queue_depth": 0,  # at scrape time, once the pipeline watches its queues
        "enactive_device_memory_bytes": 0,  # at scrape time, and only where reported (GPU)
    }
    assert (len(DEFAULT_SOURCES), len(REASONS), len(buckets)) == (4, 13, 8)
    assert sum(got.values()) == 121


def test_no_series_for_what_is_not_configured(registry: CollectorRegistry) -> None:
    m = Metrics(registry, sources=("tcp",), sinks=("jsonl",), buckets=(1,))
    text = m.exposition().decode()
    for name in ("udp", "json", "synthetic", "nats", "mqtt", "lsl", "replay", "other"):
        assert f'source="{name}"' not in text, name
    for name in ("tcp", "stdout", "nats", "mqtt", "other"):
        assert f'sink="{name}"' not in text, name
    assert 'reason="slow_sink"' not in text.split("enactive_moments_dropped_total")[0]
    rejected = Counter(
        s.labels["source"]
        for f in text_string_to_metric_families(text)
        if f.name == "enactive_frames_rejected"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert rejected == {"tcp": len(REASONS)}


def test_unconfigured_labels_appear_at_first_use(registry: CollectorRegistry) -> None:
    m = Metrics(registry, sources=("tcp",), sinks=("tcp",))
    get = registry.get_sample_value
    m.received("udp", 2)  # a label the code has, not pre-declared: its own series
    m.received("serial", 3)  # a label the code does not have: "other"
    m.rejected("json", "bad_json")
    m.emitted("stdout", 4)
    m.sink_dropped("kafka", "slow_sink", 5)
    assert get("enactive_frames_received_total", {"source": "udp"}) == 2
    assert get("enactive_frames_received_total", {"source": "other"}) == 3
    assert get("enactive_frames_received_total", {"source": "serial"}) is None
    assert get("enactive_frames_rejected_total", {"source": "json", "reason": "bad_json"}) == 1
    assert get("enactive_frames_rejected_total", {"source": "json", "reason": "oversize"}) is None
    assert get("enactive_moments_emitted_total", {"sink": "stdout"}) == 4
    assert get("enactive_moments_dropped_total", {"sink": "other", "reason": "slow_sink"}) == 5


def test_reject_counting(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.rejected("tcp", "bad_magic")
    metrics.rejected("tcp", "bad_magic")
    metrics.rejected("udp", "non_finite")
    get = registry.get_sample_value
    assert get("enactive_frames_rejected_total", {"source": "tcp", "reason": "bad_magic"}) == 2
    assert get("enactive_frames_rejected_total", {"source": "udp", "reason": "non_finite"}) == 1
    assert get("enactive_frames_rejected_total", {"source": "udp", "reason": "bad_magic"}) == 0


def test_unknown_label_values_fold_into_other(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    for i in range(50):
        metrics.rejected(f"weird-{i}", "bad_magic")
        metrics.rejected("tcp", f"why-{i}")
    get = registry.get_sample_value
    assert get("enactive_frames_rejected_total", {"source": "other", "reason": "bad_magic"}) == 50
    assert get("enactive_frames_rejected_total", {"source": "tcp", "reason": "other"}) == 50
    assert "weird-" not in metrics.exposition().decode()


def test_events(registry: CollectorRegistry, metrics: Metrics) -> None:
    get = registry.get_sample_value
    metrics.received("tcp", 5)
    metrics.dropped("overload", 2)
    metrics.batch(8, 2, np.array([1e-5, 0.003]), np.array([0.0004, 0.0004]))
    metrics.batch(8, 8, np.full(8, 10.0), np.full(8, 0.002))
    metrics.moments(BatchTimes(8, 0.0012, 0.0003, 0.00002, np.array([0.0009, 0.004])))
    metrics.moments(BatchTimes(8, 0.0012, 0.0003, 0.00002, np.array([0.006, 0.007, 0.008])))
    metrics.emitted("tcp", 3)
    metrics.sink_dropped("tcp", "slow_subscriber", 1)
    assert get("enactive_frames_received_total", {"source": "tcp"}) == 5
    assert get("enactive_frames_dropped_total", {"reason": "overload"}) == 2
    assert get("enactive_frames_processed_total") == 5  # one per moment
    assert get("enactive_batches_total", {"bucket": "8"}) == 2
    assert get("enactive_batch_fill_ratio_sum") == pytest.approx(1.25)
    assert get("enactive_batch_fill_ratio_bucket", {"le": "0.2"}) == 0
    assert get("enactive_batch_fill_ratio_bucket", {"le": "0.3"}) == 1
    assert get("enactive_stage_latency_seconds_count", {"stage": "queue"}) == 10
    assert get("enactive_stage_latency_seconds_bucket", {"stage": "queue", "le": "5.0"}) == 2
    assert get("enactive_stage_latency_seconds_count", {"stage": "batch_wait"}) == 10
    wait = {"stage": "batch_wait", "le": "0.0005"}
    assert get("enactive_stage_latency_seconds_bucket", wait) == 2
    assert get("enactive_stage_latency_seconds_sum", {"stage": "batch_wait"}) == pytest.approx(
        0.0008 + 0.016
    )
    assert get("enactive_stage_latency_seconds_bucket", {"stage": "device", "le": "0.001"}) == 0
    assert get("enactive_stage_latency_seconds_bucket", {"stage": "device", "le": "0.002"}) == 2
    assert get("enactive_stage_latency_seconds_count", {"stage": "integrate"}) == 2
    assert get("enactive_stage_latency_seconds_bucket", {"stage": "emit", "le": "5e-05"}) == 2
    assert get("enactive_end_to_end_latency_seconds_bucket", {"le": "0.001"}) == 1
    assert get("enactive_end_to_end_latency_seconds_count") == 5
    assert get("enactive_moments_emitted_total", {"sink": "tcp"}) == 3
    labels = {"sink": "tcp", "reason": "slow_subscriber"}
    assert get("enactive_moments_dropped_total", labels) == 1


def test_observe_stage(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_stage("device", 0.0012)
    metrics.observe_stage("queue", [1e-5, 0.003, 10.0])
    metrics.observe_stage("elsewhere", 0.5)
    get = registry.get_sample_value
    assert get("enactive_stage_latency_seconds_count", {"stage": "device"}) == 1
    assert get("enactive_stage_latency_seconds_count", {"stage": "queue"}) == 3
    assert get("enactive_stage_latency_seconds_count", {"stage": "other"}) == 1


def test_lifecycle_helpers(registry: CollectorRegistry, metrics: Metrics) -> None:
    get = registry.get_sample_value
    metrics.jit_compiled("warmup", 3)
    metrics.jit_compiled("background", 2)
    metrics.jit_fallback("slab_step", "XlaRuntimeError")
    metrics.set_compile_seconds(64, 1.5)
    metrics.set_bucket_ready(64)
    metrics.checkpointed(0.02, 3)
    metrics.checkpoint_failed("disk full")
    metrics.checkpoint_failed("disk full")
    metrics.evicted(4)
    metrics.restored(1)
    metrics.set_ready(True)
    metrics.active_streams.set(12)
    metrics.subscribers.set(2)
    assert get("enactive_jit_compilations_total", {"phase": "warmup"}) == 3
    assert get("enactive_jit_compilations_total", {"phase": "background"}) == 2
    assert get("enactive_jit_compilations_total", {"phase": "runtime"}) == 0
    assert get("enactive_bucket_ready", {"bucket": "64"}) == 1
    assert get("enactive_bucket_ready", {"bucket": "8"}) == 0
    labels = {"processor": "slab_step", "reason": "XlaRuntimeError"}
    assert get("enactive_jit_fallback_total", labels) == 1
    assert get("enactive_jit_compile_seconds", {"bucket": "64"}) == 1.5
    assert get("enactive_state_checkpoints_total") == 1
    assert get("enactive_checkpoint_seconds_count") == 1
    assert get("enactive_state_checkpoint_errors_total") == 2
    assert get("enactive_state_evictions_total") == 4
    assert get("enactive_state_restores_total") == 1
    assert get("enactive_ready") == 1
    assert get("enactive_active_streams") == 12
    assert get("enactive_subscribers") == 2
    metrics.set_ready(False)
    assert get("enactive_ready") == 0


def test_fallback_reasons_are_capped(registry: CollectorRegistry, metrics: Metrics) -> None:
    for i in range(MAX_FALLBACK_REASONS + 5):
        metrics.jit_fallback("slab_step", f"Error{i}")
    metrics.jit_fallback("mystery", "Error0")
    get = registry.get_sample_value
    assert get("enactive_jit_fallback_total", {"processor": "slab_step", "reason": "Error0"}) == 1
    last = {"processor": "slab_step", "reason": f"Error{MAX_FALLBACK_REASONS - 1}"}
    assert get("enactive_jit_fallback_total", last) == 1
    assert get("enactive_jit_fallback_total", {"processor": "slab_step", "reason": "other"}) == 5
    assert get("enactive_jit_fallback_total", {"processor": "other", "reason": "Error0"}) == 1


def test_latency_buckets_span_50us_to_5s() -> None:
    assert LATENCY_BUCKETS[0] == 50e-6
    assert LATENCY_BUCKETS[-1] == 5.0
    assert 15 <= len(LATENCY_BUCKETS) <= 22
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS)]
    assert max(ratios) <= 2.5  # roughly log-spaced: no coarse gaps


def test_no_stream_label_anywhere(metrics: Metrics) -> None:
    metrics.watch_queue("ingest", lambda: 1)
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            assert not {"stream", "stream_id", "host", "instance"} & set(sample.labels)


def test_docs_describe_every_metric(metrics: Metrics) -> None:
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    metrics.watch_queue("ingest", lambda: 0)
    metrics.watch_devices([FakeDevice(0, GPU_STATS)])
    metrics.jit_fallback("slab_step", "XlaRuntimeError")
    metrics.limited("ingest.tcp", "idle_timeout")
    names = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if not sample.name.endswith(("_created", "_bucket", "_count", "_sum")):
                names.add(sample.name)
            elif family.type == "histogram":
                names.add(family.name)
    assert len(names) == len(EXPECTED)
    for name in names:
        assert f"### `{name}" in docs, name
    for prefix in ("process_", "python_gc_", "python_info"):
        assert f"`{prefix}" in docs, prefix


def test_recording_series_exist_only_while_recording() -> None:
    assert "enactive_recorded_frames" not in series(Metrics(process_metrics=False))
    registry = CollectorRegistry()
    m = Metrics(registry, recording=True, process_metrics=False)
    get = registry.get_sample_value
    assert (get("enactive_recorded_frames_total"), get("enactive_recording_bytes")) == (0, 0)
    m.recorded(64, 4096)
    m.recorded(2, 4200)
    assert (get("enactive_recorded_frames_total"), get("enactive_recording_bytes")) == (66, 4200)
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    for name in ("enactive_recorded_frames_total", "enactive_recording_bytes"):
        assert f"### `{name}`" in docs, name


def test_cluster_series_exist_only_for_a_cluster_instance() -> None:
    assert "enactive_cluster" not in series(Metrics(process_metrics=False))
    registry = CollectorRegistry()
    m = Metrics(registry, partitions=(1, 4, 7), process_metrics=False)
    get = registry.get_sample_value
    assert get("enactive_cluster_partition_pending_messages", {"partition": "4"}) == 0
    assert get("enactive_cluster_checkpoint_writes_total", {"outcome": "failed"}) == 0
    m.partitions_owned(3)
    m.partition_pending(4, 120)
    m.partition_pending(5, 9)  # not owned: no series
    m.partition_checkpoint(1, "written")
    m.partition_checkpoint(7, "fenced")
    m.partitions_owned(2)
    assert get("enactive_cluster_partitions_owned") == 2
    assert get("enactive_cluster_partition_pending_messages", {"partition": "4"}) == 120
    assert get("enactive_cluster_partition_pending_messages", {"partition": "5"}) is None
    assert get("enactive_cluster_checkpoint_writes_total", {"outcome": "written"}) == 1
    assert get("enactive_cluster_fencing_losses_total") == 1
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    names = {
        sample.name
        for family in text_string_to_metric_families(m.exposition().decode())
        for sample in family.samples
        if sample.name.startswith("enactive_cluster") and not sample.name.endswith("_created")
    }
    assert len(names) == 4
    for name in names:
        assert f"### `{name}" in docs, name
