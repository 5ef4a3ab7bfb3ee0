"""Checkpoints of a scaled-out deployment, in JetStream: each partition's state where any
instance can restore it, written so that only the partition's owner ever writes it.

```
 checkpoint (worker thread)                 JetStream (replicated like the frames stream)
   rows, table ──► per owned partition p:
                    its streams' rows, evicted ──► object store <bucket>:
                    states, processed seqs           partition.<p>.<id>     the .npz
                    (the .npz of stream/checkpoint)
                                                ──► key-value <bucket>:
                                                     partition.<p> = {"object": …}
                                                     compare-and-set on the revision
                                                     this instance last read or wrote
```

The checkpoint of partition `p` is an object (any size: the object store chunks it) in
the format of `stream.checkpoint` holding only `p`'s streams; the key `partition.<p>` of
the key-value bucket of the same name points at the current one and names its owner (a
token of the process). Every write of a pointer is a compare-and-set on the revision this
instance last read or wrote:

- at start, an instance **claims** each partition it is to own, rewriting its pointer as
  its own before it consumes anything (`fetch`);
- a checkpoint moves the pointer to the new object;
- every `FENCE_CHECK_S` it checks that each pointer still names it (`watch`).

A partition whose pointer another instance wrote — its replacement, or a twin given the
same number — is **fenced**: this instance stops consuming it (`NatsSource.release`: what
it took is handed back, nothing of it acknowledged), never writes it again, and deletes
the object it was writing. So the newest claimant owns a partition, the other lets go
within a second, and a state is never written by two. The previous object is deleted once
the pointer has moved; objects a crash left unreferenced are deleted at the next start.

A partition's checkpoint is written only when its streams' processed seqs changed since
the last write.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from .checkpoint import CheckpointError, checkpoint_arrays, merge_contents
from .checkpoint_file import Unusable, read_checkpoint_file
from .jetstream import NatsError, NatsSettings, connect
from .partitions import Cluster, partition_of
from .streams import StreamTable

if TYPE_CHECKING:
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

__all__ = ["PartitionStore"]

log = logging.getLogger(__name__)

KEY = "partition.{}"
"""The key-value key pointing at partition `p`'s checkpoint."""
WRITE_TIMEOUT_S = 10.0
"""How long one partition's write may take before it counts as failed."""
FENCE_CHECK_S = 1.0
"""How often each owned partition's pointer is checked to still be this instance's."""


class PartitionStore:
    """The owned partitions' checkpoints in JetStream (see the module).

    **Arguments:** `connection`, the NATS settings (its `replicas` and `storage` are the
    buckets'); `cluster`, this instance's place; `fingerprint`, what a checkpoint must
    have been written for; `on_fenced(p)`, called on the event loop when partition `p`
    is lost to another instance; `on_write(p, outcome)`, told of every write
    (`written`, `failed`, `fenced`).
    """

    def __init__(
        self,
        connection: NatsSettings,
        cluster: Cluster,
        fingerprint: dict[str, Any],
        *,
        on_fenced: Callable[[int], None] = lambda p: None,
        on_write: Callable[[int, str], None] = lambda p, outcome: None,
    ) -> None:
        self.connection = connection
        self.cluster = cluster
        self.fingerprint = fingerprint
        self.on_fenced = on_fenced
        self.on_write = on_write
        self.owned = list(cluster.owned)  # shrinks as partitions are fenced
        self.token = uuid.uuid4().hex  # this process's mark on the pointers it writes
        self.revisions: dict[int, int] = {}  # the pointer's revision last read or written
        self.objects: dict[int, str] = {}  # the object the pointer names
        self._written: dict[int, dict[str, int]] = {}  # processed seqs last written
        self._encoded: dict[int, dict[str, int]] = {}  # those of what `encode` gave
        self._kv: KeyValue | None = None
        self._objects: ObjectStore | None = None
        self._partition = functools.lru_cache(maxsize=1 << 17)(
            lambda stream_id: partition_of(stream_id, cluster.partitions)
        )

    @asynccontextmanager
    async def open(self) -> AsyncIterator[PartitionStore]:
        """Connect, and create the buckets if absent."""
        nc = await connect(self.connection, name="enactive-stream state")
        try:
            from nats.js import api
            from nats.js.errors import BucketNotFoundError

            js = nc.jetstream()
            bucket, c = self.cluster.state_bucket, self.connection
            storage = api.StorageType(c.storage)
            try:
                try:
                    self._kv = await js.key_value(bucket)
                except BucketNotFoundError:
                    self._kv = await js.create_key_value(
                        api.KeyValueConfig(
                            bucket=bucket, history=1, replicas=c.replicas, storage=storage
                        )
                    )
                try:
                    self._objects = await js.object_store(bucket)
                except BucketNotFoundError:
                    self._objects = await js.create_object_store(
                        bucket, api.ObjectStoreConfig(replicas=c.replicas, storage=storage)
                    )
            except Exception as e:
                raise NatsError(f"cluster.state_bucket {bucket}: {_say(e)}") from None
            yield self
        finally:
            self._kv = self._objects = None
            with contextlib.suppress(Exception):
                await nc.close()

    # -- restore ------------------------------------------------------------------------

    async def fetch(self) -> dict[int, bytes]:
        """Claim each owned partition and read its checkpoint (absent: none was written
        yet). A claim rewrites the partition's pointer as this instance's, with
        compare-and-set on the revision just read: a partition another instance claims
        or writes in between is fenced at once, before anything of it is consumed.
        Objects no pointer names (a write a crash cut short) are deleted."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        assert self._kv is not None and self._objects is not None
        found: dict[int, bytes] = {}
        for p in list(self.owned):
            key = KEY.format(p)
            try:
                try:
                    entry = await self._kv.get(key)
                except KeyNotFoundError:
                    entry = None
                name = json.loads(entry.value or b"{}").get("object") if entry else None
                try:
                    self.revisions[p] = await self._put_pointer(
                        p, name, entry.revision or 0 if entry else 0
                    )
                except KeyWrongLastSequenceError:
                    self._fence(p, "claimed it first")
                    continue
                if name is not None:
                    found[p] = (await self._objects.get(name)).data or b""
                    self.objects[p] = name
            except Exception as e:
                raise NatsError(
                    f"cluster.state_bucket {self.cluster.state_bucket}: partition {p}: {_say(e)}"
                ) from None
        await self._delete_unreferenced()
        return found

    async def watch(self) -> None:
        """Every `FENCE_CHECK_S`, check that each owned partition's pointer is still this
        instance's: one another instance claimed (its replacement, or a twin) is fenced
        here without waiting for a write of ours to be refused."""
        assert self._kv is not None
        while self.owned:
            await anyio.sleep(FENCE_CHECK_S)
            for p in list(self.owned):
                try:
                    entry = await self._kv.get(KEY.format(p))
                    owner = json.loads(entry.value or b"{}").get("owner")
                except Exception as e:  # no answer now: the next round
                    log.debug("partition %d pointer: %s", p, _say(e))
                    continue
                if owner != self.token and p in self.owned:
                    self._fence(p, "claimed it")

    async def _put_pointer(self, p: int, name: str | None, revision: int) -> int:
        """Write partition `p`'s pointer (to object `name`) as this instance's, if its
        revision is still `revision` (0: absent); its new revision.

        **Raises:** `KeyWrongLastSequenceError` when it is not."""
        assert self._kv is not None
        pointer = json.dumps(
            {"object": name, "owner": self.token, "instance": self.cluster.instance}
        ).encode()
        key = KEY.format(p)
        if revision:
            return await self._kv.update(key, pointer, last=revision)
        return await self._kv.create(key, pointer)

    def _fence(self, p: int, how: str) -> None:
        """Partition `p` is another instance's now: stop consuming it, never write it."""
        if p not in self.owned:
            return
        self.owned.remove(p)
        self.on_write(p, "fenced")
        log.error(
            "partition %d: another instance %s: fenced, no longer consumed here (two "
            "instances with cluster.instance = %d, or one that outlived its replacement)",
            p, how, self.cluster.instance,
        )  # fmt: skip
        self.on_fenced(p)

    def restore(self, found: dict[int, bytes], like_slab: Any, table: StreamTable) -> int:
        """Put the partitions' checkpoints (`fetch`) into `like_slab` and `table` (a
        worker thread may call this); how many streams they hold.

        **Raises:** `CheckpointError`, one line, when one was written for another model
        or capacity, or is damaged; nothing is put in then."""
        contents = []
        for p, blob in sorted(found.items()):
            where = f"partition {p}'s checkpoint in {self.cluster.state_bucket}"
            try:
                read = read_checkpoint_file(
                    io.BytesIO(blob), like_slab, table.capacity, self.fingerprint
                )
            except Unusable as e:
                raise CheckpointError(e.at(where)) from None
            strays = [s for s in read.seq if self._partition(s) != p]
            if strays:
                raise CheckpointError(
                    f"{where} holds stream {strays[0]!r} of partition "
                    f"{self._partition(strays[0])}: written for another cluster.partitions"
                )
            contents.append((p, read))
        for p, read in contents:
            merge_contents(read, like_slab, table)
            self._written[p] = dict(read.seq)
        table.forget_unprocessed(time.monotonic_ns())
        return len(table.processed_seq)

    # -- write --------------------------------------------------------------------------

    def encode(self, rows: Any, table: StreamTable) -> dict[int, bytes]:
        """The checkpoints of the owned partitions whose streams moved since their last
        write, from a checkpoint's `rows` and `table` (`save_checkpoint`'s)."""
        partition = self._partition
        seqs: dict[int, dict[str, int]] = {p: {} for p in self.owned}
        for stream_id, last in table.processed_seq.items():
            owned = seqs.get(partition(stream_id))
            if owned is not None:
                owned[stream_id] = last
        out = {}
        for p, seq in seqs.items():
            if seq == self._written.get(p, {}) and self.revisions.get(p):
                continue

            def mine(stream_id: str, p: int = p) -> bool:
                return partition(stream_id) == p

            arrays = checkpoint_arrays(rows, table, self.fingerprint, keep=mine)
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes it
            out[p] = buffer.getvalue()
            self._encoded[p] = seq
        return out

    async def write(self, blobs: dict[int, bytes]) -> None:
        """Write each partition's checkpoint, then move its pointer (compare-and-set).

        A partition another instance wrote since is fenced (`on_fenced`), the others are
        written. **Raises:** `ConnectionError` when one could not be written (the
        checkpoint is retried at the next interval)."""
        failed = []
        for p, blob in blobs.items():
            if p not in self.owned:
                continue  # fenced since it was encoded
            try:
                written = await self._write_one(p, blob)
            except Exception as e:
                failed.append(f"partition {p}: {_say(e)}")
                self.on_write(p, "failed")
                continue
            if written:
                self.on_write(p, "written")
            else:
                self._fence(p, "wrote it since")
        if failed:
            raise ConnectionError(f"checkpoint to {self.cluster.state_bucket}: {failed[0]}")

    async def _write_one(self, p: int, blob: bytes) -> bool:
        """Write partition `p`'s checkpoint and move its pointer to it; False when the
        pointer is not this instance's any more (nothing is changed then)."""
        from nats.js.errors import KeyWrongLastSequenceError

        assert self._objects is not None
        name = f"{KEY.format(p)}.{uuid.uuid4().hex}"
        with anyio.fail_after(WRITE_TIMEOUT_S):
            await self._objects.put(name, blob)
            try:
                revision = await self._put_pointer(p, name, self.revisions.get(p, 0))
            except KeyWrongLastSequenceError:
                await self._delete(name)
                return False
            except Exception:
                await self._delete(name)
                raise
            self.revisions[p] = revision
            previous, self.objects[p] = self.objects.get(p), name
            self._written[p] = self._encoded.pop(p, {})
        if previous is not None:
            await self._delete(previous)
        return True

    async def _delete(self, name: str) -> None:
        """Delete an object no pointer names (best effort: the next restore retries)."""
        assert self._objects is not None
        try:
            await self._objects.delete(name)
        except Exception as e:
            log.debug("object %s: %s", name, _say(e))

    async def _delete_unreferenced(self) -> None:
        """Delete the owned partitions' objects no pointer names (best effort)."""
        assert self._objects is not None
        try:
            listed = await self._objects.list(ignore_deletes=True)
        except Exception as e:  # none at all, or no answer: nothing to clean
            log.debug("object store list: %s", _say(e))
            return
        owned = {KEY.format(p) for p in self.owned}
        named = set(self.objects.values())
        for info in listed:
            name = info.name or ""
            if name.rpartition(".")[0] in owned and name not in named:
                await self._delete(name)


def _say(e: Exception) -> str:
    text = getattr(e, "description", None) or str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
