"""`enactive-stream run` that cannot start: exit status 2 and one line naming the cause.

One test per class of failure, each running the real command line in a subprocess with a
tiny model (two buckets) so that the ones that fail after compiling are quick too; and
`run --discard-checkpoint`, the way past an unusable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import processors
from stream.checkpoint import save_checkpoint
from stream.streams import StreamTable

from .daemon import MODEL

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "stream.cli"]

CONFIG = (
    """\
[ingest]
tcp = "127.0.0.1:0"
udp = ""
[output]
tcp = ""
[metrics]
listen = ""
[batching]
buckets = [1, 2]
"""
    + MODEL
    + """[state]
dir = "{state}"
max_streams = 2
max_known_streams = 4
[device]
compilation_cache_dir = "{cache}"
[log]
level = "warning"
status_interval_s = 0
"""
)


def _config(tmp_path: Path, cache: str, **changes: str) -> Path:
    """The tiny configuration with `key = value` lines replaced (`retention_depth="2000"`)."""
    text = CONFIG.format(state=tmp_path / "state", cache=cache)
    for key, value in changes.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return path


def _fails(config: Path, *args: str, command: str = "run") -> str:
    """Runs the command, checks that it failed as a start-up failure should, and returns
    its one line of stderr."""
    r = subprocess.run(
        [*CLI, command, *(["--config"] if command == "run" else []), str(config), *args],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert lines[0].startswith("enactive-stream: error: "), lines[0]
    return lines[0]


def test_bad_value_fails_run_and_check_config_alike(tmp_path: Path, compilation_cache: str) -> None:
    config = _config(tmp_path, compilation_cache, retention_depth="2000")
    line = _fails(config)
    assert "model.retention_depth = 2000: must be an integer in [1, 1024]" in line
    assert _fails(config, command="check-config") == line


def test_cross_field_error_names_the_key(tmp_path: Path, compilation_cache: str) -> None:
    line = _fails(_config(tmp_path, compilation_cache), "--set", "model.attention_heads=3")
    assert "model.attention_heads = 3: must divide model.state_dim = 8" in line
    assert "choose one of 1, 2, 4, 8" in line


@pytest.mark.parametrize("kind", ["missing", "garbage", "other_shape"])
def test_unusable_params_file(
    tmp_path: Path, compilation_cache: str, small_config: processors.ModelConfig, kind: str
) -> None:
    params = tmp_path / "params.eqx"
    if kind == "garbage":
        params.write_bytes(b"not an equinox file\n" * 10)
    elif kind == "other_shape":  # the daemon's sizes (small_config) but state_dim 4, not 8
        other = dataclasses.replace(small_config, state_dim=4, moment_dim=None)
        processors.save_params(processors.EnactiveModel(other, key=jax.random.PRNGKey(0)), params)
    line = _fails(_config(tmp_path, compilation_cache), "--set", f"model.params={params}")
    assert "model.params" in line and str(params) in line
    if kind == "missing":
        assert "No such file or directory" in line


def test_missing_device(tmp_path: Path, compilation_cache: str) -> None:
    line = _fails(_config(tmp_path, compilation_cache), "--set", "device.count=64")
    assert "device.count = 64: only" in line


def test_port_in_use(tmp_path: Path, compilation_cache: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, compilation_cache)
        line = _fails(config, "--set", f"ingest.tcp=127.0.0.1:{port}")
    assert f"ingest.tcp = 127.0.0.1:{port}" in line and "in use" in line


FIX = "move it aside to start fresh, or start with `--discard-checkpoint`"


def test_corrupt_checkpoint(tmp_path: Path, compilation_cache: str) -> None:
    checkpoint = tmp_path / "state" / "checkpoint.npz"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"\x00garbage\xff" * 100)
    line = _fails(_config(tmp_path, compilation_cache))
    assert f"{checkpoint}: cannot be read" in line and FIX in line
    assert "pickle" not in line


def _crafted_checkpoint(state: Path, config: processors.ModelConfig) -> Path:
    """A checkpoint for the tiny configuration (2 slots) written by the daemon's own writer,
    then rewritten as it does (valid zip and CRCs) with both streams in slot 0."""
    capacity = 2
    model = processors.EnactiveModel(config, key=jax.random.PRNGKey(0))
    step = processors.SlabStep(model, buckets=(1,), capacity=capacity, devices=jax.devices()[:1])
    table = StreamTable(capacity, 4)
    table.slot_of.update(a=0, b=1)
    table.processed_seq.update(a=3, b=4)
    path = save_checkpoint(
        state, step.host_slab(), table, processors.model_fingerprint(config, capacity)
    )
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["slots"] = {"a": 0, "b": 0}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    return path


def test_crafted_checkpoint(
    tmp_path: Path, compilation_cache: str, small_config: processors.ModelConfig
) -> None:
    checkpoint = _crafted_checkpoint(tmp_path / "state", small_config)
    line = _fails(_config(tmp_path, compilation_cache))
    assert f"{checkpoint}: `slots` gives slot 0 to both 'a' and 'b'" in line and FIX in line


def test_discard_checkpoint_starts_fresh_and_keeps_the_old_file(
    tmp_path: Path, compilation_cache: str, small_config: processors.ModelConfig
) -> None:
    checkpoint = _crafted_checkpoint(tmp_path / "state", small_config)
    crafted = checkpoint.read_bytes()
    ready = tmp_path / "ready.json"
    config = _config(tmp_path, compilation_cache)
    args = ["run", "--config", str(config), "--discard-checkpoint", "--ready-file", str(ready)]
    with subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        deadline = time.monotonic() + 110
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert ready.exists() and proc.returncode == 0, output
    [aside] = checkpoint.parent.glob("checkpoint.npz.discarded-*")
    assert aside.read_bytes() == crafted  # moved aside, never deleted
    assert f"moved {checkpoint} to {aside}; starting fresh" in output
    assert "Traceback" not in output


def test_state_dir_that_cannot_be_created(tmp_path: Path, compilation_cache: str) -> None:
    (tmp_path / "a-file").write_text("")  # a directory below a file: fails even for root
    state = tmp_path / "a-file" / "state"
    line = _fails(_config(tmp_path, compilation_cache), "--set", f"state.dir={state}")
    assert f"state.dir = {state}: cannot be created or written" in line
