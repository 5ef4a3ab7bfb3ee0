"""Eviction and multi-device sharding change where state lives, never the results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream.protocol import encode_frame

from .daemon import DaemonProcess, payload

pytestmark = pytest.mark.timeout(300)


def run_streams(
    d: DaemonProcess, n_streams: int, n_frames: int
) -> dict[tuple[str, int], np.ndarray]:
    """Send the same deterministic frames; return every moment's values by (stream, seq)."""
    rng = np.random.default_rng(7)
    sub = d.subscribe("*")
    assert d.wait_metric("enactive_subscribers", {}, 1) >= 1
    conn = d.connect()
    for seq in range(1, n_frames + 1):
        batch = b"".join(
            encode_frame(f"s-{i:03d}", seq, 0.0, **payload(rng)) for i in range(n_streams)
        )
        conn.sendall(batch)
    moments = sub.read(n_streams * n_frames)
    return {(m.stream_id, m.seq): m.values for m in moments}


def compare(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=str(key))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, compilation_cache: str) -> dict:
    d = DaemonProcess(tmp_path_factory.mktemp("ref"), compilation_cache).start()
    try:
        return run_streams(d, 150, 4)
    finally:
        d.kill()


def test_eviction_to_host_and_back_is_exact(
    tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache)
    # 64 device slots for 150 streams: every round evicts and restores.
    text = d.config.read_text().replace("max_streams = 512", "max_streams = 64")
    d.config.write_text(text)
    d.start()
    try:
        got = run_streams(d, 150, 4)
        metrics = d.metrics()
        assert metrics[("enactive_state_evictions_total", ())] > 0
        assert metrics[("enactive_state_restores_total", ())] > 0
        assert metrics[("enactive_active_streams", ())] <= 64
        assert metrics[("enactive_jit_compilations_total", (("phase", "runtime"),))] == 0
    finally:
        d.kill()
    compare(got, reference)


def test_two_devices_shard_the_slab(
    tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    d = DaemonProcess(
        tmp_path, compilation_cache, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    )
    d.config.write_text(d.config.read_text().replace("[device]", "[device]\ncount = 2"))
    d.start()
    try:
        got = run_streams(d, 150, 4)
        metrics = d.metrics()
        assert metrics[("enactive_jit_compilations_total", (("phase", "runtime"),))] == 0
    finally:
        d.kill()
    compare(got, reference)
