"""Scaled out over NATS JetStream partitions, against a real 3-node `nats-server`
cluster (R3 streams) started here: three daemons share twelve partitions, each frame
yields exactly one stored moment — the same, bit for bit, as one uninterrupted daemon's
— across a SIGKILLed instance replaced on an empty disk, a NATS node stopped, and two
instances given the same number."""

from __future__ import annotations

import collections
import contextlib
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.partitions import partition_of

from .daemon import DaemonProcess
from .natsserver import Client, NatsCluster, NatsServer, wait_until
from .test_nats import frames, moments_by_id, nats_daemon, uninterrupted

pytestmark = pytest.mark.timeout(900)

STREAMS, FRAMES, PARTITIONS, INSTANCES = 1000, 50, 12, 3
CLUSTER = """replicas = 3
[cluster]
instances = {instances}
instance = {instance}
partitions = {partitions}
"""


def instance(tmp: Path, cache: str, url: str, i: int) -> DaemonProcess:
    extra = CLUSTER.format(instances=INSTANCES, instance=i, partitions=PARTITIONS)
    return nats_daemon(tmp, cache, url, extra)


def owner(stream_id: str) -> int:
    return partition_of(stream_id, PARTITIONS) % INSTANCES


def processed(daemon: DaemonProcess) -> float:
    return daemon.metrics().get(("enactive_frames_processed_total", ()), 0.0)


def metric(daemon: DaemonProcess, name: str) -> float:
    return daemon.metrics().get((name, ()), 0.0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, compilation_cache: str) -> dict:
    """The moments of one uninterrupted daemon, no cluster, over the same frames."""
    tmp = tmp_path_factory.mktemp("reference")
    return uninterrupted(tmp, compilation_cache, frames(STREAMS, FRAMES))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(tmp_path / "nats").start()
    yield c
    c.stop(signal.SIGKILL)


def test_partition_of_places_ids_as_the_server_does(tmp_path: Path) -> None:
    from nats.js import api

    from stream.partitions import partition_transform

    server = NatsServer(tmp_path / "js").start()
    client = Client(server.url)
    try:
        source, destination = partition_transform("sensors.", PARTITIONS)
        config = api.StreamConfig(
            name="P", subjects=[source], subject_transform=api.SubjectTransform(source, destination)
        )
        client.run(client.js.add_stream(config))
        ids = [f"dev-{i}" for i in range(300)] + ["é-unicode", "x" * 200, "a_b-C"]
        client.publish_many([(f"sensors.{i}", b"x") for i in ids])
        stored = [m.subject for m in client.read_stream("P")]
        assert stored == [f"sensors.{partition_of(i, PARTITIONS)}.{i}" for i in ids]
    finally:
        client.close()
        server.stop(signal.SIGKILL)


@contextlib.contextmanager
def deployment(
    cluster: NatsCluster, tmp: Path, cache: str
) -> Iterator[tuple[list[DaemonProcess], Client]]:
    """Instances 0 to 2 started, and a client of the first node. On the way out every
    daemon in the list (a test may replace or add some) stops with status 0 — or, after a
    failure, is killed."""
    daemons = [instance(tmp / f"i{i}", cache, cluster.url, i) for i in range(INSTANCES)]
    client = Client(cluster.nodes[0].url)
    try:
        for d in daemons:
            d.start()
        yield daemons, client
        for d in daemons:
            assert d.stop() == 0
    finally:
        client.close()
        for d in daemons:
            d.kill()


def settle(client: Client, daemons: list[DaemonProcess], reference: dict) -> dict:
    """Wait for every moment, then check each frame has exactly one, equal to the
    uninterrupted run's."""
    n = STREAMS * FRAMES
    try:
        wait_until(lambda: client.stream_messages("MOMENTS") >= n, "every moment", 120)
    except TimeoutError:
        names = ("processed", "partitions_owned", "fencing", "checkpoint_writes", "pending")
        state = [
            {k: v for k, v in d.metrics().items() if any(w in k[0] for w in names)} for d in daemons
        ]
        logs = "\n".join(d.output()[-3000:] for d in daemons)
        raise AssertionError(
            f"{client.stream_messages('MOMENTS')} of {n} moments; {state}\n{logs}"
        ) from None
    stored = moments_by_id(client)  # (asserts each is stored once)
    assert stored.keys() == reference.keys()
    different = [key for key in reference if stored[key] != reference[key]]
    assert not different, f"{len(different)} moments differ from the uninterrupted run"
    return stored


def test_instances_share_the_partitions_each_frame_one_moment(
    cluster: NatsCluster, tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    with deployment(cluster, tmp_path, compilation_cache) as (daemons, client):
        client.publish_many(frames(STREAMS, FRAMES))
        settle(client, daemons, reference)
        expected = collections.Counter(owner(f"n-{s:03d}") for s in range(STREAMS))
        for i, d in enumerate(daemons):  # each handled its partitions' frames, and only those
            wait_until(lambda d=d, i=i: processed(d) == expected[i] * FRAMES, f"instance {i}")
            assert metric(d, "enactive_cluster_partitions_owned") == PARTITIONS // INSTANCES
            assert metric(d, "enactive_cluster_fencing_losses_total") == 0
        info = client.run(client.js.stream_info("SENSORS"))
        assert info.config.num_replicas == 3
        assert info.config.subject_transform.dest == "sensors.{{partition(12,1)}}.{{wildcard(1)}}"


def test_a_killed_instance_replaced_on_an_empty_disk_loses_nothing(
    cluster: NatsCluster, tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    messages = frames(STREAMS, FRAMES)
    half = len(messages) // 2
    written = ("enactive_cluster_checkpoint_writes_total", (("outcome", "written"),))
    with deployment(cluster, tmp_path, compilation_cache) as (daemons, client):
        client.publish_many(messages[:half])
        # Instance 1 has checkpointed its partitions to JetStream a few times: then SIGKILL.
        wait_until(
            lambda: daemons[1].metrics().get(written, 0) >= 4 and processed(daemons[1]) > half // 6,
            "instance 1 checkpointing",
            120,
        )
        daemons[1].kill()
        # Its replacement, as on another node: an empty state directory.
        daemons[1] = instance(tmp_path / "i1-replacement", compilation_cache, cluster.url, 1)
        daemons[1].start()
        # (Four writes need not be one per partition: some may not be written yet.)
        said = re.search(r"restored (\d+) streams from [1-4] of 4 partitions", daemons[1].output())
        assert said and int(said.group(1)) > 0, daemons[1].output()
        client.publish_many(messages[half:])
        settle(client, daemons, reference)


def test_a_nats_node_stopped_mid_stream_loses_nothing(
    cluster: NatsCluster, tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    messages = frames(STREAMS, FRAMES)
    third = len(messages) // 3
    with deployment(cluster, tmp_path, compilation_cache) as (daemons, client):
        client.publish_many(messages[:third])
        wait_until(lambda: client.stream_messages("MOMENTS") >= third // 2, "some moments")
        cluster.nodes[2].stop()  # the others keep a quorum: the streams go on
        # (publications meanwhile go unanswered while a stream's leader moves: retried)
        client.publish_many(messages[third:], retry_s=60)
        settle(client, daemons, reference)


def test_two_instances_with_one_number_one_is_fenced_out(
    cluster: NatsCluster, tmp_path: Path, compilation_cache: str, reference: dict
) -> None:
    messages = frames(STREAMS, FRAMES)
    third = len(messages) // 3
    with deployment(cluster, tmp_path, compilation_cache) as (daemons, client):
        client.publish_many(messages[:third])
        wait_until(lambda: client.stream_messages("MOMENTS") >= third // 2, "some moments")
        twin = instance(tmp_path / "i1-twin", compilation_cache, cluster.url, 1)
        daemons.append(twin)
        twin.start()  # the operator's mistake: a second instance 1
        client.publish_many(messages[third:])
        settle(client, daemons, reference)
        ones = [daemons[1], twin]
        owned = [metric(d, "enactive_cluster_partitions_owned") for d in ones]
        lost = [metric(d, "enactive_cluster_fencing_losses_total") for d in ones]
        # Each of instance 1's four partitions is owned by one of the two in the end.
        assert sum(owned) == PARTITIONS // INSTANCES and sum(lost) == PARTITIONS // INSTANCES
        assert any("fenced" in d.output() for d in ones)


def test_the_cluster_bench_runs_and_reports(tmp_path: Path, compilation_cache: str) -> None:
    """`enactive-stream bench --cluster`, small: balance, cost per instance for 1–3
    instances, failover — every figure there and sane."""
    import json
    import subprocess
    import sys

    from .natsserver import need_nats

    need_nats()
    out = tmp_path / "cluster.json"
    argv = [
        sys.executable, "-m", "stream.cli", "bench", "--cluster", "--quick", "--streams", "40",
        "--cache-dir", compilation_cache, "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [b["ids"] for b in result["balance"]] == [1_000, 100_000]
    assert result["balance"][1]["max_over_even"] < 1.01
    assert sorted({c["instances"] for c in result["cost"]}) == [1, 2, 3]
    for c in result["cost"]:
        assert len(c["cpu_s_per_million_frames"]) == c["instances"]
        assert sum(c["frames_per_instance"]) == c["frames"] == c["streams"] * 10
    failover = result["failover"]
    assert 0 < failover["kill_to_ready_s"] <= failover["kill_to_first_moment_s"] < 120
    assert "| 3 |" in done.stdout and "SIGKILL → replacement ready" in done.stdout
