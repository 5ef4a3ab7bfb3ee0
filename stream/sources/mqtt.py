"""MQTT ingest: frames from a topic filter, each QoS 1 message acknowledged once it is in
the pipeline (policy `block`).

```
 sensors/<id> ──► broker ──PUBLISH (≤ RECEIVE_MAXIMUM unacknowledged)──► inbox ──► decode ──► ingest
                    ▲                                                                          │
                    └───────────────────── PUBACK (handed over, or rejected) ◄──────────────────┘
```

A message holds one frame, binary v1 or JSON (`decode_message`: the same decoder and
rejection reasons as TCP, UDP and NATS); the topic after the filter's literal levels must
be the frame's own stream id (`sensors/arm-1` for `arm-1` under `sensors/#`; else
`bad_stream_id`, as is a topic outside the filter: a subscription an earlier configuration
left in a persistent session).

- **Acknowledged** (PUBACK, paho's manual acknowledgements) once `ingest.put` took the
  frame, or at once when it cannot decode (it never will): what the daemon has not taken
  stays the broker's, and after a crash or a lost connection the broker delivers it again
  (with a persistent session). A redelivered frame the pipeline already took is rejected
  by admission (`duplicate_seq`, `stale_seq`, counted): QoS 1's duplicates cost nothing.
- **Bounded.** The broker sends at most `RECEIVE_MAXIMUM` QoS 1 messages unacknowledged
  (MQTT 5 Receive Maximum; under MQTT 3.1.1 its own in-flight limit, mosquitto's
  `max_inflight_messages`). A broker that sends more anyway, and QoS 0 messages (which
  MQTT does not limit), stop at `INBOX_PAUSE` messages held: the source stops reading the
  socket until half of them are handed over, and TCP holds the broker back. Nothing is
  dropped here. (Paused for two keepalive intervals, the connection times out and is made
  again; unacknowledged messages come again.)
- **QoS.** `qos = 2` subscribes at QoS 1: duplicates are dropped by `seq` anyway, and
  QoS 2's exactly-once needs session state paho keeps in memory only, so a restart
  between PUBREC and PUBREL would lose the message.
- **Connection.** Lost, it is reported (`source_state`), made again with `backoff()`
  and the subscription renewed (MQTT 5: without resending retained messages).
  Messages received on the lost connection and not yet handed over still are; their
  acknowledgements are moot (the broker delivers them again, as duplicates).

Nothing is positioned: `commit()` has nothing to do (see docs/integrations.md, "MQTT",
for where the guarantees end).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from ..buffers import Overflow
from ..ingest import Ingest
from ..mqtt import Connection, Link, MqttSettings, topic_prefix
from ..protocol import FrameRejected, decode_message
from ..protocol.runs import MIN_RUN, decode_messages, like_messages

if TYPE_CHECKING:
    from paho.mqtt.client import MQTTMessage

__all__ = ["MqttSource"]

log = logging.getLogger(__name__)

LABEL = "mqtt"
RECEIVE_MAXIMUM = 1024
"""QoS 1 messages the broker may send unacknowledged (MQTT 5 Receive Maximum)."""
INBOX_PAUSE = 2 * RECEIVE_MAXIMUM
"""Messages held (received, not handed over) at which reading stops, until half are."""
HAND_OVER = 512
"""Messages decoded and handed over per round at most."""


class MqttSource:
    """Frames from an MQTT topic filter, as a `Source` (label `mqtt`, policy `block`).

    **Arguments:** `connection`, the broker and session settings; `topics`, a filter
    whose last level is `#` or `+` (the stream id); `qos`, the subscription's QoS (2 is
    taken as 1).
    """

    name = "mqtt"
    labels: tuple[str, ...] = (LABEL,)
    overflow: Overflow = "block"

    def __init__(self, connection: MqttSettings, *, topics: str, qos: int = 1) -> None:
        self.settings = connection
        self.topics = topics
        self.requested_qos = qos
        self.qos = min(qos, 1)
        self._prefix = topic_prefix(topics)
        # Received, not yet handed over: each with the connection it came on.
        self._inbox: collections.deque[tuple[Connection, MQTTMessage]] = collections.deque()
        self._wake = anyio.Event()
        self._connection: Connection | None = None
        self._reconnecting: anyio.CancelScope | None = None
        self.acknowledged = 0
        self.redelivered = 0

    def commit(self, positions: Sequence[object]) -> None:
        pass  # frames carry no position: acknowledged as they are handed over

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, subscribe and hand frames over until the ingest stops; then hand over
        what was received, disconnect (the session stays with the broker) and return."""
        s = self.settings
        if self.qos != self.requested_qos:
            log.info("mqtt: qos = 2 subscribes at QoS 1 (duplicates are dropped by seq)")
        link = Link(
            s,
            client_id=s.client_id,
            clean_start=not s.persistent_session,
            session_expiry_s=s.session_expiry_s,
            receive_maximum=RECEIVE_MAXIMUM,
            manual_ack=True,
            on_change=self._changed,
            prepare=self._prepare,
            subscribe=(self.topics, self.qos),
        )
        self._connection = await link.first()
        try:
            ingest.events.source_state(LABEL, True)
            task_status.started(None)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_stop, ingest)
                await self._consume(ingest, link)
                tg.cancel_scope.cancel()
        finally:
            if self._connection is not None:
                await self._connection.close()

    # -- inside ---------------------------------------------------------------------------------

    def _prepare(self, connection: Connection) -> None:
        def arrived(client: Any, userdata: Any, message: MQTTMessage) -> None:
            self._inbox.append((connection, message))
            if len(self._inbox) >= INBOX_PAUSE:
                connection.pause_reading()
            self._wake.set()

        connection.client.on_message = arrived

    def _changed(self) -> None:
        self._wake.set()

    async def _watch_stop(self, ingest: Ingest) -> None:
        await ingest.stopped.wait()
        self._wake.set()
        if self._reconnecting is not None:
            self._reconnecting.cancel()

    async def _consume(self, ingest: Ingest, link: Link) -> None:
        inbox = self._inbox
        while True:
            connection = self._connection
            assert connection is not None
            if not ingest.accepting:
                connection.pause_reading()  # what came so far is in hand; the rest stays
                while inbox:
                    await self._hand_over(ingest, self._take())
                return
            if inbox:
                await self._hand_over(ingest, self._take())
                if connection.paused and len(inbox) <= INBOX_PAUSE // 2:
                    connection.resume_reading()
                continue
            if connection.lost.is_set():
                if not await self._reconnect(ingest, link, connection):
                    return
                continue
            self._wake = anyio.Event()
            await self._wake.wait()

    async def _reconnect(self, ingest: Ingest, link: Link, lost: Connection) -> bool:
        """Report the loss, connect again; False when the ingest stopped meanwhile."""
        ingest.events.source_state(LABEL, False)
        log.info("mqtt: connection to %s lost (%s)", self.settings.url, lost.cause)
        with anyio.CancelScope() as self._reconnecting:
            self._connection = await link.again()
        self._reconnecting = None
        if self._connection is lost:  # cancelled: the ingest stopped
            return False
        ingest.events.source_state(LABEL, True)
        return True

    def _take(self) -> list[tuple[Connection, MQTTMessage]]:
        inbox = self._inbox
        return [inbox.popleft() for _ in range(min(len(inbox), HAND_OVER))]

    def _acknowledge(
        self, ingest: Ingest, items: Sequence[tuple[Connection, MQTTMessage]], kind: str = "ack"
    ) -> None:
        """PUBACK each of `items` that came on the live connection, in arrival order
        (`kind`: `ack`, handed over; `term`, rejected while decoding)."""
        n = 0
        for connection, message in items:
            # (on a lost connection: moot, the broker delivers it again on the next one)
            if message.qos and not connection.lost.is_set():
                connection.client.ack(message.mid, message.qos)
                n += 1
        if n:
            self.acknowledged += n
            ingest.events.source_acknowledged(LABEL, kind, n)

    async def _hand_over(self, ingest: Ingest, items: list[tuple[Connection, MQTTMessage]]) -> None:
        """Decode and hand over `items` in order, acknowledging each once taken: stretches
        of like binary frames (one sensor fleet's usual traffic) as one `FrameRun` each,
        decoded in one numpy pass (`decode_run`); the rest one by one."""
        dup = sum(1 for _, m in items if m.dup)
        if dup:
            self.redelivered += dup
            ingest.events.source_redelivered(LABEL, dup)
        payloads = [m.payload for _, m in items]
        i, n = 0, len(items)
        while i < n:
            j = like_messages(payloads, i)
            if j - i >= MIN_RUN:
                taken = await self._take_run(ingest, items[i:j])
                if taken:
                    i += taken
                    continue
            await self._take_one(ingest, items[i])
            i += 1

    async def _take_run(self, ingest: Ingest, items: list[tuple[Connection, MQTTMessage]]) -> int:
        """Hand over the longest run at the head of `items` (same-size binary frames) that
        decodes whole and whose topics name its frames; how many (0: none)."""
        run = decode_messages(
            [m.payload for _, m in items],
            ingest.dims,
            max_frame_bytes=ingest.max_frame_bytes,
            received_ns=time.monotonic_ns(),
            source=LABEL,
        )
        if run is None:
            return 0  # a rejection among them: one by one, each with its reason
        k = len(run)
        prefix = self._prefix
        try:
            topics = [m.topic for _, m in items[:k]]
        except UnicodeDecodeError:
            return 0
        if any(not t.startswith(prefix) for t in topics):
            return 0
        cut = len(prefix)
        if run.stream_ids != [t[cut:] for t in topics]:
            return 0
        ingest.received(LABEL, k)
        if ingest.put_nowait(run) is None:
            await ingest.put(run)
        self._acknowledge(ingest, items[:k])
        return k

    async def _take_one(self, ingest: Ingest, item: tuple[Connection, MQTTMessage]) -> None:
        message = item[1]
        ingest.received(LABEL)
        try:
            frame = decode_message(
                message.payload,
                ingest.dims,
                max_frame_bytes=ingest.max_frame_bytes,
                received_ns=time.monotonic_ns(),
                source=LABEL,
            )
            sid = self._stream_id(message)
            if frame.stream_id != sid:
                raise FrameRejected(
                    "bad_stream_id",
                    f"the frame's stream id {frame.stream_id!r} is not the topic's {sid!r}",
                )
        except FrameRejected as r:
            ingest.rejected(LABEL, r.reason)
            self._acknowledge(ingest, (item,), "term")  # it can never succeed
            return
        if ingest.put_nowait(frame) is None:
            await ingest.put(frame)
        self._acknowledge(ingest, (item,))

    def _stream_id(self, message: MQTTMessage) -> str:
        """The topic's levels after the filter's literal ones."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            raise FrameRejected("bad_stream_id", "the topic is not UTF-8") from None
        if not topic.startswith(self._prefix):
            raise FrameRejected("bad_stream_id", f"topic {topic!r} is outside {self.topics!r}")
        return topic[len(self._prefix) :]
