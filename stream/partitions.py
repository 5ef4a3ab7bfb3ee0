"""Partitions of the stream ids, and which instance of a scaled-out deployment owns which.

A deployment of `n` instances shares the streams over `partitions` partitions (fixed for
the deployment). A frame published to `<prefix><stream id>` is stored by the frames
stream as `<prefix><partition>.<stream id>` — JetStream's own subject transform with its
`partition(N, 1)` function, set on the stream when the daemon creates it — and instance
`i` consumes the partitions `p` with `p % n == i`, one durable consumer each.

`partition_of` computes a stream id's partition as nats-server does (FNV-1a, 32 bits, of
the wildcard token, modulo the partition count), so the daemon splits its state by
partition without asking the server; a test checks the two agree.
"""

from __future__ import annotations

import dataclasses
import re
import socket

__all__ = [
    "Cluster",
    "instance_from_hostname",
    "owned_partitions",
    "partition_of",
    "partition_transform",
]

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def partition_of(stream_id: str, partitions: int) -> int:
    """The partition nats-server's `{{partition(partitions, 1)}}` gives the subject
    token `stream_id`."""
    h = _FNV_OFFSET
    for byte in stream_id.encode():
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions


def owned_partitions(instance: int, instances: int, partitions: int) -> list[int]:
    """The partitions instance `instance` of `instances` consumes: every `instances`-th
    from its own number."""
    return list(range(instance, partitions, instances))


def partition_transform(prefix: str, partitions: int) -> tuple[str, str]:
    """The frames stream's subject transform, `(source, destination)`: `<prefix>*` to
    `<prefix>{{partition(N,1)}}.{{wildcard(1)}}` (`prefix` ends with a dot)."""
    return f"{prefix}*", f"{prefix}{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"


def instance_from_hostname(hostname: str | None = None) -> int:
    """The trailing ordinal of a host name (a StatefulSet pod `enactive-stream-2` is 2).

    **Raises:** `ValueError` when the name does not end in `-<number>`."""
    name = socket.gethostname() if hostname is None else hostname
    match = re.search(r"-(\d+)$", name.split(".")[0])
    if match is None:
        raise ValueError(
            f'cluster.instance = "auto" takes the instance from the host name\'s trailing '
            f"ordinal (a StatefulSet pod's `<name>-<i>`), and {name!r} has none"
        )
    return int(match.group(1))


@dataclasses.dataclass(frozen=True, slots=True)
class Cluster:
    """One instance's place in a scaled-out deployment (the `[cluster]` section).

    - `instances`, `instance`: `n` and this instance's `i` (0-based).
    - `partitions`: the partition count, fixed for the deployment.
    - `state_bucket`: the JetStream key-value bucket holding each partition's checkpoint.
    """

    instances: int
    instance: int
    partitions: int
    state_bucket: str = "ENACTIVE_STATE"

    @property
    def owned(self) -> list[int]:
        """The partitions this instance consumes."""
        return owned_partitions(self.instance, self.instances, self.partitions)
