"""Moments published to MQTT: each to `<topic>/<stream id>`, one binary moment record per
message (the record a binary TCP subscriber gets; docs/protocol.md).

```
 offer(batch) ──► WeightedBuffer (moments, drop_newest: slow_sink) ──► split_records ──► publish
                                                                   window ≤ in flight ──┘ │
                         emitted ◄── PUBACK (QoS 1) / PUBCOMP (QoS 2) / written (QoS 0) ◄─┘
```

`offer()` never blocks: a batch is encoded once for every sink that wants binary records
(the shared `EncodingCache`), split into its moments as the NATS sink does
(`split_records`), and queued whole or, when the buffer is full, dropped and counted
(`slow_sink`). Publication is asynchronous and windowed: up to the broker's Receive
Maximum (MQTT 5; mosquitto announces its `max_inflight_messages`, 20 by default), at most
`MAX_IN_FLIGHT`, await the broker's answer at once. A moment counts as `emitted` when the
broker has it: PUBACK at QoS 1, PUBCOMP at QoS 2, written to the socket at QoS 0; one the
broker refuses (an MQTT 5 PUBACK with a failure reason: not authorized, quota exceeded)
is counted dropped (`error`) and logged once per reason.

**Disconnected**, the sink keeps buffering up to its bound (then drops, `slow_sink`) and
connects again with `backoff()`; the moments published and not yet confirmed when the
connection went are published again first, in order (QoS 1: at least once, so a reader
may see a moment twice, with the same stream and seq). The sink's session always starts
clean (client id `client_id-moments`): it has nothing for the broker to keep.

**Cancelled**, it publishes what it holds for up to `FLUSH_S` (while connected), then
disconnects; moments left unpublished are counted dropped (`error`) and logged.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ..buffers import WeightedBuffer
from ..events import PipelineEvents
from ..mqtt import Connection, Link, MqttSettings
from ..protocol import MomentBatch
from .base import SLOW_SINK, WRITE_ERROR, Chunk, EncodingCache
from .nats import split_records

__all__ = ["MqttMomentSink"]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1024
"""Moments published and not yet confirmed, at most (less if the broker says so)."""
FLUSH_S = 2.0
"""How long a cancelled sink keeps publishing what it holds."""


class MqttMomentSink:
    """The MQTT moments sink (`name` `"mqtt"`).

    **Arguments:**

    - `connection`: the broker and credentials (the client id gets `-moments`).
    - `topic`: the topic prefix (`moments`: stream `arm-1`'s moments go to
        `moments/arm-1`); `qos`: 0, 1 or 2.
    - `buffer`: moments held before publication, >= 1 (beyond it: dropped, `slow_sink`).
    - `events`: told `emitted(name, n)` and `sink_dropped(name, reason, n)`.
    - `cache`: shared with other sinks to encode each moment once per format.
    """

    name = "mqtt"

    def __init__(
        self,
        connection: MqttSettings,
        *,
        topic: str,
        qos: int,
        buffer: int,
        events: PipelineEvents,
        cache: EncodingCache | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer={buffer}, expected >= 1")
        self.settings = connection
        self.topic = topic
        self.qos = qos
        self._prefix = topic + "/"
        self._events = events
        self._cache = cache or EncodingCache()
        self._buffer = WeightedBuffer[Chunk](buffer, overflow="drop_newest", on_drop=self._slow)
        self._pending: collections.deque[tuple[str, bytes]] = collections.deque()
        self._unconfirmed: dict[int, tuple[str, bytes]] = {}  # by message id, in order
        self._confirmed = 0  # confirmed since last reported
        self._refused = 0
        self._refusals: set[str] = set()
        self._dropping = False  # warned of drops in this outage
        self._wake = anyio.Event()
        self._connection: Connection | None = None
        self.published = 0

    @property
    def queued(self) -> int:
        """Moments held now: buffered, or published and not yet confirmed."""
        return self._buffer.weight + len(self._pending) + len(self._unconfirmed)

    @property
    def buffers(self) -> tuple[WeightedBuffer[Chunk], ...]:
        return (self._buffer,)

    def offer(self, batch: MomentBatch) -> None:
        """Queue `batch`'s binary records; never blocks (a full buffer drops them,
        counted)."""
        chunk = Chunk()
        if self._buffer.put_nowait(chunk, len(batch)):
            chunk.data = self._cache.get(batch, "binary")
            self._wake.set()

    def _slow(self, chunk: Chunk, n: int) -> None:
        self._events.sink_dropped(self.name, SLOW_SINK, n)
        connection = self._connection
        if not self._dropping and connection is not None and connection.lost.is_set():
            self._dropping = True  # once per outage
            log.warning(
                "mqtt moments: the buffer (%d moments) is full while the broker is away; "
                "dropping moments (counted slow_sink)", self._buffer.limit,
            )  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect (retried for up to `connect_timeout_s`: `MqttError` then), then publish
        until cancelled."""
        s = self.settings
        link = Link(
            s,
            client_id=s.client_id + "-moments",
            clean_start=True,
            session_expiry_s=0,
            on_change=self._changed,
            prepare=self._prepare,
        )
        self._connection = await link.first()
        try:
            task_status.started()
            await self._publish_forever(link)
        finally:
            with anyio.CancelScope(shield=True):
                await self._flush()

    # -- inside ---------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._wake.set()

    def _prepare(self, connection: Connection) -> None:
        def published(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            if connection is not self._connection:
                return  # (the moments of an earlier connection are published again)
            if self._unconfirmed.pop(mid, None) is None:
                return
            if reason.is_failure:
                self._refused += 1
                text = str(reason)
                if text not in self._refusals:
                    self._refusals.add(text)
                    log.warning("mqtt moments: the broker refused a moment: %s", text)
            else:
                self._confirmed += 1
            self._wake.set()

        connection.client.on_publish = published

    async def _publish_forever(self, link: Link) -> None:
        while True:
            connection = self._connection
            assert connection is not None
            if connection.lost.is_set():
                self._report()
                self._republish_unconfirmed()
                log.info(
                    "mqtt moments: connection to %s lost (%s); buffering, reconnecting",
                    self.settings.url, connection.cause,
                )  # fmt: skip
                self._connection = await link.again()
                self._dropping = False
                log.info("mqtt moments: connected again")
                continue
            self._wake = anyio.Event()
            self._publish_some(connection)
            self._report()
            await self._wake.wait()

    def _publish_some(self, connection: Connection) -> None:
        """Publish until the window is full or nothing is left."""
        qos = self.qos
        window = min(MAX_IN_FLIGHT, connection.receive_maximum) if qos else MAX_IN_FLIGHT
        client, unconfirmed, pending = connection.client, self._unconfirmed, self._pending
        while len(unconfirmed) < window:
            if not pending:
                try:
                    chunk = self._buffer.get_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    return
                prefix = self._prefix
                pending.extend((prefix + sid, rec) for sid, _, rec in split_records(chunk.data))
            topic, record = pending.popleft()
            info = client.publish(topic, record, qos)
            if info.rc:  # the connection is going: published again once it is back
                pending.appendleft((topic, record))
                return
            unconfirmed[info.mid] = (topic, record)

    def _republish_unconfirmed(self) -> None:
        """The moments a lost connection left unconfirmed go first on the next one (a
        QoS 0 moment was not written; one of QoS 1/2 may have reached the broker)."""
        self._pending.extendleft(reversed(list(self._unconfirmed.values())))
        self._unconfirmed.clear()

    def _report(self) -> None:
        if self._confirmed:
            self.published += self._confirmed
            self._events.emitted(self.name, self._confirmed)
            self._confirmed = 0
        if self._refused:
            self._events.sink_dropped(self.name, WRITE_ERROR, self._refused)
            self._refused = 0

    async def _flush(self) -> None:
        """Publish what is held for up to `FLUSH_S` (while connected), disconnect, and
        count what is left as dropped (`error`)."""
        connection = self._connection
        why = "never connected"
        if connection is not None:
            with anyio.move_on_after(FLUSH_S):
                while self.queued and not connection.lost.is_set():
                    self._wake = anyio.Event()
                    self._publish_some(connection)
                    self._report()
                    if self.queued:
                        await self._wake.wait()
            self._report()
            why = "disconnected" if connection.lost.is_set() else f"not done in {FLUSH_S:g} s"
            await connection.close()
        left = self.queued
        if left:
            log.warning("mqtt moments: %d moments not published at shutdown (%s)", left, why)
            self._events.sink_dropped(self.name, WRITE_ERROR, left)
