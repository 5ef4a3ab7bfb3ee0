"""The command line: the embedded default, send, check-config, info, --version and --help
(start-up failures: `test_startup_failures.py`; other failures: `test_cli_failures.py`)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stream.cli import _parser
from stream.protocol import encode_frame

from .daemon import DaemonProcess

pytestmark = pytest.mark.timeout(300)

CLI = [sys.executable, "-m", "stream.cli"]


def test_embedded_default_runs_the_synthetic_feed(tmp_path: Path, compilation_cache: str) -> None:
    env = {
        **os.environ,
        "ENACTIVE_STATE_DIR": str(tmp_path / "state"),
        "ENACTIVE_DEVICE_COMPILATION_CACHE_DIR": compilation_cache,
        # Ephemeral ports so the test never collides with a daemon already running here.
        "ENACTIVE_INGEST_TCP": "127.0.0.1:0",
        "ENACTIVE_INGEST_UDP": "127.0.0.1:0",
        "ENACTIVE_OUTPUT_TCP": "127.0.0.1:0",
        "ENACTIVE_METRICS_LISTEN": "127.0.0.1:0",
    }
    d = DaemonProcess(tmp_path, compilation_cache, env=env)
    log = d.log.open("wb")
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [*CLI, "run", "--ready-file", str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, d.output()
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.05)
        d.ports = json.loads(ready.read_text())
        # 64 bodies at 100 Hz: a few ticks' worth arrive within seconds.
        processed = d.wait_metric("enactive_frames_processed_total", {}, 64 * 5)
        assert processed >= 64 * 5
        m = d.metrics()
        assert m[("enactive_frames_received_total", (("source", "synthetic"),))] >= processed
        assert m[("enactive_active_streams", ())] == 64
        while "frames/s" not in d.output():  # the once-a-second status line
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    out = d.output()
    assert "embedded default — 64 synthetic bodies at 100 Hz" in out
    assert "compiled bucket" in out and "compilations since ready 0" in out
    assert (tmp_path / "state" / "checkpoint.npz").exists()


def test_send_delivers_to_a_running_daemon(tmp_path: Path, compilation_cache: str) -> None:
    d = DaemonProcess(tmp_path, compilation_cache).start()
    try:
        dims = ["--state-dim", "8", "--proprio-dim", "6", "--tactile-dim", "4", "--motor-dim", "3"]
        for transport in ("tcp", "json", "udp"):
            out = subprocess.run(
                [
                    *CLI,
                    "send",
                    "--port",
                    str(d.ports["tcp"]),
                    "--streams",
                    "5",
                    "--rate",
                    "50",
                    "--duration",
                    "0.2",
                    "--transport",
                    transport,
                    "--prefix",
                    transport,
                    *dims,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert "frames" in out.stdout
        assert d.wait_metric("enactive_frames_processed_total", {}, 150) == 150
        m = d.metrics()
        for source in ("tcp", "json", "udp"):
            assert m[("enactive_frames_received_total", (("source", source),))] == 50, source
    finally:
        d.kill()


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[batching]\nmax_wait_ms = 5\n")
    r = subprocess.run(
        [*CLI, "check-config", str(good), "--show"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "max_wait_ms = 5.0" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[batching]\nmax_wait_ms = -1\n")
    r = subprocess.run([*CLI, "check-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "batching.max_wait_ms = -1" in r.stderr and "[0, 1000]" in r.stderr


def test_info_reports_backend_and_config(tmp_path: Path) -> None:
    env = {**os.environ, "ENACTIVE_DEVICE_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(
        [*CLI, "info"], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    info = json.loads(r.stdout)
    assert info["version"] == importlib.metadata.version("enactive-stream")
    assert info["jit"]["backend"] in ("cpu", "gpu", "cuda", "rocm", "tpu")
    assert info["jit"]["compilation_cache_dir"] == str(tmp_path / "cache")
    assert info["config"]["batching"]["buckets"] == [1, 8, 32, 64, 96, 128, 192, 256]


def test_unusable_checkpoint_is_a_one_line_start_up_error(
    tmp_path: Path, compilation_cache: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache).start()
    d.connect().sendall(encode_frame("one", 1, 0.0, sensory=np.ones(8, np.float32)))
    assert d.wait_metric("enactive_frames_processed_total", {}, 1) == 1
    assert d.stop() == 0
    assert (d.state / "checkpoint.npz").exists()
    # The same state directory with other model dimensions: refuse, name the mismatch.
    d.config.write_text(d.config.read_text().replace("state_dim = 8", "state_dim = 4"))
    r = subprocess.run(
        [*CLI, "run", "--config", str(d.config)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert "enactive-stream: error: " in r.stderr and "checkpoint.npz was written for" in r.stderr
    assert "Traceback" not in r.stderr


def test_subscribe_prints_json_lines(tmp_path: Path, compilation_cache: str) -> None:
    d = DaemonProcess(tmp_path, compilation_cache).start()
    try:
        for fmt in ("json", "binary"):
            proc = subprocess.Popen(
                [
                    *CLI,
                    "subscribe",
                    "sub-*",
                    "--port",
                    str(d.ports["output"]),
                    "--count",
                    "3",
                    "--format",
                    fmt,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert d.wait_metric("enactive_subscribers", {}, 1) >= 1
            conn = d.connect()
            base = 10 if fmt == "binary" else 0
            for seq in range(1, 6):
                conn.sendall(encode_frame("sub-a", base + seq, 0.0, sensory=np.ones(8, np.float32)))
            out, _ = proc.communicate(timeout=60)
            lines = [json.loads(line) for line in out.splitlines()]
            assert [m["seq"] for m in lines] == [base + 1, base + 2, base + 3]
            assert lines[0]["stream"] == "sub-a" and len(lines[0]["moment"]) == 8
            assert set(lines[0]["scalars"]) == {"coherence", "boundary", "confidence"}
            deadline = time.monotonic() + 30  # the next round needs this subscriber gone
            while d.metrics()[("enactive_subscribers", ())] != 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        d.kill()


def test_version() -> None:
    r = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"enactive-stream {importlib.metadata.version('enactive-stream')}\n"


def test_help_shows_every_default() -> None:
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {
        "run", "record", "replay", "send", "subscribe", "info", "check-config", "bench"
    }  # fmt: skip
    shown = {}
    for name, command in commands.choices.items():
        r = subprocess.run([*CLI, name, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        shown[name] = " ".join(r.stdout.split())
        for action in command._actions:
            if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
                assert f"(default: {action.default})" in shown[name], (name, action.dest)
    assert "--port PORT the daemon's ingest port (default: 7400)" in shown["send"]
    assert "--report-only exit 0 even when a target is missed" in shown["bench"]
