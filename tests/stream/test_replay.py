"""Replay against a plain TCP server: the frames byte for byte (with the reply flag), the
recorded pacing scaled by `--speed`, a cut tail noted; target URLs."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream.batcher import Batch
from stream.cli import main
from stream.protocol import ALL_PRESENT, FRAME_REPLY, Dims, Frame
from stream.recording import Recorder, RecordingReader, encode_batch
from stream.replay import ReplayUsageError, Target, parse_target, replay

DIMS = Dims(4, 3, 2, 2)
GAP_S = 0.25


@contextlib.contextmanager
def server() -> Iterator[tuple[int, bytearray]]:
    """A TCP server that takes one connection, reads it to its end, then closes it
    (a daemon that rejects nothing); yields its port and what it read."""
    got = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                got.extend(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], got
    finally:
        thread.join(10)
        listener.close()


def recording(path: Path, received_s: list[float]) -> list[bytes]:
    """A recording of one frame per receipt time (seconds); returns the frames' bytes."""
    Recorder.open(path, DIMS).close()
    frames = [
        Frame("s", i + 1, float(i), np.full(DIMS.total, i, np.float32), ALL_PRESENT,
              int(t * 1e9), "tcp")
        for i, t in enumerate(received_s)
    ]  # fmt: skip
    with path.open("ab") as f:
        f.write(encode_batch(Batch.of(frames, [0] * len(frames)), DIMS))
    with RecordingReader(path) as reader:
        return [r.frame for r in reader]


def with_reply(frame: bytes) -> bytes:
    flagged = bytearray(frame)
    flagged[10] |= FRAME_REPLY
    return bytes(flagged)


@pytest.mark.parametrize(("speed", "at_least_s"), [(1.0, 4 * GAP_S), (4.0, GAP_S), (None, 0)])
def test_frames_go_out_byte_for_byte_at_the_recorded_pace(
    tmp_path: Path, speed: float | None, at_least_s: float
) -> None:
    path = tmp_path / "paced.rec"
    # 4 gaps of GAP_S, and a receipt earlier than the one before (another clock): no gap.
    frames = recording(path, [100.0, 100.0 + GAP_S, 100.0 + 2 * GAP_S, 50.0, 50.0 + GAP_S,
                              50.0 + 2 * GAP_S])  # fmt: skip
    with server() as (port, got), RecordingReader(path) as reader:
        report = replay(reader, Target("tcp", "127.0.0.1", port), speed=speed)
    assert bytes(got) == b"".join(with_reply(f) for f in frames)
    assert (report.frames, report.bytes, report.rejected) == (6, len(got), {})
    assert report.complete
    assert report.elapsed_s >= at_least_s
    if speed is None:
        assert report.elapsed_s < GAP_S


def test_the_command_notes_a_cut_tail_and_sends_what_precedes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.rec"
    frames = recording(path, [time.time()] * 3)
    path.write_bytes(path.read_bytes()[:-5])
    with server() as (port, got):
        status = main(["replay", str(path), "--to", f"tcp://127.0.0.1:{port}", "--json"])
    assert status == 0
    assert bytes(got) == b"".join(with_reply(f) for f in frames[:2])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert (report["frames"], report["ignored_bytes"]) == (2, len(frames[2]) + 16 - 5)
    assert err.startswith("enactive-stream: note: ") and "is cut short" in err


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("tcp://127.0.0.1:7400", ("tcp", "127.0.0.1", 7400)),
        ("udp://localhost:9", ("udp", "localhost", 9)),
        ("tcp://[::1]:7400", ("tcp", "::1", 7400)),
        ("nats://127.0.0.1:4222", ("nats", "127.0.0.1", 4222)),
    ],
)
def test_replay_targets(text: str, want: tuple[str, str, int]) -> None:
    target = parse_target(text)
    assert (target.scheme, target.host, target.port) == want
    assert str(target) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:7400", "expected tcp://HOST:PORT, udp://HOST:PORT or nats://HOST:PORT"),
        ("http://127.0.0.1:80", "unknown scheme 'http'"),
        ("tcp://127.0.0.1", "expected 'host:port'"),
        ("tcp://127.0.0.1:0", "the port must be in"),
    ],
)
def test_bad_replay_targets(text: str, message: str) -> None:
    with pytest.raises(ReplayUsageError, match=message):
        parse_target(text)
