"""Multi-rate alignment in a real daemon: an IMU-like stream at 1 kHz over UDP and a
tactile-like one at 100 Hz over TCP join into one body's frames at the driving rate, with
the presence the tolerance gives, the same in two runs; a silent input holds frames no
longer than `max_wait`; late samples are counted. And freshness: a stalled daemon sheds
what queued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stream.protocol import FLAG_ABSENT, encode_frame

from .daemon import DIMS, DaemonProcess, wait_for

pytestmark = pytest.mark.timeout(300)

ONE_BUCKET = {"ENACTIVE_BATCHING_BUCKETS": "[64]"}
"""One executable: a moment's values are bit-identical whatever shares its batch."""

ALIGN = """
[align]
tolerance_ms = 4
max_wait_ms = {max_wait_ms}
[[align.bodies]]
id = "arm-1"
drive = "imu-1"
inputs = ["touch-1"]
"""
IMU_HZ, TOUCH_HZ, SECONDS = 1000, 100, 0.5
SENT = 240
"""Datagrams sent to a stalled daemon in the freshness test."""


def imu_frames() -> list[bytes]:
    """The IMU carries sensory, proprio and motor; its frame k at k ms."""
    rng = np.random.default_rng(1)
    out = []
    for k in range(int(IMU_HZ * SECONDS)):
        out.append(
            encode_frame(
                "imu-1",
                k + 1,
                k / IMU_HZ,
                sensory=rng.standard_normal(DIMS.sensory),
                proprio=rng.standard_normal(DIMS.proprio),
                motor=rng.standard_normal(DIMS.motor),
            )
        )
    return out


def touch_frames(offset_ms: float = 0.5) -> list[bytes]:
    """The skin carries tactile only; its frame j at 10 j + 0.5 ms, and one more after
    the IMU's last, so every IMU frame sees the skin reach its time."""
    rng = np.random.default_rng(2)
    n = int(TOUCH_HZ * SECONDS) + 1
    return [
        encode_frame(
            "touch-1", j + 1, (j * 10 + offset_ms) / 1000, tactile=rng.standard_normal(DIMS.tactile)
        )
        for j in range(n)
    ]


def tactile_joined(seq: int) -> bool:
    """With a 4 ms tolerance: the IMU frame at (seq - 1) ms has a skin sample at most
    4 ms older (at 0.5, 10.5, ... ms)."""
    t = seq - 1
    return t >= 0.5 and (t - 0.5) % 10 <= 4


def run_once(tmp: Path, cache: str) -> dict[int, tuple[int, bytes]]:
    tmp.mkdir()
    d = DaemonProcess(tmp, cache, extra=ALIGN.format(max_wait_ms=60000), env=ONE_BUCKET)
    d.start()
    try:
        sub = d.subscribe("arm-*")
        assert d.wait_metric("enactive_subscribers", {}, 1) == 1
        udp, tcp = d.udp(), d.connect()
        imus, touches = imu_frames(), touch_frames()
        # both in real time, interleaved by their clocks (1 ms per IMU frame)
        start = time.monotonic()
        for k, frame in enumerate(imus):
            if k % 10 == 0:
                tcp.sendall(touches[k // 10])
            udp.sendto(frame, ("127.0.0.1", d.ports["udp"]))
            wait = start + (k + 1) / IMU_HZ - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing the sender, not waiting for the daemon
        tcp.sendall(touches[-1])
        moments = sub.read(len(imus), timeout=60)
        metrics = d.metrics()
        assert metrics[("enactive_frames_dropped_total", (("reason", "late"),))] == 0
        assert metrics[("enactive_frames_processed_total", ())] == len(imus)
        assert d.stop() == 0
    finally:
        d.kill()
    assert {m.stream_id for m in moments} == {"arm-1"}
    return {m.seq: (m.flags, m.values.tobytes()) for m in moments}


def test_two_rates_on_two_sources_join_at_the_driving_rate_the_same_in_two_runs(
    tmp_path: Path, compilation_cache: str
) -> None:
    first = run_once(tmp_path / "a", compilation_cache)
    assert sorted(first) == list(range(1, int(IMU_HZ * SECONDS) + 1))  # one per IMU frame
    for seq, (flags, _) in first.items():
        assert bool(flags & FLAG_ABSENT) != tactile_joined(seq), seq
    assert sum(tactile_joined(s) for s in first) == 200  # 1-4 ms after each skin sample
    second = run_once(tmp_path / "b", compilation_cache)
    assert second == first  # flags and every bit of every moment


def test_a_silent_input_holds_frames_at_most_max_wait_and_its_late_samples_are_counted(
    tmp_path: Path, compilation_cache: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache, extra=ALIGN.format(max_wait_ms=50))
    d.start()
    try:
        sub = d.subscribe("arm-*")
        assert d.wait_metric("enactive_subscribers", {}, 1) == 1
        tcp = d.connect()
        sent = time.monotonic()
        tcp.sendall(b"".join(imu_frames()[:20]))  # the skin says nothing
        moments = sub.read(20, timeout=30)
        waited = time.monotonic() - sent
        assert waited >= 0.05  # held for max_wait ...
        assert all(m.flags & FLAG_ABSENT for m in moments)  # ... then out without touch
        assert [m.seq for m in moments] == list(range(1, 21))
        # the skin's samples for those 20 ms arrive now: too late to join anything
        tcp.sendall(b"".join(touch_frames()[:2]))
        assert d.wait_metric("enactive_frames_dropped_total", {"reason": "late"}, 2) == 2
        # a repeated input seq is rejected like any stream's
        tcp.sendall(imu_frames()[5])
        labels = {"source": "tcp", "reason": "stale_seq"}
        assert d.wait_metric("enactive_frames_rejected_total", labels, 1) == 1
        assert d.http("/readyz")[0] == 200
    finally:
        d.kill()


def test_freshness_latest_sheds_what_queued_while_the_daemon_was_stalled(
    tmp_path: Path, compilation_cache: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache, env={"ENACTIVE_INGEST_FRESHNESS": "latest"})
    d.start()
    try:
        sub = d.subscribe("s-*")
        assert d.wait_metric("enactive_subscribers", {}, 1) == 1
        udp = d.udp()
        rng = np.random.default_rng(3)
        frame = {
            "sensory": rng.standard_normal(DIMS.sensory),
            "proprio": rng.standard_normal(DIMS.proprio),
        }
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGSTOP)  # the consumer falls behind ...
        try:
            # ... while 4 streams send 60 frames each (240 datagrams: within the kernel's
            # receive buffer even where net.core.rmem_max is the default 208 KiB)
            for seq in range(1, SENT // 4 + 1):
                for s in range(4):
                    udp.sendto(
                        encode_frame(f"s-{s}", seq, seq / 100, **frame),
                        ("127.0.0.1", d.ports["udp"]),
                    )
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        stale_key = ("enactive_frames_dropped_total", (("reason", "stale"),))
        processed_key = ("enactive_frames_processed_total", ())

        overload_key = ("enactive_frames_dropped_total", (("reason", "overload"),))

        def settled() -> bool:
            m = d.metrics()
            return m.get(stale_key, 0) + m.get(processed_key, 0) + m.get(overload_key, 0) == SENT

        wait_for(settled, f"all {SENT} datagrams processed or shed")
        metrics = d.metrics()
        stale, processed = metrics[stale_key], metrics[processed_key]
        assert metrics[overload_key] == 0
        assert stale >= SENT // 2  # most of what queued was shed ...
        # each stream's newest frame was processed: the fresh one, not only old ones
        moments = sub.read(int(processed), timeout=30)
        newest = {m.stream_id: m.seq for m in moments}
        assert newest == {f"s-{s}": SENT // 4 for s in range(4)}  # ... and the newest stepped
        age = metrics[("enactive_source_sample_age_seconds", (("source", "udp"),))]
        assert 0 < age < 1.0
    finally:
        d.kill()


def test_the_alignment_example(tmp_path: Path, compilation_cache: str) -> None:
    """docs/integrations.md's alignment example, as printed: its `[align]` section in
    the daemon's configuration, its script against the daemon's ports."""
    docs = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    section = docs.split("## Aligning streams of different rates", 1)[1]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "# align.toml" in toml and "# align.py" in script
    d = DaemonProcess(tmp_path, compilation_cache, extra=toml)
    d.start()
    try:
        (tmp_path / "align.toml").write_text(d.config.read_text())  # the script's dims
        script = script.replace("7400", str(d.ports["tcp"])).replace(
            "7401", str(d.ports["output"])
        )
        assert d.ports["tcp"] == d.ports["udp"]
        out = subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "arm-1: 1000 frames, 500 with touch\n"
    finally:
        d.kill()
