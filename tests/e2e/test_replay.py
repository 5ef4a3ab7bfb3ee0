"""Record and replay with real daemon processes: a replay through a fresh daemon gives
bit-identical moments; a SIGKILLed recording daemon leaves a readable file, appended to
after a restart; the replay command's failures are one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream.protocol import Moment, decode_frame, encode_frame
from stream.recording import RecordingReader
from stream.send import send

from .daemon import DIMS, DaemonProcess, payload

pytestmark = pytest.mark.timeout(300)

ONE_BUCKET = {"ENACTIVE_BATCHING_BUCKETS": "[64]"}
"""Both daemons run one executable: its rows are bit-identical whatever shares the batch
(with several buckets, replayed moments are equal within float32 rounding instead)."""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def daemon(tmp: Path, cache: str, *args: str) -> DaemonProcess:
    tmp.mkdir(exist_ok=True)
    return DaemonProcess(tmp, cache, env=ONE_BUCKET, args=args).start()


def by_stream(moments: list[Moment]) -> dict[str, list[tuple[int, float, int, bytes]]]:
    """Each stream's moments in order: seq, timestamp, flags and the values' bytes."""
    out: dict[str, list[tuple[int, float, int, bytes]]] = defaultdict(list)
    for m in moments:
        out[m.stream_id].append((m.seq, m.timestamp, m.flags, m.values.tobytes()))
    return dict(out)


def feed(d: DaemonProcess) -> int:
    """Sessions, several connections, JSON lines, absent modalities and one rejected
    frame; returns how many frames were accepted."""

    def sent(**options: Any) -> int:
        options = {"rate_hz": 2000.0, "transport": "tcp", "dims": DIMS} | options
        report = send("127.0.0.1", d.ports["tcp"], **options)
        assert report.complete and not report.rejected, report
        return report.frames

    accepted = sent(streams=8, duration_s=0.1, connections=2)
    accepted += sent(streams=4, duration_s=0.05)  # a new session of sim-0000..3: seq from 1
    accepted += sent(streams=3, duration_s=0.025, transport="json", prefix="json")
    rng = np.random.default_rng(7)
    gappy = [{**payload(rng), "tactile": None}, {**payload(rng), "sensory": None}]
    d.connect().sendall(
        encode_frame("gap-1", 1, 0.5, **gappy[0])
        + encode_frame("gap-1", 2, 0.75, **gappy[1])
        + encode_frame("gap-1", 2, 0.75, **gappy[1])  # duplicate_seq: never recorded
    )
    labels = {"reason": "duplicate_seq", "source": "tcp"}
    assert d.wait_metric("enactive_frames_rejected_total", labels, 1) == 1
    return accepted + 2


def test_a_replay_through_a_fresh_daemon_gives_bit_identical_moments(
    tmp_path: Path, compilation_cache: str
) -> None:
    recording = tmp_path / "run.rec"
    a = daemon(tmp_path / "a", compilation_cache, "--record", str(recording))
    try:
        sub = a.subscribe("*")
        assert a.wait_metric("enactive_subscribers", {}, 1) == 1
        accepted = feed(a)
        original = sub.read(accepted)
        assert a.wait_metric("enactive_recorded_frames_total", {}, accepted) == accepted
        assert a.stop() == 0
    finally:
        a.kill()
    with RecordingReader(recording) as reader:
        frames = [decode_frame(r.frame, DIMS) for r in reader]
    assert (len(frames), reader.ignored, reader.header.dims) == (accepted, 0, DIMS)
    assert recording.stat().st_size == reader.end

    b = daemon(tmp_path / "b", compilation_cache)  # a fresh state directory
    try:
        sub = b.subscribe("*")
        assert b.wait_metric("enactive_subscribers", {}, 1) == 1
        to = f"tcp://127.0.0.1:{b.ports['tcp']}"
        done = cli("replay", str(recording), "--as-fast-as-possible", "--to", to, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert (report["frames"], report["rejected"], report["complete"]) == (accepted, {}, True)
        replayed = sub.read(accepted)
        metrics = b.metrics()
        assert metrics[("enactive_jit_compilations_total", (("phase", "runtime"),))] == 0
    finally:
        b.kill()
    want, got = by_stream(original), by_stream(replayed)
    assert sorted(got) == sorted(want)
    assert len(want["sim-0000"]) == 200 + 100  # two sessions of one stream
    assert want["gap-1"][0][2] & 4  # the absent-modality flag, kept
    for stream_id, moments in want.items():
        assert got[stream_id] == moments, stream_id  # seq, timestamp, flags, every bit


def test_a_sigkilled_recording_is_readable_and_appended_to_after_a_restart(
    tmp_path: Path, compilation_cache: str
) -> None:
    recording = tmp_path / "killed.rec"
    c = daemon(tmp_path / "c", compilation_cache, "--record", str(recording))
    try:
        report = send("127.0.0.1", c.ports["tcp"], streams=8, rate_hz=1000.0,
                      duration_s=0.1, transport="tcp", dims=DIMS)  # fmt: skip
        assert c.wait_metric("enactive_recorded_frames_total", {}, 800) == 800
        assert c.metrics()[("enactive_recording_bytes", ())] == recording.stat().st_size
    finally:
        c.kill()  # SIGKILL: no drain, no final fsync
    assert report.frames == 800
    with RecordingReader(recording) as reader:
        records = list(reader)
    assert reader.ignored == 0
    seqs: dict[str, list[int]] = defaultdict(list)
    for r in records:
        f = decode_frame(r.frame, DIMS)
        seqs[f.stream_id].append(f.seq)
    assert seqs == {f"sim-{i:04d}": list(range(1, 101)) for i in range(8)}
    # As if the kill had come in the middle of a write: a record cut short at the end.
    whole = recording.read_bytes()
    recording.write_bytes(whole + whole[records[-1].offset :][:30])
    with RecordingReader(recording) as reader:
        assert len(list(reader)) == 800
    assert reader.problem == f"the record at offset {len(whole)} is cut short"
    assert reader.ignored == 30

    c = daemon(tmp_path / "c", compilation_cache, "--record", str(recording))
    try:
        send("127.0.0.1", c.ports["tcp"], streams=2, rate_hz=1000.0, duration_s=0.01,
             transport="tcp", dims=DIMS, prefix="after")  # fmt: skip
        assert c.wait_metric("enactive_recorded_frames_total", {}, 20) == 20
        assert c.stop() == 0
        assert "cut away the last 30 bytes" in c.output()
    finally:
        c.kill()
    with RecordingReader(recording) as reader:
        ids = [decode_frame(r.frame, DIMS).stream_id for r in reader]
    assert reader.ignored == 0 and len(ids) == 820
    assert ids[800:] == ["after-0000", "after-0001"] * 10


@pytest.mark.parametrize(
    ("args", "status", "cause"),
    [
        (["missing.rec"], 2, "cannot read missing.rec: No such file or directory"),
        (["not.rec"], 2, "not.rec: not a recording: it starts with b'hello wo'"),
        (["ok.rec", "--to", "nats://127.0.0.1:1"], 1, "cannot connect to NATS at nats://127.0.0.1:1"),
        (["ok.rec", "--to", "ftp://x:1"], 2, "unknown scheme 'ftp'"),
        (["ok.rec", "--to", "udp://127.0.0.1:9", "--token", "t" * 20], 2, "takes no --tls"),
        (["ok.rec", "--speed", "0"], 2, "expected a number > 0"),
        (["ok.rec", "--speed", "2", "--as-fast-as-possible"], 2, "not allowed with argument"),
        (["ok.rec", "--to", "tcp://127.0.0.1:1"], 1, "cannot reach 127.0.0.1:1: "),
    ],
)
def test_replay_failures_are_one_line(
    tmp_path: Path, args: list[str], status: int, cause: str
) -> None:
    (tmp_path / "not.rec").write_bytes(b"hello world, this is not a recording")
    from stream.recording import Recorder

    Recorder.open(tmp_path / "ok.rec", DIMS).close()
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "replay", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.startswith("enactive-stream: error: ") and proc.stderr.count("\n") == 1
    assert cause in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_record_is_run_with_record_path() -> None:
    from stream.cli import _overrides, _parser

    parse = _parser().parse_args
    args = parse(["record", "x.rec", "--config", "c.toml", "--set", "log.level=info"])
    assert args.fn.__name__ == "_cmd_run" and args.config == "c.toml"
    assert _overrides(args) == {"log.level": "info", "record.path": "x.rec"}
    assert _overrides(parse(["run", "--record", "y.rec"])) == {"record.path": "y.rec"}
    assert _overrides(parse(["run"])) == {}


@pytest.mark.parametrize("kind", ["not a recording", "other dims"])
def test_an_unusable_recording_refuses_the_start_in_one_line(
    tmp_path: Path, compilation_cache: str, kind: str
) -> None:
    from stream.protocol import Dims
    from stream.recording import Recorder

    bad = tmp_path / "bad.rec"
    if kind == "not a recording":
        bad.write_text("notes\n")
        cause = f"{bad}: not a recording: it starts with b'notes\\n'"
    else:
        Recorder.open(bad, Dims(*DIMS[:3], DIMS.motor + 1)).close()
        cause = f"{bad}: recorded with dims (D, P, T, M) = (8, 6, 4, 4), the daemon has"
    config = DaemonProcess(tmp_path, compilation_cache).config
    proc = cli("run", "--config", str(config), "--record", str(bad))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("enactive-stream: error: ") and cause in last, proc.stderr
    assert "Traceback" not in proc.stderr
