"""MQTT in and out, against a real mosquitto started here: frames published to
`sensors/<id>` come back as moments on `moments/<id>` (and to TCP subscribers), across a
broker restart and a daemon restart with a persistent session; duplicates and bad input
are counted, never stepped; a missing broker, refused credentials or a missing extra stop
the daemon with one line. The source and sink are also driven alone (no daemon): the
source's inbox stays bounded while the pipeline is full and loses nothing, a broker
restart redelivers what was not acknowledged, the sink buffers while the broker is away,
TLS with a client certificate works (and fails in one line without it), and a broker that
refuses MQTT 5 is spoken to in 3.1.1."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np
import pytest

from stream.protocol import (
    Dims,
    Frame,
    FrameRun,
    Moment,
    MomentBatch,
    MomentReader,
    MomentSizes,
    encode_frame,
    encode_json_frame,
)

from .daemon import DIMS, DaemonProcess, free_port, payload, run_without, wait_for
from .mosquitto import Client, Mosquitto, need_mosquitto

pytestmark = pytest.mark.timeout(180)

MQTT = """\
[mqtt]
url = "{url}"
client_id = "{client_id}"
"""


def mqtt_daemon(tmp: Path, cache: str, url: str, client_id: str = "es-test") -> DaemonProcess:
    tmp.mkdir(exist_ok=True)
    return DaemonProcess(tmp, cache, extra=MQTT.format(url=url, client_id=client_id))


def frames(prefix: str, streams: int, per_stream: int, first: int = 1) -> list[tuple[str, bytes]]:
    """`per_stream` rounds of one binary frame per stream, as (topic, payload)."""
    rng = np.random.default_rng(len(prefix) * 1000 + first)
    return [
        (f"sensors/{prefix}-{s}", encode_frame(f"{prefix}-{s}", k, k * 0.01, **payload(rng)))
        for k in range(first, first + per_stream)
        for s in range(streams)
    ]


def ids(messages: list[tuple[str, bytes]]) -> collections.Counter[tuple[str, int]]:
    """The (stream id, seq) each published frame should yield a moment for."""
    out: collections.Counter[tuple[str, int]] = collections.Counter()
    for topic, data in messages:
        seq = int.from_bytes(data[24:32], "little") if data[:1] != b"{" else None
        out[(topic.split("/", 1)[1], seq)] += 1  # type: ignore[index]
    return out


def moments_of(subscriber: Client, prefix: str = "") -> collections.Counter[tuple[str, int]]:
    """Every moment received on `moments/#` (of streams starting with `prefix`), counted
    by (stream id, seq) — asserting each message is one record on its stream's topic."""
    out: collections.Counter[tuple[str, int]] = collections.Counter()
    for message in subscriber.received():
        (moment,) = MomentReader().feed(message.payload)
        assert message.topic == f"moments/{moment.stream_id}"
        if moment.stream_id.startswith(prefix):
            out[(moment.stream_id, moment.seq)] += 1
    return out


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    return daemon.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def rejected(daemon: DaemonProcess) -> dict[str, float]:
    return {
        dict(labels)["reason"]: v
        for (name, labels), v in daemon.metrics().items()
        if name == "enactive_frames_rejected_total" and dict(labels)["source"] == "mqtt" and v
    }


# -- one daemon for the round trip, duplicates and bad input ------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def daemon(
    broker: Mosquitto,
    tmp_path_factory: pytest.TempPathFactory,
    compilation_cache: str,
) -> Iterator[DaemonProcess]:
    d = mqtt_daemon(tmp_path_factory.mktemp("daemon"), compilation_cache, broker.url).start()
    yield d
    d.kill()


@pytest.fixture
def subscriber(broker: Mosquitto) -> Iterator[Client]:
    client = Client(broker.port).subscribe("moments/#")
    yield client
    client.close()


def test_round_trip_to_mqtt_and_tcp(
    daemon: DaemonProcess, broker: Mosquitto, subscriber: Client
) -> None:
    """Frames of several streams (binary and JSON) published at QoS 1: exactly one moment
    per frame on `moments/<id>`, and the same moments to a TCP subscriber."""
    tcp = daemon.subscribe("rt-*")
    assert daemon.wait_metric("enactive_subscribers", {}, 1) >= 1
    rng = np.random.default_rng(3)
    messages = frames("rt", 6, 40) + [
        ("sensors/rt-json", encode_json_frame("rt-json", k, 0.0, **payload(rng)))
        for k in range(1, 11)
    ]
    expected = ids(messages[:-10]) + collections.Counter(("rt-json", k) for k in range(1, 11))
    publisher = Client(broker.port)
    try:
        publisher.publish_many(messages)
    finally:
        publisher.close()
    n = len(messages)
    wait_for(lambda: sum(moments_of(subscriber, "rt-").values()) >= n, "every moment on MQTT")
    assert moments_of(subscriber, "rt-") == expected  # each exactly once
    got = collections.Counter((m.stream_id, m.seq) for m in tcp.read(n))
    assert got == expected
    # Per stream, in seq order on the topic.
    by_stream: dict[str, list[int]] = collections.defaultdict(list)
    for message in subscriber.received():
        (m,) = MomentReader().feed(message.payload)
        by_stream[m.stream_id].append(m.seq)
    assert all(seqs == sorted(seqs) for seqs in by_stream.values())
    assert daemon.wait_metric("enactive_moments_emitted_total", {"sink": "mqtt"}, n) >= n
    assert metric(daemon, "enactive_frames_received_total", source="mqtt") >= n
    assert metric(daemon, "enactive_source_up", source="mqtt") == 1
    assert daemon.http("/readyz") == (200, "ready\n")


def test_a_duplicate_is_rejected_not_stepped(
    daemon: DaemonProcess, broker: Mosquitto, subscriber: Client
) -> None:
    """The same frame (stream, seq) published twice, and an older one after a newer: one
    moment each, the repeats counted `duplicate_seq` / `stale_seq`."""
    before = rejected(daemon)
    rng = np.random.default_rng(4)
    one = encode_frame("dup-0", 1, 0.0, **payload(rng))
    two = encode_frame("dup-0", 2, 0.0, **payload(rng))
    publisher = Client(broker.port)
    try:
        publisher.publish_many([("sensors/dup-0", one), ("sensors/dup-0", one)])
        publisher.publish_many([("sensors/dup-0", two), ("sensors/dup-0", one)])
    finally:
        publisher.close()
    wait_for(
        lambda: rejected(daemon).get("stale_seq", 0) > before.get("stale_seq", 0),
        f"the repeats counted: {rejected(daemon)}",
    )
    wait_for(lambda: sum(moments_of(subscriber, "dup-").values()) >= 2, "two moments")
    after = rejected(daemon)
    assert after.get("duplicate_seq", 0) - before.get("duplicate_seq", 0) == 1
    assert after.get("stale_seq", 0) - before.get("stale_seq", 0) == 1
    assert moments_of(subscriber, "dup-") == {("dup-0", 1): 1, ("dup-0", 2): 1}


def test_bad_input_is_counted_by_reason_and_the_stream_goes_on(
    daemon: DaemonProcess, broker: Mosquitto, subscriber: Client
) -> None:
    before = rejected(daemon)
    rng = np.random.default_rng(5)
    bad_nan = {**payload(rng), "sensory": np.full(DIMS.sensory, np.nan, np.float32)}
    poison = [
        ("sensors/bad-0", b"\x00\x01not a frame at all"),  # bad_magic
        ("sensors/bad-1", encode_frame("bad-1", 1, 0.0, sensory=np.zeros(DIMS.sensory + 1))),
        ("sensors/bad-2", encode_frame("bad-2", 1, 0.0, **bad_nan)),  # non_finite
        ("sensors/bad-3", encode_frame("bad-4", 1, 0.0, **payload(rng))),  # topic is not its id
        ("sensors/bad-5", b"{not json"),  # bad_json
        ("sensors/bad-6/x", encode_frame("bad-6", 1, 0.0, **payload(rng))),  # two levels
    ]
    good = frames("ok", 3, 20)
    publisher = Client(broker.port)
    try:
        publisher.publish_many(good[:30] + poison + good[30:])
    finally:
        publisher.close()
    wait_for(lambda: sum(moments_of(subscriber, "ok-").values()) >= len(good), "good moments")
    assert moments_of(subscriber, "ok-") == ids(good)
    assert not moments_of(subscriber, "bad-")
    wait_for(lambda: sum(rejected(daemon).values()) - sum(before.values()) >= 6, "six rejections")
    after = rejected(daemon)
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert delta == {
        "bad_magic": 1, "dim_mismatch": 1, "non_finite": 1, "bad_stream_id": 2, "bad_json": 1,
    }  # fmt: skip
    assert daemon.http("/readyz") == (200, "ready\n")
    assert daemon.proc is not None and daemon.proc.poll() is None


# -- restarts -----------------------------------------------------------------------------------


def test_broker_restart_mid_stream(tmp_path: Path, compilation_cache: str) -> None:
    """mosquitto stopped and started again (same port and store) while the daemon runs: it
    is not ready while the source is down, reconnects by itself, and every frame published
    after the restart yields a moment (the sink reconnected too)."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    daemon = mqtt_daemon(tmp_path / "d", compilation_cache, broker.url).start()
    subscriber = Client(broker.port).subscribe("moments/#")
    try:
        first = frames("br", 4, 20)
        publisher = Client(broker.port)
        publisher.publish_many(first)
        publisher.close()
        wait_for(lambda: sum(moments_of(subscriber).values()) >= len(first), "first half")
        subscriber.close()
        broker.stop()
        wait_for(lambda: metric(daemon, "enactive_source_up", source="mqtt") == 0, "source down")
        assert daemon.http("/readyz")[0] == 503
        broker.start()
        wait_for(
            lambda: metric(daemon, "enactive_source_up", source="mqtt") == 1, "source up again"
        )
        subscriber = Client(broker.port).subscribe("moments/#")
        second = frames("br", 4, 20, first=21)
        publisher = Client(broker.port)
        publisher.publish_many(second)
        publisher.close()
        wait_for(lambda: sum(moments_of(subscriber).values()) >= len(second), "second half")
        assert moments_of(subscriber) == ids(second)
        assert metric(daemon, "enactive_source_disconnects_total", source="mqtt") >= 1
        assert metric(daemon, "enactive_source_reconnects_total", source="mqtt") >= 1
        wait_for(lambda: daemon.http("/readyz") == (200, "ready\n"), "ready again")
        # Stopped while the broker is away (reconnecting): it stops at once, cleanly.
        subscriber.close()
        broker.stop()
        wait_for(lambda: metric(daemon, "enactive_source_up", source="mqtt") == 0, "down again")
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 8
        assert "Traceback" not in daemon.output()
    finally:
        subscriber.close()
        daemon.kill()
        broker.stop(signal.SIGKILL)


def test_daemon_restart_with_a_persistent_session_loses_nothing(
    tmp_path: Path, compilation_cache: str
) -> None:
    """The daemon stopped (SIGTERM); frames published at QoS 1 while it is away wait in
    its session at the broker; started again (same client id and state), it gets them all."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    daemon = mqtt_daemon(tmp_path / "d", compilation_cache, broker.url, client_id="es-restart")
    subscriber = Client(broker.port).subscribe("moments/#")
    try:
        daemon.start()
        assert daemon.stop() == 0
        away = frames("away", 5, 30)
        publisher = Client(broker.port)
        publisher.publish_many(away)
        publisher.close()
        daemon.start()
        wait_for(lambda: sum(moments_of(subscriber, "away-").values()) >= len(away), "moments")
        assert moments_of(subscriber, "away-") == ids(away)
        assert metric(daemon, "enactive_frames_received_total", source="mqtt") == len(away)
        assert daemon.stop() == 0
    finally:
        subscriber.close()
        daemon.kill()
        broker.stop(signal.SIGKILL)


# -- one-line start-up failures -------------------------------------------------------------


def test_refused_credentials_are_one_line_at_once(tmp_path: Path, compilation_cache: str) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", anonymous=False).start()
    daemon = mqtt_daemon(tmp_path / "d", compilation_cache, broker.url)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            daemon.start()
        assert "exited 2" in str(e.value)
        assert time.monotonic() - started < 20  # not retried for 30 s
        out = daemon.output()
        assert out.strip().splitlines()[-1] == (
            f"enactive-stream: error: cannot connect to MQTT at {broker.url}: "
            "the broker refused the connection: Not authorized"
        )
        assert "Traceback" not in out
    finally:
        broker.stop(signal.SIGKILL)


def test_no_broker_is_one_line(tmp_path: Path, compilation_cache: str) -> None:
    need_mosquitto()
    url = f"mqtt://127.0.0.1:{free_port()}"
    daemon = mqtt_daemon(tmp_path, compilation_cache, url)
    daemon.config.write_text(daemon.config.read_text() + "connect_timeout_s = 1\n")
    argv = [sys.executable, "-m", "stream.cli", "run", "--config", str(daemon.config)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"enactive-stream: error: cannot connect to MQTT at {url}: Connection refused"
    )
    assert "Traceback" not in out.stderr + out.stdout


def test_the_integrations_example(
    broker: Mosquitto, tmp_path: Path, compilation_cache: str
) -> None:
    """docs/integrations.md's two MQTT scripts, as printed, against a daemon with the
    default model: the reader (told only to say when it has subscribed) prints the 20
    moments of the frames the publisher sent."""
    docs = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    section = docs.split("\n## MQTT\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:3]]
    read, publish = (b.replace("1883", str(broker.port)) for b in blocks)
    assert "# moments.py" in read and "# publish.py" in publish
    read = read.replace(
        "client.loop_forever()",
        "client.on_subscribe = lambda *a: print('subscribed', flush=True)\nclient.loop_forever()",
    )
    d = DaemonProcess(tmp_path, compilation_cache)
    d.config.write_text(
        f"""[ingest]\ntcp = ""\nudp = ""\n[output]\ntcp = ""\n[metrics]
listen = "127.0.0.1:0"\n[batching]\nbuckets = [8]\n[state]\ndir = "{d.state}"
[device]\ncompilation_cache_dir = "{compilation_cache}"\n[log]\nstatus_interval_s = 0
[mqtt]\nurl = "{broker.url}"\nclient_id = "es-docs"\n"""
    )
    d.start()
    reader = subprocess.Popen(
        [sys.executable, "-c", read], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline() == "subscribed\n"
        subprocess.run([sys.executable, "-c", publish], check=True, timeout=60)
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        got = sorted((line.split()[0], int(line.split()[1])) for line in out.splitlines())
        assert got == sorted((f"robot-{r}", k) for r in (1, 2) for k in range(1, 11))
        assert d.stop() == 0
    finally:
        reader.kill()
        d.kill()


def test_the_core_runs_without_the_mqtt_extra(tmp_path: Path) -> None:
    """Without paho-mqtt: the daemon's modules import, and an [mqtt] section is refused
    with one line naming the extra."""
    r = run_without(
        ["paho", "aiomqtt"], ["stream.mqtt"], '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n', tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "enactive-stream: error: the MQTT source and sink need the mqtt extra: "
        "pip install 'enactive-stream[mqtt]'"
    )


# -- the source and the sink alone ----------------------------------------------------------

from stream.admission import Admission  # noqa: E402
from stream.buffers import WeightedBuffer  # noqa: E402
from stream.commits import CommitLog  # noqa: E402
from stream.events import Listener  # noqa: E402
from stream.ingest import Ingest, Item  # noqa: E402
from stream.mqtt import MqttError, MqttSettings  # noqa: E402
from stream.streams import StreamTable  # noqa: E402

SMALL = Dims(4, 3, 2, 2)


class Counts(Listener):
    def __init__(self) -> None:
        self.c: collections.Counter[str] = collections.Counter()

    def received(self, source: str, n: int) -> None:
        self.c["received"] += n

    def rejected(self, source: str, reason: str) -> None:
        self.c[reason] += 1

    def source_state(self, source: str, up: bool) -> None:
        self.c["up" if up else "down"] += 1

    def source_redelivered(self, source: str, n: int) -> None:
        self.c["redelivered"] += n

    def emitted(self, sink: str, n: int) -> None:
        self.c["emitted"] += n

    def sink_dropped(self, sink: str, reason: str, n: int) -> None:
        self.c[f"dropped:{reason}"] += n


async def until(
    predicate: Callable[[], bool],
    what: str | Callable[[], str],
    within: float = 20.0,
    each: Callable[[], Any] | None = None,
) -> None:
    """Poll `predicate` on the event loop (calling `each` first every time) for up to
    `within` seconds (a readiness check, not a sleep)."""
    for _ in range(int(within / 0.01)):
        if each is not None:
            each()
        if predicate():
            return
        await anyio.sleep(0.01)
    raise TimeoutError(what if isinstance(what, str) else what())


def small_frames(streams: int, per_stream: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(9)
    return [
        (f"sensors/c-{s}", encode_frame(f"c-{s}", k, 0.0, sensory=rng.standard_normal(4)))
        for k in range(1, per_stream + 1)
        for s in range(streams)
    ]


def taken(items: list[Item]) -> list[tuple[str, int]]:
    out = []
    for item in items:
        frames_ = item.frames() if type(item) is FrameRun else [item]
        out += [(f.stream_id, f.seq) for f in frames_ if isinstance(f, Frame)]
    return out


@pytest.mark.parametrize("qos", [1, 0])
async def test_the_inbox_stays_bounded_while_the_pipeline_is_full_and_nothing_is_lost(
    tmp_path: Path, qos: int
) -> None:
    """A pipeline that takes 16 frames, then one item a poll: the source stops taking, its
    inbox stays bounded — at QoS 1 by the Receive Maximum (the broker holds the rest); at
    QoS 0, which MQTT does not limit, by pausing its reads (TCP holds the broker back);
    every frame arrives once and in order."""
    from stream.sources.mqtt import HAND_OVER, INBOX_PAUSE, MqttSource

    broker = Mosquitto(tmp_path / "mosquitto").start()
    counts = Counts()
    buffer: WeightedBuffer[Item] = WeightedBuffer(16)
    ingest = Ingest(buffer, dims=SMALL, max_frame_bytes=4096, events=counts)
    source = MqttSource(
        MqttSettings(url=broker.url, client_id="bounded"), topics="sensors/+", qos=qos
    )
    messages = small_frames(4, 1500)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, ingest)
            publisher = Client(broker.port)
            await anyio.to_thread.run_sync(publisher.publish_many, messages, qos)
            publisher.close()
            await until(lambda: counts.c["received"] >= 16, "frames taken")
            await anyio.sleep(0.5)  # what would pile up, piles up now
            assert len(source._inbox) <= INBOX_PAUSE
            assert source.acknowledged <= 16 + HAND_OVER  # (a run goes whole into an empty buffer)
            assert counts.c["received"] < len(messages)
            out: list[Item] = []
            peak = [0, 0]  # the most held, and how often reading was paused

            def drain() -> None:
                connection = source._connection
                paused = connection is not None and connection.paused
                peak[:] = [max(peak[0], len(source._inbox)), peak[1] + paused]
                with contextlib.suppress(anyio.WouldBlock):  # slowly: an item a poll
                    out.append(buffer.get_nowait())

            await until(lambda: len(taken(out)) >= len(messages), "every frame", each=drain)
            assert peak[0] <= INBOX_PAUSE
            if not qos:  # the broker pushed everything: the source held back by not reading
                assert peak[1] > 0
            ingest.stop()
    finally:
        broker.stop(signal.SIGKILL)
    got = taken(out)
    assert collections.Counter(got) == ids(messages)  # all, once
    for s in range(4):
        seqs = [seq for sid, seq in got if sid == f"c-{s}"]
        assert seqs == sorted(seqs)
    assert source.acknowledged == (len(messages) if qos else 0)


async def test_a_broker_restart_redelivers_what_was_not_acknowledged(tmp_path: Path) -> None:
    """Frames delivered to a source that could not hand them over (the pipeline full) are
    not acknowledged: after a broker restart they come again (DUP), admission rejects
    what was taken twice, and every frame is taken once."""
    from stream.sources.mqtt import MqttSource

    broker = Mosquitto(tmp_path / "mosquitto").start()
    counts = Counts()
    buffer: WeightedBuffer[Item] = WeightedBuffer(8)
    admission = Admission(StreamTable(8, 8), counts, CommitLog(lambda s, p: None))
    ingest = Ingest(buffer, dims=SMALL, max_frame_bytes=4096, events=counts, admission=admission)
    source = MqttSource(MqttSettings(url=broker.url, client_id="redeliver"), topics="sensors/#")
    messages = small_frames(2, 40)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(source.run, ingest)
            publisher = Client(broker.port)
            await anyio.to_thread.run_sync(publisher.publish_many, messages)
            publisher.close()
            await until(  # all delivered; some taken, the rest held
                lambda: counts.c["received"] + len(source._inbox) >= len(messages), "delivered"
            )
            unacknowledged = len(messages) - source.acknowledged
            assert unacknowledged > 0
            await anyio.to_thread.run_sync(broker.restart)
            out: list[Item] = []
            await until(
                lambda: (
                    len(taken(out)) >= len(messages)
                    and counts.c["up"] == 2
                    and counts.c["redelivered"] >= unacknowledged
                ),
                lambda: f"{len(taken(out))} taken; {counts.c}; {unacknowledged} unacknowledged",
                each=lambda: out.extend(item for item, _ in buffer.get_all_nowait()),
            )
            ingest.stop()
    finally:
        broker.stop(signal.SIGKILL)
    got = taken(out)
    assert collections.Counter(got) == ids(messages)  # each once: the repeats were rejected
    assert counts.c["down"] == 1 and counts.c["up"] == 2
    # (and any whose PUBACK the broker had not read when it stopped)
    assert counts.c["redelivered"] >= unacknowledged
    assert counts.c["duplicate_seq"] + counts.c["stale_seq"] == counts.c["received"] - len(messages)


@pytest.mark.parametrize("qos", [1, 2])
async def test_the_sink_buffers_while_the_broker_is_away(tmp_path: Path, qos: int) -> None:
    """Moments offered while the broker is down are kept up to the bound (the rest
    dropped, `slow_sink`) and published once it is back; `emitted` counts what it has."""
    from stream.sinks.mqtt import MqttMomentSink

    broker = Mosquitto(tmp_path / "mosquitto").start()
    counts = Counts()
    sink = MqttMomentSink(
        MqttSettings(url=broker.url, client_id="sink"),
        topic="moments",
        qos=qos,
        buffer=100,
        events=counts,
    )
    sizes = MomentSizes(8, 4, 3, 2, 3)

    def batch(first: int, n: int) -> MomentBatch:
        values = np.zeros(sizes.total, np.float32)
        return MomentBatch.of([Moment(f"m-{i}", first, 0.0, 0, 0, sizes, values) for i in range(n)])

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(sink.run)
            subscriber = Client(broker.port).subscribe("moments/#")
            sink.offer(batch(1, 50))
            await until(lambda: counts.c["emitted"] >= 50, "the first batch")
            subscriber.close()
            await anyio.to_thread.run_sync(broker.stop)
            for k in (2, 3, 4):
                sink.offer(batch(k, 50))  # the third does not fit
            assert counts.c["dropped:slow_sink"] == 50
            assert sink.queued == 100
            await anyio.to_thread.run_sync(broker.start)
            subscriber = Client(broker.port).subscribe("moments/#")
            await until(lambda: counts.c["emitted"] >= 150, "the buffered batches")
            tg.cancel_scope.cancel()
        wait_for(lambda: len(subscriber.received()) >= 100, "the buffered moments")
        got = collections.Counter(
            (m.stream_id, m.seq)
            for message in subscriber.received()
            for m in MomentReader().feed(message.payload)
        )
        assert got == collections.Counter((f"m-{i}", k) for k in (2, 3) for i in range(50))
        subscriber.close()
    finally:
        broker.stop(signal.SIGKILL)
    assert counts.c["emitted"] == 150 and sink.queued == 0


async def test_mqtts_with_a_client_certificate(tmp_path: Path) -> None:
    """Over `mqtts://` with the broker's CA and a client certificate the source receives;
    without the certificate, or trusting another CA, the start fails in one line."""
    from stream.sources.mqtt import MqttSource

    from .test_tls import make_pki

    pki = make_pki(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other")
    broker = Mosquitto(tmp_path / "mosquitto", tls=pki).start()
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    counts = Counts()
    buffer: WeightedBuffer[Item] = WeightedBuffer(1000)
    ingest = Ingest(buffer, dims=SMALL, max_frame_bytes=4096, events=counts)
    settings = MqttSettings(
        url=url,
        client_id="tls",
        tls_ca_file=str(pki["ca.pem"]),
        tls_cert_file=str(pki["robot-7.pem"]),
        tls_key_file=str(pki["robot-7.key"]),
        connect_timeout_s=1.0,
    )
    messages = small_frames(2, 10)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(MqttSource(settings, topics="sensors/#").run, ingest)
            publisher = Client(broker.port)  # (the plain listener)
            await anyio.to_thread.run_sync(publisher.publish_many, messages)
            publisher.close()
            await until(lambda: counts.c["received"] >= len(messages), "frames over TLS")
            ingest.stop()
        assert collections.Counter(taken([i for i, _ in buffer.get_all_nowait()])) == ids(messages)
        for changed, expected in (
            ({"tls_cert_file": "", "tls_key_file": ""}, "cannot connect to MQTT at " + url),
            ({"tls_ca_file": str(other["ca.pem"])}, "certificate verify failed"),
        ):
            bad = dataclasses.replace(settings, **changed)
            with pytest.raises(MqttError) as e:
                await MqttSource(bad, topics="sensors/#").run(
                    Ingest(WeightedBuffer(10), dims=SMALL, max_frame_bytes=4096, events=counts)
                )
            assert expected in str(e.value) and "\n" not in str(e.value)
    finally:
        broker.stop(signal.SIGKILL)


async def refuse_mqtt5(listener: Any, port: int) -> None:
    """Answer an MQTT 5 CONNECT as an MQTT 3.1.1 broker does (CONNACK, return code 1
    "unacceptable protocol version", then close); pass any other connection through to
    the broker at `port`."""
    from anyio.streams.buffered import BufferedByteReceiveStream

    async def serve(client: Any) -> None:
        async with client:
            reader = BufferedByteReceiveStream(client)
            head = await reader.receive_exactly(1)
            size, shift, raw = 0, 0, b""
            while True:  # the remaining length, a variable byte integer
                byte = await reader.receive_exactly(1)
                raw += byte
                size |= (byte[0] & 0x7F) << shift
                shift += 7
                if not byte[0] & 0x80:
                    break
            body = await reader.receive_exactly(size)
            if body[6] == 5:  # protocol level, after the name "MQTT"
                await client.send(b"\x20\x02\x00\x01")
                return
            async with await anyio.connect_tcp("127.0.0.1", port) as upstream:
                await upstream.send(head + raw + body + reader.buffer)

                async def pipe(a: Any, b: Any) -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        async for data in a:
                            await b.send(data)
                    tg.cancel_scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(pipe, client, upstream)
                    tg.start_soon(pipe, upstream, client)

    async with listener:
        await listener.serve(serve)


async def test_a_broker_that_refuses_mqtt5_is_spoken_to_in_311(tmp_path: Path) -> None:
    """The source falls back to MQTT 3.1.1 (a persistent session: Clean Session 0) and
    takes frames as before."""
    from stream.sources.mqtt import MqttSource

    broker = Mosquitto(tmp_path / "mosquitto").start()
    counts = Counts()
    buffer: WeightedBuffer[Item] = WeightedBuffer(1000)
    ingest = Ingest(buffer, dims=SMALL, max_frame_bytes=4096, events=counts)
    messages = small_frames(2, 20)
    try:
        async with anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            tg.start_soon(refuse_mqtt5, listener, broker.port)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id="fallback")
            await tg.start(MqttSource(settings, topics="sensors/#").run, ingest)
            publisher = Client(broker.port)
            await anyio.to_thread.run_sync(publisher.publish_many, messages)
            publisher.close()
            await until(lambda: counts.c["received"] >= len(messages), "frames over 3.1.1")
            ingest.stop()
            await until(lambda: "Client fallback disconnected" in broker.log(), "disconnected")
            tg.cancel_scope.cancel()
    finally:
        broker.stop(signal.SIGKILL)
    assert collections.Counter(taken([i for i, _ in buffer.get_all_nowait()])) == ids(messages)
    assert "as fallback (p2, c0, k30)" in broker.log()  # MQTT 3.1.1, persistent session
