"""The daemon as a real subprocess over real sockets."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream.protocol import (
    FLAG_ABSENT,
    FLAG_RESTORED,
    encode_frame,
    encode_json_frame,
    moment_fields,
)

from .daemon import DaemonProcess, payload

pytestmark = pytest.mark.timeout(300)

M = "enactive_frames_rejected_total"


@pytest.fixture
def daemon(tmp_path: Path, compilation_cache: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, compilation_cache).start()
    yield d
    d.kill()


def wait_subscribed(d: DaemonProcess, n: int = 1) -> None:
    assert d.wait_metric("enactive_subscribers", {}, n) >= n


def test_every_valid_frame_gives_one_moment_in_order(daemon: DaemonProcess) -> None:
    sub = daemon.subscribe("*")
    wait_subscribed(daemon)
    rng = np.random.default_rng(0)
    streams = [f"tcp-{i:03d}" for i in range(300)]
    conns = [daemon.connect() for _ in range(4)]
    for seq in range(1, 11):
        for i, s in enumerate(streams):
            conns[i % 4].sendall(encode_frame(s, seq, seq * 0.01, **payload(rng)))
    json_conn = daemon.connect()
    lines = b"".join(
        encode_json_frame(f"json-{i}", seq, 0.0, **payload(rng))
        for seq in range(1, 6)
        for i in range(20)
    )
    json_conn.sendall(lines)
    udp = daemon.udp()
    for seq in range(1, 6):
        for i in range(20):
            udp.sendto(
                encode_frame(f"udp-{i}", seq, 0.0, **payload(rng)),
                ("127.0.0.1", daemon.ports["udp"]),
            )
    expected = 300 * 10 + 20 * 5 + 20 * 5
    moments = sub.read(expected)
    assert len(moments) == expected
    by_stream: dict[str, list[int]] = defaultdict(list)
    for m in moments:
        by_stream[m.stream_id].append(m.seq)
    assert len(by_stream) == 340
    for s, seqs in by_stream.items():
        want = list(range(1, 11 if s.startswith("tcp") else 6))
        assert seqs == want, s
    assert all(np.isfinite(m.values).all() for m in moments)
    metrics = daemon.metrics()
    assert metrics[("enactive_frames_processed_total", ())] == expected
    received = {
        src: metrics[("enactive_frames_received_total", (("source", src),))]
        for src in ("tcp", "json", "udp")
    }
    assert received == {"tcp": 3000, "json": 100, "udp": 100}
    assert metrics[("enactive_jit_compilations_total", (("phase", "runtime"),))] == 0
    assert sum(v for (name, _), v in metrics.items() if name == M) == 0


def test_identical_streams_identical_moments_and_absent_flag(daemon: DaemonProcess) -> None:
    sub = daemon.subscribe("twin-*")
    wait_subscribed(daemon)
    rng = np.random.default_rng(1)
    conn = daemon.connect()
    for seq in range(1, 6):
        p = payload(rng)
        conn.sendall(encode_frame("twin-a", seq, 0.0, **p) + encode_frame("twin-b", seq, 0.0, **p))
    p = payload(rng)
    del p["tactile"]
    conn.sendall(encode_frame("twin-c", 1, 0.0, **p))
    moments = sub.read(11)
    a = [m for m in moments if m.stream_id == "twin-a"]
    b = [m for m in moments if m.stream_id == "twin-b"]
    for ma, mb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ma.values, mb.values)
        assert ma.flags & FLAG_ABSENT == 0
    (c,) = [m for m in moments if m.stream_id == "twin-c"]
    assert c.flags & FLAG_ABSENT
    assert set(moment_fields(c)) >= {"moment", "synthesis", "schema", "motor", "scalars"}


def test_bad_frames_counted_by_reason_and_connection_usable(daemon: DaemonProcess) -> None:
    sub = daemon.subscribe("ok-*")
    wait_subscribed(daemon)
    rng = np.random.default_rng(2)
    conn = daemon.connect()
    p = payload(rng)
    good = encode_frame("ok-1", 1, 0.0, **p)
    wrong_dims = encode_frame("ok-1", 2, 0.0, sensory=np.zeros(5, np.float32))
    nan = dict(p, proprio=np.full(6, np.nan, np.float32))
    bad_version = bytearray(encode_frame("ok-1", 2, 0.0, **p))
    bad_version[8] = 9
    conn.sendall(
        good
        + wrong_dims
        + encode_frame("ok-1", 2, 0.0, **nan)
        + bytes(bad_version)
        + encode_frame("ok-1", 1, 0.0, **p)  # duplicate_seq
        + encode_frame("ok-1", 3, 0.0, **p)  # fine
        + encode_frame("ok-1", 2, 0.0, **p)  # stale_seq
        + encode_frame("bad id", 1, 0.0, **p)  # bad_stream_id
        + encode_frame("ok-1", 4, 0.0, **p)
    )  # fine: the connection still works
    moments = sub.read(3)
    assert [m.seq for m in moments] == [1, 3, 4]
    want = {
        "dim_mismatch": 1,
        "non_finite": 1,
        "bad_version": 1,
        "duplicate_seq": 1,
        "stale_seq": 1,
        "bad_stream_id": 1,
    }
    for reason, n in want.items():
        key = (M, (("reason", reason), ("source", "tcp")))
        assert daemon.wait_metric(M, {"reason": reason, "source": "tcp"}, n) == n, reason
        assert daemon.metrics()[key] == n
    # JSON: a bad line is answered and counted; the connection goes on.
    jconn = daemon.connect()
    jconn.sendall(
        b'{"stream": "ok-2", "seq": "x"}\n' + encode_json_frame("ok-2", 1, 0.0, **payload(rng))
    )
    with jconn.makefile("rb") as replies:
        reply = replies.readline()
    assert json.loads(reply)["error"] == "bad_json"
    assert sub.read(4)[-1].stream_id == "ok-2"
    # Lost framing closes that connection only.
    conn.sendall(b"XXXX" + b"\0" * 60)
    conn.settimeout(10)
    assert conn.recv(1) == b""
    other = daemon.connect()
    other.sendall(encode_frame("ok-1", 5, 0.0, **p))
    assert sub.read(5)[-1].seq == 5
    assert daemon.wait_metric(M, {"reason": "bad_magic", "source": "tcp"}, 1) == 1


def test_sigterm_checkpoints_and_restart_continues_exactly(
    tmp_path: Path, compilation_cache: str
) -> None:
    rng = np.random.default_rng(3)
    frames = [payload(rng) for _ in range(10)]
    d = DaemonProcess(tmp_path, compilation_cache).start()
    try:
        sub = d.subscribe("*")
        wait_subscribed(d)
        conn = d.connect()
        for seq in range(1, 6):
            conn.sendall(encode_frame("resume", seq, 0.0, **frames[seq - 1]))
        before = sub.read(5)
        assert [m.seq for m in before] == [1, 2, 3, 4, 5]
        assert d.stop() == 0
    finally:
        d.kill()
    assert (d.state / "checkpoint.npz").exists()

    d = DaemonProcess(tmp_path, compilation_cache).start()
    try:
        assert d.http("/readyz")[0] == 200
        sub = d.subscribe("*")
        wait_subscribed(d)
        conn = d.connect()
        conn.sendall(encode_frame("resume", 5, 0.0, **frames[4]))  # replayed: stale now
        for seq in range(1, 11):
            conn.sendall(encode_frame("fresh", seq, 0.0, **frames[seq - 1]))
        for seq in range(6, 11):
            conn.sendall(encode_frame("resume", seq, 0.0, **frames[seq - 1]))
        moments = sub.read(15)
        resumed = [m for m in moments if m.stream_id == "resume"]
        fresh = [m for m in moments if m.stream_id == "fresh"][5:]
        assert [m.seq for m in resumed] == [6, 7, 8, 9, 10]
        assert resumed[0].flags & FLAG_RESTORED
        assert not any(m.flags & FLAG_RESTORED for m in resumed[1:] + fresh)
        for r, f in zip(resumed, fresh, strict=True):
            np.testing.assert_allclose(r.values, f.values, rtol=1e-5, atol=1e-6)
        assert d.wait_metric(M, {"reason": "duplicate_seq", "source": "tcp"}, 1) == 1
        assert d.stop() == 0
    finally:
        d.kill()


def test_runs_of_like_frames_with_replays_inside_are_admitted_frame_by_frame(
    daemon: DaemonProcess,
) -> None:
    # Runs of like frames travel whole through the pipeline; a run holding a replayed seq,
    # or a stream twice, must give exactly what admitting its frames one by one gives.
    sub = daemon.subscribe("run-*")
    wait_subscribed(daemon)
    rng = np.random.default_rng(4)
    ids = [f"run-{i}" for i in range(4)]

    def run(seqs: list[int]) -> bytes:
        return b"".join(
            encode_frame(s, q, 0.0, **payload(rng)) for s, q in zip(ids, seqs, strict=True)
        )

    conn = daemon.connect()
    conn.sendall(run([1, 1, 1, 1]) + run([2, 2, 2, 2]))  # each stream twice in one read
    conn.sendall(run([3, 1, 3, 3]))  # run-1 back to 1: stale_seq, the rest go on
    conn.sendall(run([4, 4, 4, 3]))  # run-3's 3 again: duplicate_seq
    moments = sub.read(14)
    got: dict[str, list[int]] = defaultdict(list)
    for m in moments:
        got[m.stream_id].append(m.seq)
    assert got == {
        "run-0": [1, 2, 3, 4],
        "run-1": [1, 2, 4],
        "run-2": [1, 2, 3, 4],
        "run-3": [1, 2, 3],
    }
    for reason in ("stale_seq", "duplicate_seq"):
        assert daemon.wait_metric(M, {"reason": reason, "source": "tcp"}, 1) == 1, reason


def test_readyz_and_healthz(daemon: DaemonProcess) -> None:
    assert daemon.http("/healthz")[0] == 200
    assert daemon.http("/readyz") == (200, "ready\n")
    metrics = daemon.metrics()
    assert metrics[("enactive_ready", ())] == 1
    assert any(name == "enactive_build_info" for name, _ in metrics)


def test_jsonl_sink_has_every_moment_after_sigterm(tmp_path: Path, compilation_cache: str) -> None:
    out = tmp_path / "out" / "moments.jsonl"
    d = DaemonProcess(tmp_path, compilation_cache)
    d.config.write_text(
        d.config.read_text().replace(
            '[output]\ntcp = "127.0.0.1:0"', f'[output]\ntcp = "127.0.0.1:0"\njsonl = "{out}"'
        )
    )
    d.start()
    try:
        rng = np.random.default_rng(4)
        conn = d.connect()
        conn.sendall(
            b"".join(
                encode_frame(f"file-{i}", seq, 0.0, **payload(rng))
                for seq in range(1, 4)
                for i in range(20)
            )
        )
        assert d.wait_metric("enactive_frames_processed_total", {}, 60) == 60
        assert d.stop() == 0  # the sink flushes what it holds on the way out
    finally:
        d.kill()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 60
    assert sorted((m["stream"], m["seq"]) for m in lines) == sorted(
        (f"file-{i}", seq) for seq in range(1, 4) for i in range(20)
    )
    assert all(len(m["synthesis"]) == 8 for m in lines)


def test_device_cpu_threads_sizes_the_xla_pool(tmp_path: Path, compilation_cache: str) -> None:
    # 3 is neither the auto value nor XLA's own default on the 2-core CI machine.
    d = DaemonProcess(tmp_path, compilation_cache, env={"PJRT_NPROC": "7"})
    d.config.write_text(d.config.read_text().replace("[device]\n", "[device]\ncpu_threads = 3\n"))
    d.start()
    try:
        assert d.proc is not None
        tasks = Path(f"/proc/{d.proc.pid}/task")
        names = [(t / "comm").read_text().strip() for t in tasks.iterdir()]
        assert names.count("tf_XLAEigen") == 3
        assert "1 cpu device(s), 3 XLA CPU threads" in d.output()
    finally:
        d.kill()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("pin", [True, False])
def test_event_loop_and_xla_threads_on_separate_cpus(
    tmp_path: Path, compilation_cache: str, pin: bool
) -> None:
    allowed = os.sched_getaffinity(0)
    loop_cpu = min(allowed)
    d = DaemonProcess(tmp_path, compilation_cache)
    setting = f"[device]\npin_threads = {str(pin).lower()}\n"
    d.config.write_text(d.config.read_text().replace("[device]\n", setting))
    d.start()
    try:
        assert d.proc is not None
        tasks = Path(f"/proc/{d.proc.pid}/task")
        xla = [
            int(t.name)
            for t in tasks.iterdir()
            if (t / "comm").read_text().strip() == "tf_XLAEigen"
        ]
        assert xla
        # The main thread runs the event loop.
        assert os.sched_getaffinity(d.proc.pid) == ({loop_cpu} if pin else allowed)
        assert {frozenset(os.sched_getaffinity(t)) for t in xla} == {
            frozenset(allowed - {loop_cpu} if pin else allowed)
        }
        assert (f"event loop on CPU {loop_cpu}," in d.output()) == pin
    finally:
        d.kill()
