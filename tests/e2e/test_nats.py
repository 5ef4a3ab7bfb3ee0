"""NATS JetStream in and out, against a real `nats-server -js` started here: every
published frame changes its stream's state exactly once and yields exactly one stored
moment, across SIGKILLs of the daemon and restarts of the server."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream.protocol import MomentReader, encode_frame, encode_json_frame

from .daemon import DIMS, MODEL, DaemonProcess, free_port, payload, run_without
from .natsserver import Client, NatsServer, need_nats, wait_until

pytestmark = pytest.mark.timeout(600)

STREAMS, FRAMES = 100, 100
CONFIG = (
    """\
[ingest]
tcp = "127.0.0.1:0"
udp = ""
[output]
tcp = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[batching]
buckets = [64]
max_wait_ms = 2
"""
    + MODEL
    + """[state]
dir = "{state}"
checkpoint_interval_s = 0.5
max_streams = 512
[device]
compilation_cache_dir = "{cache}"
[log]
status_interval_s = 0
[nats]
url = "{url}"
ack_wait_s = 4
duplicate_window_s = 300
{extra}
"""
)
"""One bucket: every moment comes from the same executable, so runs compare bit for bit."""


def nats_daemon(tmp: Path, cache: str, url: str, extra: str = "") -> DaemonProcess:
    tmp.mkdir(exist_ok=True)
    d = DaemonProcess(tmp, cache)
    d.config.write_text(CONFIG.format(state=d.state, cache=cache, url=url, extra=extra))
    return d


def frames(streams: int = STREAMS, per_stream: int = FRAMES) -> list[tuple[str, bytes]]:
    """`per_stream` rounds, each one frame of every stream, as (subject, payload)."""
    rng = np.random.default_rng(7)
    return [
        (f"sensors.n-{s:03d}", encode_frame(f"n-{s:03d}", k, k * 0.01, **payload(rng)))
        for k in range(1, per_stream + 1)
        for s in range(streams)
    ]


def moments_by_id(client: Client, stream: str = "MOMENTS") -> dict[tuple[str, int], bytes]:
    """Every stored moment, by (stream id, seq) — asserting each is stored once, under its
    `Nats-Msg-Id`."""
    out: dict[tuple[str, int], bytes] = {}
    reader = MomentReader()
    for raw in client.read_stream(stream):
        (moment,) = reader.feed(raw.data)
        key = (moment.stream_id, moment.seq)
        assert key not in out, f"moment {key} stored twice"
        assert raw.headers["Nats-Msg-Id"] == f"{moment.stream_id}:{moment.seq}"
        assert raw.subject == f"moments.{moment.stream_id}"
        out[key] = np.asarray(moment.values, np.float32).tobytes()
    return out


def all_acknowledged(client: Client, n: int) -> bool:
    info = client.consumer("SENSORS", "enactive")
    return info.num_ack_pending == 0 and info.num_pending == 0 and info.ack_floor.stream_seq >= n


def wait_acknowledged(client: Client, daemon: DaemonProcess, n: int, timeout: float = 60) -> None:
    """Every frame acknowledged, or an assertion naming the consumer's state."""
    try:
        wait_until(lambda: all_acknowledged(client, n), "every frame acknowledged", timeout)
    except TimeoutError:
        info = client.consumer("SENSORS", "enactive")
        source = {k: v for k, v in daemon.metrics().items() if "nats" in str(k) or "state" in k[0]}
        raise AssertionError(f"not every frame acknowledged: {info}; {source}") from None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path / "js").start()
    yield s
    s.stop(signal.SIGKILL)


def uninterrupted(tmp: Path, cache: str, messages: list[tuple[str, bytes]]) -> dict:
    """The moments one uninterrupted daemon, on a server of its own, gives `messages`."""
    server = NatsServer(tmp / "js").start()
    daemon = nats_daemon(tmp, cache, server.url).start()
    client = Client(server.url)
    try:
        client.publish_many(messages)
        n = len(messages)
        wait_until(lambda: client.stream_messages("MOMENTS") == n, "reference", 300)
        return moments_by_id(client)
    finally:
        client.close()
        daemon.kill()
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, compilation_cache: str) -> dict:
    """The moments of an uninterrupted run over the same frames."""
    return uninterrupted(tmp_path_factory.mktemp("reference"), compilation_cache, frames())


def test_frames_in_moments_out_and_poison_terminated(
    server: NatsServer, tmp_path: Path, compilation_cache: str
) -> None:
    daemon = nats_daemon(tmp_path, compilation_cache, server.url).start()
    client = Client(server.url)
    try:
        assert daemon.http("/readyz") == (200, "ready\n")
        rng = np.random.default_rng(1)
        good = [
            (f"sensors.p-{s}", encode_frame(f"p-{s}", k, 0.0, **payload(rng)))
            for k in range(1, 31)
            for s in range(20)
        ]
        bad_nan = {**payload(rng), "sensory": np.full(DIMS.sensory, np.nan, np.float32)}
        poison = [
            ("sensors.p-0", b"\x00\x01not a frame at all"),  # bad bytes
            ("sensors.p-1", encode_frame("p-1", 100, 0.0, sensory=np.zeros(DIMS.sensory + 1))),
            ("sensors.p-2", encode_frame("p-2", 100, 0.0, **bad_nan)),
            ("sensors.p-3", encode_frame("p-4", 100, 0.0, **payload(rng))),  # wrong subject
            ("sensors.p-5", b"{not json"),
        ]
        # The poison sits in the middle of the streams' frames: it must not block them.
        messages = good[:300] + poison + good[300:]
        json_frames = [
            ("sensors.j-0", encode_json_frame("j-0", k, 0.0, **payload(rng))) for k in range(1, 11)
        ]
        client.publish_many(messages + json_frames)
        total = len(good) + len(json_frames)
        wait_until(lambda: client.stream_messages("MOMENTS") == total, "every moment")
        wait_until(lambda: all_acknowledged(client, len(messages) + len(json_frames)), "acks")
        stored = moments_by_id(client)
        assert set(stored) == {(f"p-{s}", k) for k in range(1, 31) for s in range(20)} | {
            ("j-0", k) for k in range(1, 11)
        }
        m = daemon.metrics()
        rejected = {
            dict(labels)["reason"]: v
            for (name, labels), v in m.items()
            if name == "enactive_frames_rejected_total" and dict(labels)["source"] == "nats" and v
        }
        assert rejected == {
            "bad_magic": 1, "dim_mismatch": 1, "non_finite": 1, "bad_stream_id": 1, "bad_json": 1,
        }  # fmt: skip
        acks = {dict(k[1])["kind"]: v for k, v in m.items() if k[0] == "enactive_source_acks_total"}
        assert acks == {"ack": total, "term": len(poison)}
        assert m[("enactive_source_up", (("source", "nats"),))] == 1
        assert m[("enactive_moments_emitted_total", (("sink", "nats"),))] == total
        assert m[("enactive_frames_received_total", (("source", "nats"),))] == total + len(poison)
        wait_until(
            lambda: (
                daemon.metrics()[("enactive_source_ack_lag_seconds", (("source", "nats"),))] == 0
            ),
            "no frame left unacknowledged",
        )
        assert daemon.stop() == 0
    finally:
        client.close()
        daemon.kill()


def test_exactly_once_across_sigkills(
    server: NatsServer, tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    """Frames are published in rounds while the daemon is killed (SIGKILL) three times at
    random moments and restarted: every frame yields exactly one stored moment, bit for
    bit the one of the uninterrupted run."""
    rand = random.Random(11)
    daemon = nats_daemon(tmp_path, compilation_cache, server.url).start()
    client = Client(server.url)
    messages = frames()
    kills = sorted(rand.sample(range(10, FRAMES - 5), 3))
    duplicates = 0.0
    try:
        for k in range(FRAMES):
            client.publish_many(messages[k * STREAMS : (k + 1) * STREAMS])
            if k in kills:
                # Let it get somewhere into what it has (a random moment), then kill.
                wait_until(
                    lambda k=k: client.stream_messages("MOMENTS") >= (k - 5) * STREAMS,
                    "the daemon processing",
                )
                daemon.kill()  # SIGKILL
                daemon.start()
        n = STREAMS * FRAMES
        wait_until(lambda: client.stream_messages("MOMENTS") >= n, "every moment", 120)
        wait_acknowledged(client, daemon, n)
        duplicates = daemon.metrics()[("enactive_sink_duplicates_total", (("sink", "nats"),))]
        stored = moments_by_id(client)
        assert len(stored) == n == client.stream_messages("MOMENTS")
        assert stored.keys() == reference.keys()
        different = [key for key in reference if stored[key] != reference[key]]
        assert not different, f"{len(different)} moments differ from the uninterrupted run"
        assert daemon.stop() == 0
    finally:
        client.close()
        daemon.kill()
    assert duplicates >= 0  # (how many re-emitted moments the server dropped: logged below)
    print(f"kills after rounds {kills}; duplicates dropped by the server after the last: "
          f"{duplicates:g}")  # fmt: skip


def test_server_restart_mid_stream(
    server: NatsServer, tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    daemon = nats_daemon(tmp_path, compilation_cache, server.url).start()
    client = Client(server.url)
    messages = frames()
    half = len(messages) // 2
    try:
        client.publish_many(messages[:half])
        wait_until(lambda: client.stream_messages("MOMENTS") >= half // 4, "some moments")
        client.close()
        server.restart()  # same port, same store
        wait_until(
            lambda: (
                daemon.metrics()[("enactive_source_reconnects_total", (("source", "nats"),))] >= 1
            ),
            "the daemon reconnected",
        )
        client = Client(server.url)
        client.publish_many(messages[half:])
        n = len(messages)
        wait_until(lambda: client.stream_messages("MOMENTS") >= n, "every moment", 120)
        wait_acknowledged(client, daemon, n)
        stored = moments_by_id(client)
        assert len(stored) == n == client.stream_messages("MOMENTS")
        assert all(stored[key] == reference[key] for key in reference)
        assert daemon.http("/readyz") == (200, "ready\n")
        assert daemon.stop() == 0
    finally:
        client.close()
        daemon.kill()


def test_a_full_moments_stream_slows_the_daemon_without_growing_memory(
    server: NatsServer, tmp_path: Path, compilation_cache: str
) -> None:
    """A moments stream that takes no more (created beforehand with a limit, discard
    new) stalls publication: the daemon stops taking frames, its memory stays flat; once
    the limit is lifted every moment arrives, once."""
    from nats.js import api

    client = Client(server.url)
    client.run(
        client.js.add_stream(
            name="MOMENTS",
            subjects=["moments.>"],
            max_msgs=500,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=300,
        )
    )
    daemon = nats_daemon(
        tmp_path, compilation_cache, server.url, "moments_buffer = 256\npublish_in_flight = 64"
    ).start()
    try:
        messages = frames(50, 400)  # 20,000 frames
        client.publish_many(messages)
        wait_until(lambda: client.stream_messages("MOMENTS") == 500, "the stream full")
        rss, processed = [], []
        for age in (2, 4, 6):  # stalled: no frame processed, memory flat, effects unsaved
            wait_until(
                lambda age=age: daemon.metrics()[("enactive_state_unsaved_age_seconds", ())] >= age,
                "the daemon stalled",
            )
            processed.append(daemon.metrics()[("enactive_frames_processed_total", ())])
            rss.append(_rss(daemon))
        assert processed[-1] == processed[0], processed
        # What it took and holds is kept alive (+WPI): the server delivers nothing again.
        assert daemon.metrics()[("enactive_source_redeliveries_total", (("source", "nats"),))] == 0
        assert max(rss) - min(rss) < 20 << 20, f"RSS moved {rss}"
        assert daemon.metrics()[("enactive_frames_processed_total", ())] < 2_000
        client.run(
            client.js.update_stream(
                api.StreamConfig(
                    name="MOMENTS",
                    subjects=["moments.>"],
                    max_msgs=-1,
                    discard=api.DiscardPolicy.NEW,
                    duplicate_window=300,
                )
            )
        )
        n = len(messages)
        wait_until(lambda: client.stream_messages("MOMENTS") >= n, "every moment", 120)
        wait_acknowledged(client, daemon, n)
        assert len(moments_by_id(client)) == n == client.stream_messages("MOMENTS")
        assert daemon.stop() == 0
    finally:
        client.close()
        daemon.kill()


def _rss(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_an_incompatible_existing_stream_is_one_line(
    server: NatsServer, tmp_path: Path, compilation_cache: str
) -> None:
    client = Client(server.url)
    try:
        client.run(client.js.add_stream(name="SENSORS", subjects=["other.>"]))
    finally:
        client.close()
    daemon = nats_daemon(tmp_path, compilation_cache, server.url)
    with pytest.raises(RuntimeError) as e:
        daemon.start()
    tail = daemon.output().strip().splitlines()[-1]
    assert tail.startswith("enactive-stream: error: JetStream stream SENSORS exists with")
    assert "Traceback" not in daemon.output()
    assert "exited 2" in str(e.value)


def test_no_server_is_one_line(tmp_path: Path, compilation_cache: str) -> None:
    need_nats()
    daemon = nats_daemon(
        tmp_path, compilation_cache, f"nats://127.0.0.1:{free_port()}", "connect_timeout_s = 1"
    )
    with pytest.raises(RuntimeError):
        daemon.start()
    assert (
        daemon.output()
        .strip()
        .splitlines()[-1]
        .startswith("enactive-stream: error: cannot connect to NATS at nats://127.0.0.1:")
    )


def test_the_core_runs_without_the_nats_extra(tmp_path: Path) -> None:
    """Without nats-py: the daemon's modules import, and a [nats] section is refused with
    one line naming the extra."""
    r = run_without(["nats"], [], '[nats]\nurl = "nats://127.0.0.1:4222"\n', tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "enactive-stream: error: the NATS source and sink need the nats extra: "
        "pip install 'enactive-stream[nats]'"
    )


def test_the_integrations_example(
    server: NatsServer, tmp_path: Path, compilation_cache: str
) -> None:
    """docs/integrations.md's two scripts, as printed, against a daemon with the default
    model: ten frames published, ten moments read back."""
    docs = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    blocks = [b.split("```", 1)[0] for b in docs.split("```python\n")[1:3]]
    publish, read = (b.replace("nats://127.0.0.1:4222", server.url) for b in blocks)
    assert "# publish.py" in publish and "# moments.py" in read
    daemon = DaemonProcess(tmp_path, compilation_cache)
    daemon.config.write_text(
        f"""[ingest]\ntcp = "127.0.0.1:0"\nudp = ""\n[output]\ntcp = ""\n[metrics]
listen = "127.0.0.1:0"\n[batching]\nbuckets = [8]\n[state]\ndir = "{daemon.state}"
[device]\ncompilation_cache_dir = "{compilation_cache}"\n[log]\nstatus_interval_s = 0
[nats]\nurl = "{server.url}"\n"""
    )
    daemon.start()
    try:
        run = [sys.executable, "-c"]
        subprocess.run([*run, publish], check=True, timeout=60)
        out = subprocess.run([*run, read], check=True, timeout=60, capture_output=True, text=True)
        lines = out.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [["robot-1", str(k)] for k in range(1, 11)]
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_record_a_nats_run_and_replay_it_into_nats(
    server: NatsServer, tmp_path: Path, compilation_cache: str
) -> None:
    """A daemon consuming NATS records what it accepted; `replay --to nats://` feeds the
    recording to a fresh server and daemon: every moment bit for bit the same."""
    recording = tmp_path / "nats.rec"
    messages = frames(20, 20)
    first = nats_daemon(tmp_path / "a", compilation_cache, server.url)
    first.args = ["--record", str(recording)]
    client = Client(server.url)
    try:
        first.start()
        client.publish_many(messages)
        wait_until(lambda: client.stream_messages("MOMENTS") == len(messages), "A's moments")
        original = moments_by_id(client)
        assert first.stop() == 0
    finally:
        client.close()
        first.kill()
    fresh = NatsServer(tmp_path / "js-b").start()
    second = nats_daemon(tmp_path / "b", compilation_cache, fresh.url).start()
    client = Client(fresh.url)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "stream.cli", "replay", str(recording),
             "--as-fast-as-possible", "--to", fresh.url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"replayed {len(messages)} frames" in done.stdout
        wait_until(lambda: client.stream_messages("MOMENTS") == len(messages), "B's moments")
        assert moments_by_id(client) == original
        assert second.stop() == 0
    finally:
        client.close()
        second.kill()
        fresh.stop(signal.SIGKILL)


def test_deleted_and_expired_frames_are_skipped(
    server: NatsServer, tmp_path: Path, compilation_cache: str
) -> None:
    """Messages gone from the frames stream before the daemon reads them (deleted, or
    purged from the front as `max_age` does) are stepped over, not waited for."""
    client = Client(server.url)
    client.run(client.js.add_stream(name="SENSORS", subjects=["sensors.>"]))
    messages = frames(3, 30)  # stream sequences 1..90
    client.publish_many(messages)
    client.run(client.js.purge_stream("SENSORS", seq=6))  # 1..5 gone, as if expired
    for seq in range(40, 50):
        assert client.run(client.js.delete_msg("SENSORS", seq))
    daemon = nats_daemon(tmp_path, compilation_cache, server.url).start()
    try:
        left = len(messages) - 5 - 10
        wait_until(lambda: client.stream_messages("MOMENTS") == left, "the moments left")
        stored = moments_by_id(client)
        assert len(stored) == left
        assert ("n-000", 1) not in stored and ("n-000", 14) not in stored  # seqs 1, 40
        info = client.consumer("SENSORS", "enactive")
        wait_until(
            lambda: client.consumer("SENSORS", "enactive").num_ack_pending == 0,
            f"every frame acknowledged: {info}",
        )
        assert daemon.stop() == 0
    finally:
        client.close()
        daemon.kill()
