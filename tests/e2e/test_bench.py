"""`enactive-stream bench`: the pure pieces, and a tiny run of the whole thing."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream.bench import BenchSettings, daemon_config, evaluate_targets, format_table, run_bench
from stream.bench.client import ClientError, ClientSpec, _latencies, _paced
from stream.bench.fleet import FleetSpec, _groups
from stream.bench.kernel import format_table as kernel_table
from stream.bench.kernel import main as kernel_main
from stream.bench.kernel import run_kernel_bench, run_paced_steps
from stream.bench.measure import combine_latency_runs, rounds_for
from stream.bench.probe import Snapshot, daemon_delta, histogram_quantile
from stream.bench.runner import MODEL_KEYS, model_shapes
from stream.bench.scenarios import (
    batches_per_s,
    format_paced_table,
    paced_step_cpu_us_per_frame,
    run_fleet_bench,
    step_cpu_us_per_frame,
)
from stream.bench.settings import SCENARIOS, FleetSettings
from stream.bench.stats import cdf, growth_pct, late_growth_pct, median, percentiles
from stream.bench.wire import (
    FrameBlock,
    frame_bytes,
    moment_record_bytes,
    parse_records,
    receipt_times,
    stream_ids,
)
from stream.config import load_config
from stream.protocol import (
    Dims,
    Moment,
    MomentSizes,
    decode_frame,
    encode_frame,
    encode_moment,
)

DIMS = Dims(8, 6, 4, 3)
SIZES = MomentSizes(8, 8, 6, 3)


# -- record-size arithmetic and pre-encoded frames ------------------------------------------


@pytest.mark.parametrize("sid", ["a", "ab", "abc", "abcd", "b-00000", "b-123456", "x" * 255])
def test_frame_and_record_sizes_match_the_codec(sid: str) -> None:
    values = {
        name: np.ones(n, np.float32)
        for name, n in zip(("sensory", "proprio", "tactile", "motor"), DIMS, strict=True)
    }
    assert frame_bytes(len(sid), DIMS) == len(encode_frame(sid, 1, 0.0, **values))
    moment = Moment(sid, 1, 0.0, 0, 0, SIZES, np.zeros(SIZES.total, np.float32))
    assert moment_record_bytes(len(sid), SIZES) == len(encode_moment(moment))


def test_default_model_record_sizes() -> None:
    # Default dims (D=32, P=64, T=32, M=32, K=32) with 7-byte ids: 688-byte frames and
    # 708-byte moments, 8 bytes of header padding included.
    assert frame_bytes(7, Dims(32, 64, 32, 32)) == 40 + 8 + 4 * 160
    assert moment_record_bytes(7, MomentSizes(32, 32, 64, 32)) == 48 + 8 + 4 * 163 == 708


def test_stream_ids_have_equal_length() -> None:
    ids = stream_ids(1024)
    assert ids[0] == "b-00000" and ids[-1] == "b-01023"
    assert {len(i) for i in stream_ids(123_456, "s")} == {7}
    with pytest.raises(ValueError):
        stream_ids(0)


def test_frame_block_rows_decode_to_the_expected_frames() -> None:
    ids = stream_ids(3)
    block = FrameBlock(ids, 4, DIMS, first_seq=10, seed=1)
    assert len(block) == 12 and block.data.shape == (12, frame_bytes(7, DIMS))
    block.timestamp[5] = 1.25
    block.seq[11] += np.uint64(100)
    for row in range(12):
        frame = decode_frame(block.data[row].tobytes(), DIMS)
        assert frame.stream_id == ids[row % 3]
        assert frame.seq == 10 + row // 3 + (100 if row == 11 else 0)
        assert frame.timestamp == (1.25 if row == 5 else 0.0)
        np.testing.assert_array_equal(frame.payload, block.payload(row))
    assert not np.array_equal(block.payload(0), block.payload(1))  # random payloads
    assert bytes(block.bytes_view()) == block.data.tobytes()


def test_frame_block_rejects_ids_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="same UTF-8 length"):
        FrameBlock(["a-1", "a-10"], 1, DIMS)


def _records(n: int, sid_base: str = "b-") -> bytes:
    values = np.ones(SIZES.total, np.float32)
    return b"".join(
        encode_moment(Moment(f"{sid_base}{i:05d}", 100 + i, 0.5 * i, 1000 * i, 0, SIZES, values))
        for i in range(n)
    )


def test_parse_records_reads_every_fixed_offset_field() -> None:
    data = _records(5)
    size = moment_record_bytes(7, SIZES)
    assert len(data) == 5 * size
    fields = parse_records(bytearray(data), size, 5)
    np.testing.assert_array_equal(fields["timestamp"], 0.5 * np.arange(5))
    np.testing.assert_array_equal(fields["latency_ns"], 1000 * np.arange(5))
    np.testing.assert_array_equal(fields["seq"], 100 + np.arange(5))


def test_parse_records_refuses_records_of_another_size() -> None:
    data = _records(2) + _records(1, "bbb-")  # a 9-byte id pads to 12: a longer record
    size = moment_record_bytes(7, SIZES)
    with pytest.raises(ValueError):
        parse_records(bytearray(data), size, 3)


def test_receipt_times_take_the_recv_that_completed_each_record() -> None:
    # Records of 10 bytes; recvs ending at 5, 25, 30, 42 bytes.
    times = receipt_times([5, 25, 30, 42], [1.0, 2.0, 3.0, 4.0], 10, 4)
    np.testing.assert_array_equal(times, [2.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError):
        receipt_times([5, 25], [1.0, 2.0], 10, 3)


# -- statistics and arithmetic ---------------------------------------------------------------


def test_percentiles_are_ordered_and_exact_on_a_known_sample() -> None:
    p = percentiles(np.arange(1, 101), scale=2.0)
    assert p["p50"] == pytest.approx(101.0)
    assert p["p99"] == pytest.approx(2 * 99.01)
    assert p["min"] == 2.0 and p["max"] == 200.0 and p["mean"] == pytest.approx(101.0)
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["p99.9"] <= p["max"]
    with pytest.raises(ValueError):
        percentiles([])


def test_cdf_is_monotone_and_reaches_the_maximum() -> None:
    x = np.random.default_rng(0).exponential(size=10_000)
    c = cdf(x, scale=1e3)
    assert len(c["x"]) == len(c["p"]) and c["p"][0] == 0.0 and c["p"][-1] == 1.0
    assert np.all(np.diff(c["x"]) >= 0) and np.all(np.diff(c["p"]) > 0)
    assert c["x"][-1] == pytest.approx(1e3 * x.max())
    assert c["x"][0] == pytest.approx(1e3 * x.min())


def test_growth_and_median() -> None:
    assert growth_pct(200, 210) == pytest.approx(5.0)
    assert growth_pct(200, 190) == pytest.approx(-5.0)
    assert median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        growth_pct(0, 1)
    assert late_growth_pct([100, 110, 110, 110]) == pytest.approx(0.0)  # levelled off
    assert late_growth_pct([100, 101, 105, 120]) == pytest.approx(100 * (120 - 101) / 101)
    assert late_growth_pct([100]) is None


@pytest.mark.parametrize(("frames", "streams"), [(1, 1024), (1_000_000, 1024), (5000, 32)])
def test_rounds_cover_the_frames_in_small_blocks(frames: int, streams: int) -> None:
    rounds, repeats = rounds_for(frames, streams)
    assert rounds <= 64
    assert rounds * repeats * streams >= frames
    assert rounds * repeats < math.ceil(frames / streams) + repeats  # no more than needed


def test_paced_sender_sends_every_frame_once_on_schedule() -> None:
    block = FrameBlock(stream_ids(4), 5, DIMS, first_seq=1)  # 20 frames, sent twice
    sent: list[tuple[int, int, int, float]] = []

    def send(i: int, j: int) -> None:
        sent.append((i, j, int(block.seq[i]), float(block.timestamp[i])))

    t0 = time.perf_counter()
    end, _ = _paced(block, 2, 8000.0, t0, 0.001, send)  # 40 frames at 8/ms: 5 ticks
    assert sum(j - i for i, j, _, _ in sent) == 40
    assert [s[0] for s in sent] == [0, 8, 16, 0, 4, 12]
    assert [s[1] for s in sent] == [8, 16, 20, 4, 12, 20]
    # The block's second pass carries the next 5 rounds' seq; stamps are the tick times.
    assert [s[2] for s in sent] == [1, 3, 5, 6, 7, 9]
    assert block.seq[0] == 6
    stamps = [s[3] for s in sent]
    assert stamps[0] == pytest.approx(t0) and stamps == sorted(stamps)
    assert end >= t0 + 0.004


def _run(p50: float, p99: float, mx: float) -> dict[str, Any]:
    lat = {"p50": p50, "p90": p50, "p99": p99, "p99.9": p99, "min": 0.1, "max": mx, "mean": p50}
    return {
        "frames": 10,
        "measured_frames": 8,
        "sent_frames_per_s": p50,
        "max_send_lag_ms": mx,
        "latency_ms": lat,
        "server_latency_ms": lat,
        "cdf_ms": {"x": [p99], "p": [1.0]},
    }


def test_latency_runs_combine_by_median_and_keep_the_extremes() -> None:
    out = combine_latency_runs([_run(1.0, 90.0, 100.0), _run(2.0, 3.0, 4.0), _run(3.0, 5.0, 6.0)])
    assert out["runs"] == 3 and out["frames"] == 30 and out["measured_frames"] == 24
    assert out["latency_ms"]["p50"] == 2.0 and out["latency_ms"]["p99"] == 5.0
    assert out["latency_ms"]["max"] == 100.0 and out["latency_ms"]["min"] == 0.1
    assert out["latency_ms"]["mean"] == pytest.approx(2.0)
    assert out["runs_p99_ms"] == [90.0, 3.0, 5.0]
    assert out["cdf_ms"]["x"] == [5.0]  # the run with the median p99
    assert out["max_send_lag_ms"] == 100.0 and out["sent_frames_per_s"] == 2.0
    with pytest.raises(ValueError):
        combine_latency_runs([])


def test_latency_leaves_out_the_frames_due_in_the_warm_up() -> None:
    # Records stamped 0, 0.5, …, 2.0 s, all received at 10 s: latencies 10 s … 8 s.
    data = bytearray(_records(5))
    size = moment_record_bytes(7, SIZES)
    spec = ClientSpec("latency", 1, streams=5, record_bytes=size, rate=1.0, warmup_s=1.0)
    out: dict[str, Any] = {}
    _latencies(out, data, [len(data)], [10.0], spec, measured_from=1.0)
    assert out["measured_frames"] == 3  # stamped 1.0, 1.5 and 2.0
    assert out["latency_ms"]["max"] == pytest.approx(9000.0)
    assert out["latency_ms"]["min"] == pytest.approx(8000.0)
    assert out["server_latency_ms"]["min"] == pytest.approx(2000 * 1e-6)  # latency_ns 2000
    with pytest.raises(ClientError, match="warm-up"):
        _latencies({}, data, [len(data)], [10.0], spec, measured_from=3.0)


def test_client_spec_validation() -> None:
    with pytest.raises(ValueError):
        ClientSpec(mode="nope", ingest_port=1)
    with pytest.raises(ValueError):
        ClientSpec(mode="latency", ingest_port=1, record_bytes=100, rate=0.0)
    with pytest.raises(ValueError):
        ClientSpec(mode="throughput", ingest_port=1, record_bytes=0)
    with pytest.raises(ValueError, match="warmup_s"):
        ClientSpec(mode="latency", ingest_port=1, record_bytes=1, rate=1.0, warmup_s=-1.0)
    assert ClientSpec("udp", 1, streams=10, rounds=3, repeats=2, rate=1.0).frames == 60


def test_settings_validation_and_quick() -> None:
    quick = BenchSettings.quick(streams=2000)
    assert quick.streams == 2000 and quick.runs >= 3 and quick.soak_frames < 1_000_000
    assert BenchSettings().runs >= 3 and BenchSettings().soak_frames == 1_000_000
    with pytest.raises(ValueError):
        BenchSettings(loads=(0.5, 1.5))
    with pytest.raises(ValueError):
        BenchSettings(streams=0)


def test_daemon_config_is_valid_and_as_asked(tmp_path: Path) -> None:
    settings = BenchSettings(streams=5000, model={"state_dim": 8, "som_grid": (3, 3)})
    path = tmp_path / "d.toml"
    path.write_text(daemon_config(settings, tmp_path / "state", str(tmp_path / "cache")))
    cfg = load_config(path, env={})
    assert cfg.batching.buckets == (1, 8, 32, 64, 96, 128, 192, 256)
    assert cfg.state.max_streams >= 5000
    assert cfg.log.status_interval_s == 0
    assert cfg.state.dir == str(tmp_path / "state")
    assert cfg.device.compilation_cache_dir == str(tmp_path / "cache")
    assert cfg.model.state_dim == 8 and cfg.model.som_grid == (3, 3)
    assert cfg.ingest.tcp.endswith(":0") and cfg.output.tcp.endswith(":0")
    # The benchmark's subscriber is bounded by its moments, not cut off as a slow consumer
    # before its buffer is full (a daemon on a GPU outran it by more than the default 8 MiB).
    _, _, sizes, _ = model_shapes(BenchSettings())
    record = moment_record_bytes(len(stream_ids(BenchSettings().streams)[0]), sizes)
    assert cfg.output.subscriber_max_pending_bytes >= cfg.output.subscriber_buffer * record


# -- the whole benchmark, tiny ---------------------------------------------------------------

LATENCY_KEYS = {"p50", "p90", "p99", "p99.9", "min", "max", "mean"}
LOAD_KEYS = {
    "fraction",
    "offered_frames_per_s",
    "sent_frames_per_s",
    "frames",
    "measured_frames",
    "max_send_lag_ms",
    "latency_ms",
    "server_latency_ms",
    "cdf_ms",
    "stage_mean_ms",
    "runs",
    "runs_p99_ms",
}
TOP_KEYS = {
    "schema",
    "machine",
    "settings",
    "model",
    "record_bytes",
    "cache_dir",
    "kernel",
    "e2e",
    "latency",
    "baseline",
    "compilations",
    "restart",
    "memory",
    "overload",
    "targets",
    "elapsed_s",
}


def _check_load(load: dict[str, Any]) -> None:
    assert set(load) == LOAD_KEYS
    for key in ("latency_ms", "server_latency_ms"):
        lat = load[key]
        assert set(lat) == LATENCY_KEYS
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    cdf_x = load["cdf_ms"]["x"]  # from one of the runs: within the extremes of all of them
    assert load["latency_ms"]["min"] <= cdf_x[0] <= cdf_x[-1] <= load["latency_ms"]["max"]
    assert load["runs"] == len(load["runs_p99_ms"]) == 2
    assert load["offered_frames_per_s"] > 0 and 0 < load["measured_frames"] < load["frames"]


# -- the kernel bench --------------------------------------------------------------------


def test_kernel_bench_smoke(small_config: Any) -> None:
    rows = run_kernel_bench(small_config, (4,), repeats=1, min_time=0.0, eager_frames=1)
    assert [r["bucket"] for r in rows] == [4]
    for r in rows:
        assert all(v > 0 for v in r.values()), r
        assert r["compiled_frames_per_s"] == pytest.approx(
            r["bucket"] * 1e6 / r["compiled_step_us"]
        )
        assert r["speedup"] == pytest.approx(r["compiled_frames_per_s"] / r["eager_frames_per_s"])
    assert kernel_table(rows).count("\n") == 2


def test_paced_step_smoke(small_config: Any) -> None:
    rows = run_paced_steps(small_config, [(4, 400.0), (1, 100.0)], duration_s=0.05, min_calls=5)
    assert [(r["bucket"], r["batches_per_s"], r["calls"]) for r in rows] == [
        (4, 400.0, 20),  # 400/s × 0.05 s
        (1, 100.0, 5),  # at least min_calls
    ]
    for r in rows:
        assert all(v > 0 for v in r.values()), r
        assert r["cpu_us_per_frame"] == pytest.approx(1e6 * r["cpu_s"] / (r["calls"] * r["bucket"]))
        assert r["caller_cpu_us_per_frame"] <= r["cpu_us_per_frame"] * 1.001
        assert r["wall_s"] >= r["calls"] / r["batches_per_s"] * 0.99  # paced, not a tight loop
    with pytest.raises(ValueError):
        run_paced_steps(small_config, [(4, 0.0)])


def test_kernel_bench_runs_alone_from_the_command_line() -> None:
    # `-W error`: runpy warns when the package imports the module it is asked to run.
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "stream.bench.kernel", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "python -m stream.bench.kernel" in proc.stdout


def test_kernel_bench_measures_the_buckets_asked(tmp_path: Path) -> None:
    out = tmp_path / "kernel.json"
    assert kernel_main(["--quick", "--buckets", "2,3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["bucket"] for r in result["results"]] == [2, 3]
    assert result["settings"]["buckets"] == [2, 3]
    with pytest.raises(SystemExit) as bad:  # argparse: one line on stderr
        kernel_main(["--buckets", "0"])
    assert bad.value.code == 2


@pytest.mark.timeout(120)
def test_tiny_bench_end_to_end(
    tmp_path: Path, compilation_cache: str, small_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = {k: getattr(small_config, k) for k in MODEL_KEYS}
    model["som_grid"] = tuple(small_config.som_grid)
    settings = BenchSettings(
        streams=32,
        rounds=6,
        runs=3,
        warmup_rounds=2,
        loads=(0.25, 0.5),
        latency_s=0.3,
        latency_warmup_s=0.1,
        latency_runs=2,
        soak_frames=2000,
        overload_s=0.3,
        baseline_rounds=3,
        baseline_runs=3,
        buckets=(1, 8, 64),
        kernel_buckets=(1, 8),
        kernel_repeats=1,
        kernel_min_time=0.01,
        kernel_eager_frames=1,
        model=model,
        cache_dir=compilation_cache,
        timeout_s=30.0,
    )
    lines: list[str] = []
    result = run_bench(settings, log=lines.append)
    result = json.loads(json.dumps(result))  # JSON-ready, as `--json` writes it

    assert set(result) == TOP_KEYS
    assert result["model"]["state_dim"] == 8 and result["record_bytes"] == 48 + 8 + 4 * 28
    kernel = result["kernel"]
    assert [r["bucket"] for r in kernel["buckets"]] == [1, 8]
    assert kernel["ceiling_frames_per_s"] == max(
        r["compiled_frames_per_s"] for r in kernel["buckets"]
    )

    e2e = result["e2e"]
    assert e2e["frames_per_s"] > 0 and len(e2e["runs_frames_per_s"]) == 3
    assert e2e["frames_per_s"] == median(e2e["runs_frames_per_s"])
    assert e2e["frames_per_run"] == 32 * 6 and e2e["streams"] == 32
    assert e2e["ratio_to_ceiling"] == pytest.approx(
        e2e["frames_per_s"] / kernel["ceiling_frames_per_s"]
    )
    assert sum(e2e["batches_by_bucket"].values()) > 0
    assert [load["fraction"] for load in result["latency"]["loads"]] == [0.25, 0.5]
    for load in result["latency"]["loads"]:
        _check_load(load)
        stages = load["stage_mean_ms"]
        assert stages["device"] > 0 and stages["end_to_end"] > 0
        assert 0 < stages["batch_fill"] <= 1

    base = result["baseline"]
    assert base["frames_per_s"] > 0 and len(base["runs_frames_per_s"]) == 3
    assert base["ratio"] == pytest.approx(e2e["frames_per_s"] / base["frames_per_s"])
    for load in base["latency"]:
        _check_load(load)
        assert load["stage_mean_ms"] == {}

    assert result["compilations"]["runtime"] == 0
    assert result["compilations"]["warmup_first_start"] > 0
    restart = result["restart"]
    assert 0 < restart["warm_restart_s"] < 60 and 0 < restart["first_start_s"] < 120
    assert restart["exit_status"] == 0

    memory = result["memory"]
    assert memory["rss_after_warmup_bytes"] > 10 << 20
    assert memory["frames"] >= 2000
    assert memory["growth_pct"] == pytest.approx(
        growth_pct(memory["rss_after_warmup_bytes"], memory["rss_after_frames_bytes"])
    )

    over = result["overload"]
    assert over["balanced"]
    assert over["received"] == over["processed"] + over["rejected"] + over["dropped"]
    assert 0 < over["received"] <= over["sent_frames"]
    assert over["rss_peak_bytes"] >= over["rss_before_bytes"]
    assert over["rss_full_load_bytes"] == memory["rss_after_warmup_bytes"]
    assert over["rss_growth_pct"] == pytest.approx(
        growth_pct(over["rss_full_load_bytes"], over["rss_peak_bytes"])
    )

    targets = result["targets"]
    assert targets["runtime_compilations"]["met"] is True
    assert all(isinstance(t["met"], bool) for t in targets.values())

    table = format_table(result)
    for title in ("Kernel", "Throughput", "Latency", "Targets", "warm restart"):
        assert title in table
    assert any("daemon ready" in line for line in lines)

    from stream.bench import write_plot

    png = tmp_path / "bench.png"
    write_plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_compare_against_their_bounds() -> None:
    load = {"fraction": 0.5, "latency_ms": {"p99": 4.0}}
    result = {
        "e2e": {"ratio_to_ceiling": 0.7},
        "latency": {"loads": [{"fraction": 0.25, "latency_ms": {"p99": 1.0}}, load]},
        "baseline": {"ratio": 10.0, "latency": [{"fraction": 0.5, "latency_ms": {"p99": 8.0}}]},
        "compilations": {"runtime": 0},
        "restart": {"warm_restart_s": 3.5},
        "memory": {"growth_pct": -1.0},
        "overload": {"dropped_overload": 5, "balanced": True, "rss_growth_pct": 1.0},
    }
    t = evaluate_targets(result)
    assert t["e2e_vs_kernel_ceiling"]["met"] is True
    assert t["p99_at_half_load_ms"]["value"] == 4.0 and t["p99_at_half_load_ms"]["met"]
    assert t["throughput_vs_baseline"]["met"] is False
    assert t["p99_vs_baseline"]["value"] == 0.5 and t["p99_vs_baseline"]["met"]
    assert t["warm_restart_s"]["met"] is False
    assert t["overload_shed_and_counted"]["met"] is True
    result["baseline"] = None
    result["overload"]["balanced"] = False
    t = evaluate_targets(result)
    assert t["throughput_vs_baseline"]["met"] is None
    assert t["overload_shed_and_counted"]["met"] is False
    assert math.isfinite(t["rss_growth_pct"]["value"])


# -- the fleet scenarios -------------------------------------------------------------------

METRICS_BEFORE = """\
enactive_frames_processed_total 100.0
enactive_frames_received_total{source="tcp"} 100.0
enactive_frames_received_total{source="udp"} 0.0
enactive_batches_total{bucket="1"} 10.0
enactive_batches_total{bucket="8"} 5.0
enactive_batch_fill_ratio_bucket{le="0.5"} 5.0
enactive_batch_fill_ratio_bucket{le="1.0"} 15.0
enactive_batch_fill_ratio_bucket{le="+Inf"} 15.0
enactive_batch_fill_ratio_count 15.0
enactive_batch_fill_ratio_sum 12.0
enactive_end_to_end_latency_seconds_bucket{le="0.001"} 50.0
enactive_end_to_end_latency_seconds_bucket{le="0.002"} 100.0
enactive_end_to_end_latency_seconds_bucket{le="+Inf"} 100.0
enactive_end_to_end_latency_seconds_count 100.0
enactive_end_to_end_latency_seconds_sum 0.1
"""
METRICS_AFTER = """\
enactive_frames_processed_total 1100.0
enactive_frames_received_total{source="tcp"} 600.0
enactive_frames_received_total{source="udp"} 500.0
enactive_batches_total{bucket="1"} 10.0
enactive_batches_total{bucket="8"} 130.0
enactive_batch_fill_ratio_bucket{le="0.5"} 5.0
enactive_batch_fill_ratio_bucket{le="1.0"} 140.0
enactive_batch_fill_ratio_bucket{le="+Inf"} 140.0
enactive_batch_fill_ratio_count 140.0
enactive_batch_fill_ratio_sum 137.0
enactive_end_to_end_latency_seconds_bucket{le="0.001"} 550.0
enactive_end_to_end_latency_seconds_bucket{le="0.002"} 1050.0
enactive_end_to_end_latency_seconds_bucket{le="+Inf"} 1100.0
enactive_end_to_end_latency_seconds_count 1100.0
enactive_end_to_end_latency_seconds_sum 1.6
"""


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    bounds, counts = [0.001, 0.002, math.inf], [500.0, 950.0, 1000.0]
    assert histogram_quantile(bounds, counts, 0.5) == pytest.approx(0.001)
    assert histogram_quantile(bounds, counts, 0.25) == pytest.approx(0.0005)
    assert histogram_quantile(bounds, counts, 0.725) == pytest.approx(0.0015)
    assert histogram_quantile(bounds, counts, 0.99) == 0.002  # in +Inf: the highest bound
    assert math.isnan(histogram_quantile(bounds, [0.0, 0.0, 0.0], 0.5))


def test_daemon_delta_reads_the_window_between_two_scrapes() -> None:
    before = Snapshot(10.0, 5.0, {"main": 4.0, "tf_XLAEigen": 1.0}, METRICS_BEFORE)
    after = Snapshot(12.0, 5.1, {"main": 4.06, "tf_XLAEigen": 1.04}, METRICS_AFTER)
    d = daemon_delta(before, after)
    assert d["processed"] == 1000 and d["received"] == {"tcp": 500.0, "udp": 500.0}
    assert d["cpu_us_per_frame"] == pytest.approx(100.0)
    assert d["main_cpu_us_per_frame"] == pytest.approx(60.0)
    assert d["cores"] == pytest.approx(0.05) and d["frames_per_s"] == pytest.approx(500.0)
    assert d["batches_by_bucket"] == {"8": 125.0} and d["batches"] == 125
    assert d["frames_per_batch"] == pytest.approx(8.0) and d["batch_fill"] == pytest.approx(1.0)
    assert d["batch_fill_histogram"] == {"1": 125.0}
    # 500 of 1000 frames ≤ 1 ms, 450 in (1, 2] ms, 50 above: p50 1 ms, p99 the 2 ms bound.
    assert d["latency_ms"]["p50"] == pytest.approx(1.0)
    assert d["latency_ms"]["p99"] == pytest.approx(2.0)
    assert d["latency_ms"]["mean"] == pytest.approx(1.5)
    empty = daemon_delta(before, before)
    assert empty["cpu_us_per_frame"] is None and empty["latency_ms"]["p50"] is None


def test_step_cpu_weights_the_kernel_by_the_batches_formed() -> None:
    rows = [
        {"bucket": 1, "compiled_core_us_per_frame": 100.0},
        {"bucket": 8, "compiled_core_us_per_frame": 20.0},
    ]
    # 10 batches of 1 (100 µs each) and 5 of 8 (160 µs each) for 40 frames: 1800 / 40.
    assert step_cpu_us_per_frame({"1": 10, "8": 5}, 40, rows) == pytest.approx(45.0)
    assert step_cpu_us_per_frame({"64": 1}, 40, rows) is None  # not measured
    assert step_cpu_us_per_frame({}, 0, rows) is None


def test_paced_step_cpu_weights_the_paced_figures_by_the_batches_formed() -> None:
    paced = {"1": 150.0, "8": 30.0}
    # 10 batches of 1 (150 µs each) and 5 of 8 (240 µs each) for 40 frames: 2700 / 40.
    assert paced_step_cpu_us_per_frame({"1": 10, "8": 5}, 40, paced) == pytest.approx(67.5)
    assert paced_step_cpu_us_per_frame({"8": 5}, 40, {8: 30.0}) == pytest.approx(30.0)
    assert paced_step_cpu_us_per_frame({"1": 10, "64": 1}, 40, paced) is None  # 64 not paced
    assert paced_step_cpu_us_per_frame({}, 0, paced) is None
    windows = [
        {"wall_s": 2.0, "batches_by_bucket": {"1": 10.0, "8": 90.0}},
        {"wall_s": 3.0, "batches_by_bucket": {"8": 150.0}},
    ]
    assert batches_per_s(windows) == pytest.approx(50.0)  # 250 batches (all buckets) in 5 s
    assert batches_per_s([{"wall_s": 1.0, "batches_by_bucket": {}}]) is None


def test_fleet_schedule_spreads_the_sensors_over_the_period() -> None:
    spec = FleetSpec("tcp", 1, 2, 3, sensors=10, connections=5, rate_hz=20.0, record_bytes=1)
    groups = _groups(spec)
    assert [g.sock for g in groups] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [g.offset for g in groups] == pytest.approx([0.005 * s for s in range(10)])
    assert all(g.rows == 1 for g in groups)
    frame = decode_frame(bytes(groups[3].data), Dims(32, 64, 32, 32))
    assert frame.stream_id == "f-00003" and frame.seq == 1
    aligned = _groups(dataclasses.replace(spec, spread=False))
    assert [(g.sock, g.rows, g.offset) for g in aligned] == [(c, 2, 0.0) for c in range(5)]
    assert spec.rounds == 220 and spec.frames == 2200  # (1 s warm-up + 10 s) × 20 Hz
    with pytest.raises(ValueError):
        FleetSpec("tcp", 1, 2, 3, sensors=2, connections=3, record_bytes=1)
    with pytest.raises(ValueError):
        FleetSpec("sctp", 1, 2, 3, record_bytes=1)


def test_fleet_settings_validation_and_quick() -> None:
    assert FleetSettings().scenarios == SCENARIOS and FleetSettings().runs == 3
    assert "closed-loop" not in FleetSettings.quick().scenarios
    assert FleetSettings.quick().paced_s < FleetSettings().paced_s
    with pytest.raises(ValueError):
        FleetSettings(paced_s=0.0)
    with pytest.raises(ValueError):
        FleetSettings(paced_min_calls=0)
    with pytest.raises(ValueError, match="scenarios"):
        FleetSettings(scenarios=("nope",))
    with pytest.raises(ValueError):
        FleetSettings(default_connections=100, default_streams=64)


def test_daemon_config_fits_a_fleet(tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    text = daemon_config(BenchSettings(), tmp_path / "s", "", connections=5000, streams=6000)
    path.write_text(text)
    cfg = load_config(path, env={})
    assert cfg.ingest.max_connections_per_address >= 5000
    assert cfg.ingest.max_connections >= 5000 and cfg.state.max_streams >= 6000
    plain = daemon_config(BenchSettings(), tmp_path / "s", "")
    assert "max_connections" not in plain  # the classic run keeps the defaults


@pytest.mark.timeout(240)
def test_tiny_fleet_bench_end_to_end(
    compilation_cache: str, small_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = {k: getattr(small_config, k) for k in MODEL_KEYS}
    model["som_grid"] = tuple(small_config.som_grid)
    settings = BenchSettings(
        streams=32,
        rounds=200,  # ≥ 0.1 s of the daemon's CPU: /proc/<pid>/stat counts 10 ms ticks
        warmup_rounds=2,
        latency_s=0.3,
        latency_warmup_s=0.1,
        buckets=(1, 8, 64),
        kernel_repeats=1,
        kernel_min_time=0.01,
        kernel_eager_frames=1,
        model=model,
        cache_dir=compilation_cache,
        timeout_s=30.0,
    )
    fleet = FleetSettings(
        sensors=20,
        rate_hz=25.0,
        default_streams=8,
        default_connections=2,
        duration_s=2.0,
        warmup_s=0.25,
        runs=1,
        loads=(0.25,),
        paced_s=0.1,
        paced_min_calls=5,
    )
    lines: list[str] = []
    result = run_fleet_bench(settings, fleet, log=lines.append)
    result = json.loads(json.dumps(result))  # JSON-ready, as `--json` writes it

    assert result["kind"] == "fleet" and result["targets"] == {}
    assert result["kernel"]["xla_threads"] >= 1
    assert [r["bucket"] for r in result["kernel"]["buckets"]] == [1, 8, 64]
    assert result["compilations"]["runtime"] == 0
    scenarios = result["fleet"]
    assert set(scenarios) == set(SCENARIOS)
    for name in ("default", "tcp-fleet", "udp-fleet"):
        sc = scenarios[name]
        assert sc["frames_sent"] == (8 if name == "default" else 20) * math.ceil(
            2.25 * (100 if name == "default" else 25)
        )
        if sc["transport"] == "tcp":
            assert sc["all_processed"] and sc["frames_processed"] == sc["frames_sent"]
        else:
            assert 0 < sc["frames_processed"] <= sc["frames_sent"]
        assert len(sc["runs"]) == 1
        assert sc["daemon_cpu_us_per_frame"] > 0 and sc["step_cpu_us_per_frame"] > 0
        assert sc["daemon_to_step"] == pytest.approx(
            sc["daemon_cpu_us_per_frame"] / sc["step_cpu_us_per_frame"]
        )
        assert 0 < sc["client_p50_ms"] <= sc["client_p99_ms"]
        assert 0 < sc["daemon_p50_ms"] <= sc["daemon_p99_ms"]
        assert sc["frames_per_s"] > 0 and sc["client_cpu_s"] > 0
        assert sum(sc["batches_by_bucket"].values()) > 0 and 0 < sc["batch_fill"] <= 1
        _check_paced(sc)
    assert scenarios["tcp-fleet"]["connections"] == 20 and scenarios["tcp-fleet"]["spread"]
    assert not scenarios["default"]["spread"]
    closed = scenarios["closed-loop"]
    assert closed["max"]["max_frames_per_s"] > 0 and closed["max"]["daemon_to_step"] > 0
    (load,) = closed["loads"]
    assert load["fraction"] == 0.25 and load["daemon_cpu_us_per_frame"] > 0
    assert load["daemon_to_step"] > 0 and 0 < load["client_p50_ms"] <= load["client_p99_ms"]
    _check_paced(closed["max"])
    _check_paced(load)
    paced = result["paced"]
    assert paced["xla_threads"] == result["kernel"]["xla_threads"]
    assert paced["duration_s"] == 0.1 and paced["min_calls"] == 5
    assert {p["bucket"] for p in paced["points"]} <= {1, 8, 64}
    assert all(p["calls"] >= 5 and p["cpu_us_per_frame"] > 0 for p in paced["points"])

    table = format_table(result)
    for title in ("Kernel", "Fleet scenarios", "tcp-fleet", "udp-fleet", "closed-loop 0.25"):
        assert title in table
    paced_table = format_paced_table(result)
    for title in ("Paced step", "Paced step windows", "tcp-fleet", "closed-loop 0.25"):
        assert title in paced_table
    assert any("tcp-fleet run 1/1" in line for line in lines)
    assert any(line.startswith("  paced default:") for line in lines)


def _check_paced(figures: dict[str, Any]) -> None:
    """The paced step's figures of a scenario row: every bucket used measured, positive,
    the ratio the daemon's ÷ the paced step's (one run: no median to blur it)."""
    assert figures["batches_per_s"] > 0
    assert set(figures["paced_step_by_bucket"]) == {
        b for b, n in figures["batches_by_bucket"].items() if n > 0
    }
    assert all(v > 0 for v in figures["paced_step_by_bucket"].values())
    assert figures["paced_step_cpu_us_per_frame"] > 0 and figures["daemon_to_paced_step"] > 0
    assert figures["daemon_to_paced_step"] == pytest.approx(
        figures["daemon_cpu_us_per_frame"] / figures["paced_step_cpu_us_per_frame"]
    )
    (run,) = figures["runs"]
    assert run["paced_step_cpu_us_per_frame"] == figures["paced_step_cpu_us_per_frame"]
