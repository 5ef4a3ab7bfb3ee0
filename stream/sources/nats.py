"""NATS JetStream ingest: frames from a durable pull consumer, acknowledged once their
effect on state is durable (the commit points of `stream.sources.base`).

```
 sensors.<id> ──► stream SENSORS ──► durable pull consumer ──fetch(batch)──► decode ──► ingest
                                        ▲                                      │ bad: +TERM
                                        └──── ack_sync ◄── commit(positions) ◄─┘ (checkpoint
                                                                                  durable)
```

A message holds one frame, binary v1 or JSON (`decode_message`: the same decoder and
rejection reasons as TCP and UDP); the stream id is the frame's own, and the subject after
the filter's literal tokens must be it (`sensors.robot.arm-1` for `robot.arm-1` under
`sensors.>`; else `bad_stream_id`). A frame's position is the message's
reply subject, all an acknowledgement needs. Messages are fetched `fetch_batch` at a time
(the largest bucket by default; pull requests of its own, `_Pull`) and handed over one by
one, waiting while the pipeline is full (policy `block`: the server keeps what the daemon
cannot take yet).

- **Acknowledged** (`ack_sync`: the server confirms) once a checkpoint holding the frame's
  effect is durable — or, for a frame admission rejected (`duplicate_seq`, `stale_seq`:
  a redelivery after a restart), once what its stream had before it is durable.
- **Terminated** (`+TERM`, never redelivered) at once when it cannot decode: it can never
  succeed. Counted by reason like every rejection.
- **Kept** (`+WPI`, every third of `ack_wait`) while taken and not yet acknowledged, so
  a slowed pipeline does not make the server deliver them again.
- **Redelivered** by the server when not acknowledged within `ack_wait`: after a crash,
  the frames whose effect no checkpoint holds come back and are applied; those whose
  effect the restored state holds are rejected as duplicates and acknowledged. So every
  frame's effect on state happens exactly once.

`ack_wait` and `max_ack_pending` (docs/integrations.md): a frame waits at most one
checkpoint interval, the write, and the publication of the moments before it
(`stream.sinks.nats`) for its acknowledgement, so `ack_wait` defaults to
3 × `state.checkpoint_interval_s` + 30 s; the pipeline checkpoints early once half of
`max_ack_pending` positions wait, so the consumer never stalls on the limit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
from anyio.abc import TaskStatus

from ..buffers import Overflow
from ..ingest import Ingest
from ..jetstream import NatsError, NatsSettings, connect, ensure_stream
from ..partitions import partition_transform
from ..protocol import FrameRejected, decode_message
from ..protocol.runs import MIN_RUN, decode_messages, like_messages

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

__all__ = ["NatsSource", "NatsSourceSettings"]

log = logging.getLogger(__name__)

FETCH_WAIT_S = 0.25
"""The longest a fetch waits for messages (so a stop is noticed within it)."""
ACK_TIMEOUT_S = 5.0
"""How long one `ack_sync` waits for the server's confirmation before it is retried."""
ACK_TRIES = 3
"""Attempts at an acknowledgement the server does not confirm before it is given up (the
message is then delivered again, and acknowledged as a duplicate)."""
ACKS_IN_FLIGHT = 512
"""Acknowledgements awaited at once."""
PENDING_EVERY_S = 5.0
"""How often each owned partition's undelivered messages are counted (consumer info)."""
CLOSE_ACKS_S = 10.0
"""How long the acknowledgements still due at shutdown may take."""
LABEL = "nats"


@dataclasses.dataclass(frozen=True, slots=True)
class NatsSourceSettings:
    """The consumer's settings (the `[nats]` section).

    - `subjects`: the subject filter (`sensors.>`); `stream`, `durable`: the frames
        stream and the durable consumer's name.
    - `fetch_batch`: messages per fetch; `max_ack_pending`, `ack_wait_s`: the consumer's.
    """

    subjects: str = "sensors.>"
    stream: str = "SENSORS"
    durable: str = "enactive"
    fetch_batch: int = 256
    max_ack_pending: int = 65536
    ack_wait_s: float = 45.0


class NatsSource:
    """Frames from a JetStream durable pull consumer, as a `Source` (label `nats`, policy
    `block`).

    The connection lives from `open()` (the pipeline enters it before anything runs, and
    leaves it after the final checkpoint's commits) so that frames committed after `run`
    returned are acknowledged too.
    """

    name = "nats"
    labels: tuple[str, ...] = (LABEL,)
    overflow: Overflow = "block"

    def __init__(
        self,
        connection: NatsSettings,
        settings: NatsSourceSettings,
        *,
        partitions: int = 0,
        owned: Sequence[int] = (),
    ) -> None:
        self.connection = connection
        self.settings = settings
        self.partitions = partitions
        prefix = subject_prefix(settings.subjects)
        if partitions:
            self._consumers = {
                f"{settings.durable}-p{p}": _Consumer(
                    f"{settings.durable}-p{p}", f"{prefix}{p}.*", f"{prefix}{p}.", p
                )
                for p in owned
            }
        else:
            self._consumers = {
                settings.durable: _Consumer(settings.durable, settings.subjects, prefix, None)
            }
        self._nc: Client | None = None
        self._ack_inbox: _AckInbox | None = None
        self._ingest: Ingest | None = None
        self._up = False
        self._acks: collections.deque[str] = collections.deque()
        self._naks: collections.deque[str] = collections.deque()  # deliveries handed back
        self._ack_tries: dict[str, int] = {}  # unconfirmed acknowledgements: attempts so far
        self._ack_ready = anyio.Event()
        # Delivery times of frames not yet acknowledged, oldest first (ack lag).
        self._delivered: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.acknowledged = 0
        self.terminated = 0
        self.redelivered = 0
        self.released: list[int] = []  # partitions given up (another instance owns them)

    # -- what the pipeline calls -------------------------------------------------------------

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Connect, create or check the frames stream and the consumer; acknowledge
        what falls due until the context is left (then what is still due, within
        `CLOSE_ACKS_S`), and close."""
        nc = await connect(self.connection, name="enactive-stream source", on_state=self._state)
        try:
            js = nc.jetstream()
            s = self.settings
            if self.partitions:
                source, destination = partition_transform(
                    subject_prefix(s.subjects), self.partitions
                )
                await ensure_stream(
                    js,
                    s.stream,
                    [source],
                    self.connection,
                    check_duplicate_window=False,
                    transform=(source, destination),
                )
            else:
                await ensure_stream(
                    js, s.stream, [s.subjects], self.connection, check_duplicate_window=False
                )
            for consumer in self._consumers.values():
                if not consumer.released:  # (fenced at start: never touched)
                    await self._ensure_consumer(js, consumer)
            self._nc = nc
            self._ack_inbox = await _AckInbox.open(nc)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._acknowledge)
                tg.start_soon(self._keep_pending)
                try:
                    yield
                finally:
                    with anyio.move_on_after(CLOSE_ACKS_S, shield=True):
                        while self._acks:
                            await self._ack_some()
                    tg.cancel_scope.cancel()
        finally:
            self._nc = None
            with anyio.move_on_after(2, shield=True):
                await nc.close()

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Fetch, decode and hand over frames until the ingest stops."""
        if self._nc is None:
            raise RuntimeError("NatsSource.run() outside open()")
        self._ingest = ingest
        self._state(self._up)
        consumers = [c for c in self._consumers.values() if not c.released]
        for consumer in consumers:
            consumer.pull = _Pull(self._nc, self.settings, consumer.name)
            await consumer.pull.start()
        task_status.started(None)
        async with anyio.create_task_group() as tg:
            if self.partitions:
                tg.start_soon(self._watch_pending)
            async with anyio.create_task_group() as consuming:
                for consumer in consumers:
                    consuming.start_soon(self._consume, ingest, consumer)
            tg.cancel_scope.cancel()
        for consumer in self._consumers.values():
            if consumer.pull is not None:
                await consumer.pull.stop()

    def commit(self, positions: Sequence[object]) -> None:
        """Queue the acknowledgement of each position (a reply subject); one of a
        partition given up (`release`) is not acknowledged but handed back (`+NAK`): its
        effect is in no state this instance writes."""
        if self.released:
            kept = []
            for reply in positions:
                consumer = self._consumers.get(_delivery(reply).consumer)  # type: ignore[arg-type]
                if consumer is not None and consumer.released:
                    self._give_back(reply)  # type: ignore[arg-type]
                else:
                    kept.append(reply)
            positions = kept
        self._acks.extend(positions)  # type: ignore[arg-type]
        self._ack_ready.set()

    def release(self, partition: int) -> None:
        """Stop consuming `partition` (another instance owns it now): nothing more is
        fetched from it, what it delivered and is not acknowledged is handed back
        (`+NAK`, so the owner has it at once), and nothing of it is acknowledged."""
        for consumer in self._consumers.values():
            if consumer.partition == partition and not consumer.released:
                consumer.released = True
                self.released.append(partition)
                consumer.held.clear()
                name = consumer.name
                for reply in [r for r in self._delivered if _delivery(r).consumer == name]:
                    self._give_back(reply)

    # -- inside ---------------------------------------------------------------------------------

    async def _consume(self, ingest: Ingest, consumer: _Consumer) -> None:
        """Fetch, order and hand over one consumer's frames until the ingest stops (or
        the partition is released)."""
        assert self._nc is not None and consumer.pull is not None
        js = self._nc.jetstream()
        while ingest.accepting and not consumer.released:
            messages = await consumer.pull.next_messages()
            if consumer.released:
                for message in messages:
                    self._give_back(message.reply)
                return
            now = time.monotonic_ns()
            for message in messages:  # taken: kept alive (`+WPI`) until acknowledged
                self._delivered.setdefault(message.reply, now)
            ready: list[Msg] = []
            for message in messages:
                await self._arrived(js, ingest, consumer, message, ready)
            if not messages and consumer.held:  # (the stream did not answer: try again)
                await self._drain(js, consumer, ready)
            await self._hand_over(ingest, consumer, ready)

    async def _watch_pending(self) -> None:
        """Every `PENDING_EVERY_S`, each owned partition's messages not yet delivered
        (its consumer's `num_pending`), reported as `partition_pending`."""
        assert self._nc is not None
        js = self._nc.jetstream()
        while True:
            for consumer in self._consumers.values():
                if consumer.released or consumer.partition is None:
                    continue
                try:
                    info = await js.consumer_info(self.settings.stream, consumer.name)
                except Exception as e:  # no answer now: the next round
                    log.debug("nats consumer info %s: %s", consumer.name, e)
                    continue
                if self._ingest is not None:
                    self._ingest.events.partition_pending(
                        consumer.partition, int(info.num_pending or 0)
                    )
            await anyio.sleep(PENDING_EVERY_S)

    def _give_back(self, reply: str) -> None:
        """Queue a `+NAK` of a delivery: the server delivers it again at once (to
        whoever pulls; not confirmed: one lost comes back after `ack_wait`)."""
        self._delivered.pop(reply, None)
        self._naks.append(reply)
        self._ack_ready.set()

    async def _ensure_consumer(self, js: Any, consumer: _Consumer) -> None:
        """Create the durable consumer; an existing one resumes from its acknowledgement
        floor. One with messages still pending (delivered to a daemon that crashed) is
        created again from that floor, so they come at once and in order rather than
        after `ack_wait` behind later ones (those the restored state holds are rejected
        as duplicates and acknowledged)."""
        from nats.js import api
        from nats.js.errors import APIError, NotFoundError

        s = self.settings
        floor = 0
        try:
            info = await js.consumer_info(s.stream, consumer.name)
        except NotFoundError:
            info = None
        if info is not None:
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            c = info.config
            if not info.num_ack_pending and (c.filter_subject, c.ack_wait, c.max_ack_pending) == (
                consumer.filter, s.ack_wait_s, s.max_ack_pending
            ):
                first = (await js.stream_info(s.stream)).state.first_seq
                consumer.next = max(floor + 1, first)
                consumer.last_dseq = info.delivered.consumer_seq if info.delivered else 0
                return  # as it was left
            await js.delete_consumer(s.stream, consumer.name)
            log.info(
                "nats: consumer %s resumes after stream sequence %d (%d messages were pending)",
                consumer.name, floor, info.num_ack_pending or 0,
            )  # fmt: skip
        config = api.ConsumerConfig(
            durable_name=consumer.name,
            name=consumer.name,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=(
                api.DeliverPolicy.BY_START_SEQUENCE if floor else api.DeliverPolicy.ALL
            ),
            opt_start_seq=floor + 1 if floor else None,
            ack_wait=s.ack_wait_s,
            max_ack_pending=s.max_ack_pending,
            max_deliver=-1,
            filter_subject=consumer.filter,
        )
        try:
            # Creates it, or updates what may change of an existing one (ack_wait, ...).
            await js.add_consumer(s.stream, config=config)
        except APIError as e:
            raise NatsError(
                f"JetStream consumer {consumer.name} on stream {s.stream}: {e.description} "
                "(delete it, or choose another nats.durable)"
            ) from None
        first = (await js.stream_info(s.stream)).state.first_seq
        consumer.next = max(floor + 1, first)
        consumer.last_dseq = 0

    async def _arrived(
        self, js: Any, ingest: Ingest, consumer: _Consumer, message: Msg, ready: list[Msg]
    ) -> None:
        """Put `consumer`'s messages in `ready` in stream order.

        A consumer delivers a message for the first time in stream order, and numbers
        every delivery (redeliveries too) one after another. While those numbers follow
        on, no delivery was lost, so a message is handed over as soon as it arrives.
        After a gap (a delivery lost with a connection is redelivered after `ack_wait`)
        the messages are held, and the next one there is for the consumer's subjects is
        looked up in the stream (`_skip_gap`) before each is handed over, until a first
        delivery numbered past the gap has been; one that is missing is waited for.
        A message delivered again after it was handed over (a server that lost its
        consumer state in a restart delivers what it had already seen acknowledged)
        goes too: admission rejects it as a duplicate, and it is acknowledged once what
        it duplicates is durable."""
        delivery = _delivery(message.reply)
        if delivery.delivered > 1:
            self.redelivered += 1
            ingest.events.source_redelivered(LABEL, 1)
        if delivery.dseq != consumer.last_dseq + 1 and consumer.gap_below < delivery.dseq:
            consumer.gap_below = delivery.dseq  # the deliveries lost are numbered below
        consumer.last_dseq = delivery.dseq
        sseq = delivery.sseq
        if sseq < consumer.next:
            ready.append(message)
            return
        replaced = consumer.held.get(sseq)
        if replaced is not None:  # a redelivery of a held one replaces it
            self._delivered.pop(replaced.reply, None)
        consumer.held[sseq] = message
        await self._drain(js, consumer, ready)

    async def _drain(self, js: Any, consumer: _Consumer, ready: list[Msg]) -> None:
        """Move the held messages that may go now to `ready`, in stream order."""
        held = consumer.held
        while held:
            if consumer.next not in held:
                if not consumer.gap_below:
                    consumer.next = min(held)  # none lost: nothing of ours lies between
                elif not await self._skip_gap(js, consumer, min(held)):
                    return
                continue
            first = held.pop(consumer.next)
            ready.append(first)
            consumer.next += 1
            past = _delivery(first.reply)
            if consumer.gap_below and past.delivered == 1 and past.dseq >= consumer.gap_below:
                consumer.gap_below = 0  # every delivery lost is accounted for

    async def _skip_gap(self, js: Any, consumer: _Consumer, until: int) -> bool:
        """Move `consumer.next` to the next stream sequence there is for the consumer's
        subjects, if that is `until` (what lies between is deleted, expired, or another
        subject's); False when it is below (its delivery was lost: it will be
        redelivered), or the stream does not answer now."""
        from nats.js.errors import NotFoundError

        if consumer.missing == consumer.next:
            return False  # known to be on its way
        try:
            raw = await js.get_msg(
                self.settings.stream, seq=consumer.next, subject=consumer.filter, next=True
            )
        except NotFoundError:  # deleted or expired since: what is held is all there is
            consumer.next = until
            return True
        except Exception as e:  # no answer now: wait for the redelivery
            log.debug("nats get_msg %d: %s", consumer.next, e)
            return False
        seq = raw.seq or 0
        if seq >= until or seq < consumer.next:
            consumer.next = until
            return True
        consumer.next = seq
        consumer.missing = seq
        log.info("nats: message %d is missing (a lost delivery); waiting for it", seq)
        return False

    async def _hand_over(self, ingest: Ingest, consumer: _Consumer, messages: list[Msg]) -> None:
        """Decode and hand over `messages`, in order: stretches of like binary frames
        (the same size, header and modalities: one sensor fleet's usual traffic) as one
        `FrameRun` each, decoded in one numpy pass (`decode_run`); the rest one by one."""
        payloads = [m.data for m in messages]
        i, n = 0, len(messages)
        while i < n:
            j = like_messages(payloads, i)
            if j - i >= MIN_RUN:
                taken = await self._take_run(ingest, consumer, messages[i:j])
                if taken:
                    i += taken
                    continue
            await self._take(ingest, consumer, messages[i])
            i += 1

    async def _take_run(self, ingest: Ingest, consumer: _Consumer, messages: list[Msg]) -> int:
        """Hand over the longest run at the head of `messages` (same-size binary frames)
        that decodes whole and whose subjects name its frames; how many (0: none)."""
        run = decode_messages(
            [m.data for m in messages],
            ingest.dims,
            max_frame_bytes=ingest.max_frame_bytes,
            received_ns=time.monotonic_ns(),
            source=LABEL,
        )
        if run is None:
            return 0  # a rejection among them: one by one, each with its reason
        k = len(run)
        prefix = len(consumer.prefix)
        if run.stream_ids != [m.subject[prefix:] for m in messages[:k]]:
            return 0
        run.positions = [m.reply for m in messages[:k]]
        ingest.received(LABEL, k)
        if ingest.put_nowait(run) is None:
            await ingest.put(run)
        return k

    async def _take(self, ingest: Ingest, consumer: _Consumer, message: Msg) -> None:
        now = time.monotonic_ns()
        ingest.received(LABEL)
        reply = message.reply
        try:
            frame = decode_message(
                message.data,
                ingest.dims,
                max_frame_bytes=ingest.max_frame_bytes,
                received_ns=now,
                source=LABEL,
            )
            sid = message.subject[len(consumer.prefix) :]
            if frame.stream_id != sid:
                raise FrameRejected(
                    "bad_stream_id",
                    f"the frame's stream id {frame.stream_id!r} is not the subject's {sid!r}",
                )
        except FrameRejected as r:
            ingest.rejected(LABEL, r.reason)
            await self._terminate(reply)
            return
        frame.position = reply
        if ingest.put_nowait(frame) is None:
            await ingest.put(frame)

    async def _terminate(self, reply: str) -> None:
        assert self._nc is not None
        import nats.errors

        self._delivered.pop(reply, None)

        try:
            await self._nc.publish(reply, b"+TERM")
        except (nats.errors.Error, OSError) as e:  # redelivered, and terminated then
            log.debug("nats term: %s", e)
            return
        self.terminated += 1
        if self._ingest is not None:
            self._ingest.events.source_acknowledged(LABEL, "term", 1)

    async def _acknowledge(self) -> None:
        import nats.errors

        assert self._nc is not None
        while True:
            await self._ack_ready.wait()
            self._ack_ready = anyio.Event()
            while self._naks:
                try:
                    await self._nc.publish(self._naks.popleft(), b"+NAK")
                except (nats.errors.Error, OSError) as e:
                    log.debug("nats nak: %s", e)
            while self._acks:
                await self._ack_some()

    async def _ack_some(self) -> None:
        """Acknowledge up to `ACKS_IN_FLIGHT` positions at once, each confirmed by the
        server (what `ack_sync` does, without a request per message: the confirmations
        come to one inbox, `_AckInbox`); one not confirmed in time (disconnected) is tried
        again, up to `ACK_TRIES` times."""
        import nats.errors

        assert self._nc is not None and self._ack_inbox is not None
        batch = [self._acks.popleft() for _ in range(min(len(self._acks), ACKS_IN_FLIGHT))]
        try:
            failed = await self._ack_inbox.acknowledge(batch, ACK_TIMEOUT_S)
        except (nats.errors.Error, OSError) as e:
            log.debug("nats ack: %s", e)
            failed = batch
        unconfirmed = set(failed)
        for reply in batch:
            if reply not in unconfirmed:
                self._delivered.pop(reply, None)
                self._ack_tries.pop(reply, None)
        done = len(batch) - len(failed)
        self.acknowledged += done
        if done and self._ingest is not None:
            self._ingest.events.source_acknowledged(LABEL, "ack", done)
        connected = self._nc.is_connected
        for reply in failed:
            tries = self._ack_tries[reply] = self._ack_tries.get(reply, 0) + connected
            if tries < ACK_TRIES:
                self._acks.append(reply)  # behind the others: one that fails holds none up
            else:
                # Unconfirmed again and again: a server that restarted may ignore an ack
                # for a delivery it no longer knows. If the ack did not take, the message
                # comes again (a new delivery), is rejected as a duplicate and acknowledged.
                del self._ack_tries[reply]
                self._delivered.pop(reply, None)
        if failed:
            await anyio.sleep(FETCH_WAIT_S)  # the connection may be coming back

    async def _keep_pending(self) -> None:
        """Every third of `ack_wait`, tell the server that the frames taken and not yet
        acknowledged are still being worked on (`+WPI`), so a pipeline slowed down (a
        moments stream that takes nothing, a long checkpoint) does not bring them all
        back as redeliveries."""
        import nats.errors

        assert self._nc is not None
        while True:
            await anyio.sleep(self.settings.ack_wait_s / 3)
            replies = list(self._delivered)
            try:
                for reply in replies:
                    await self._nc.publish(reply, b"+WPI")
            except (nats.errors.Error, OSError) as e:
                log.debug("nats +WPI: %s", e)

    def _state(self, up: bool) -> None:
        self._up = up
        if self._ingest is not None:
            self._ingest.events.source_state(LABEL, up)

    def ack_lag_s(self) -> float:
        """Seconds since the oldest frame not yet acknowledged arrived (0: none waits)."""
        for first in self._delivered.values():
            return (time.monotonic_ns() - first) / 1e9
        return 0.0


@dataclasses.dataclass(slots=True, eq=False)
class _Consumer:
    """One durable consumer the source reads, and its in-order hand-over.

    - `name`, `filter`: the durable's name and subject filter; `prefix`, the subject's
        literal part before the stream id; `partition`, its partition (None: unpartitioned).
    - `next`: the stream sequence of the next message to hand over; `held`, messages
        arrived ahead of it, by stream sequence; `missing`, a stream sequence known to be
        redelivered later.
    - `last_dseq`: the last delivery's number; `gap_below`, nonzero after a gap in them:
        some delivery numbered below it was lost.
    - `released`: given up (another instance owns the partition).
    """

    name: str
    filter: str
    prefix: str
    partition: int | None
    next: int = 1
    held: dict[int, Msg] = dataclasses.field(default_factory=dict)
    missing: int = 0
    last_dseq: int = 0
    gap_below: int = 0
    released: bool = False
    pull: _Pull | None = None


class _Pull:
    """The consumer's messages, pulled with requests of our own
    (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`, each for `fetch_batch` messages,
    lingering up to `FETCH_WAIT_S`) answered on one inbox: a new request goes out while
    fewer than a batch are still asked for, so one is always waiting at the server. (nats-py's
    `fetch` waits for every message with a timeout of its own: ~35 µs of CPU each.)"""

    def __init__(self, nc: Client, settings: NatsSourceSettings, consumer: str) -> None:
        self.nc = nc
        self.batch = settings.fetch_batch
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream}.{consumer}"
        self.request = json.dumps(
            {"batch": self.batch, "expires": int(FETCH_WAIT_S * 1e9)}
        ).encode()
        self.inbox = nc.new_inbox()
        self.messages: collections.deque[Msg] = collections.deque()
        self.arrived = anyio.Event()
        self.asked = 0  # messages asked for and not yet delivered or expired
        self.heard = 0.0  # when the server last answered (a message or a status)
        self.sub: Any = None

    async def start(self) -> None:
        async def arrived(message: Msg) -> None:
            self.messages.append(message)
            self.arrived.set()

        self.sub = await self.nc.subscribe(
            self.inbox, cb=arrived, pending_msgs_limit=4 * self.batch + 64
        )

    async def stop(self) -> None:
        import nats.errors

        with contextlib.suppress(nats.errors.Error):
            await self.sub.unsubscribe()

    async def next_messages(self) -> list[Msg]:
        """The messages that came since the last call (waiting up to `FETCH_WAIT_S` for
        one); status answers end requests."""
        import nats.errors

        now = anyio.current_time()
        if self.asked and now - self.heard > 4 * FETCH_WAIT_S:
            self.asked = 0  # the requests were lost with a connection: ask again
        if self.asked < self.batch:
            try:
                await self.nc.publish(self.subject, self.request, reply=self.inbox)
                self.asked += self.batch
                self.heard = max(self.heard, now)
            except (nats.errors.Error, OSError) as e:  # disconnected: nats-py reconnects
                log.debug("nats pull: %s", e)
                await anyio.sleep(FETCH_WAIT_S)
                return []
        if not self.messages:
            with anyio.move_on_after(FETCH_WAIT_S):
                await self.arrived.wait()
        self.arrived = anyio.Event()
        out = []
        while self.messages:
            message = self.messages.popleft()
            self.heard = anyio.current_time()
            status = message.headers.get("Status") if message.headers else None
            if status is None:
                self.asked -= 1
                out.append(message)
            elif status != "100":  # 404/408: a request ended, with what it still asked for
                pending = message.headers.get("Nats-Pending-Messages") if message.headers else None
                self.asked -= int(pending) if pending and pending.isdigit() else self.asked
                self.asked = max(self.asked, 0)
        return out


class _AckInbox:
    """Confirmed acknowledgements through one subscription: each `+ACK` carries a reply
    subject `<inbox>.<n>`, to which the server answers once it has processed it."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.waiting: dict[str, str] = {}  # token -> the acknowledged reply subject
        self.confirmed = anyio.Event()
        self.count = itertools.count()

    @classmethod
    async def open(cls, nc: Client) -> _AckInbox:
        inbox = cls(nc)

        async def answered(message: Msg) -> None:
            if inbox.waiting.pop(message.subject.rpartition(".")[2], None) is not None:
                if not inbox.waiting:
                    inbox.confirmed.set()

        await nc.subscribe(inbox.inbox + ".*", cb=answered)
        return inbox

    async def acknowledge(self, replies: list[str], wait_s: float) -> list[str]:
        """Acknowledge `replies`; those the server did not confirm within `wait_s`."""
        self.waiting.clear()
        self.confirmed = anyio.Event()
        for reply in replies:
            token = str(next(self.count))
            self.waiting[token] = reply
            await self.nc.publish(reply, b"+ACK", reply=f"{self.inbox}.{token}")
        if self.waiting:
            with anyio.move_on_after(wait_s):
                await self.confirmed.wait()
        return list(self.waiting.values())


def subject_prefix(subjects: str) -> str:
    """The literal tokens of a subject filter before its first wildcard, with their dot:
    `sensors.` for `sensors.>`, `""` for `>`."""
    tokens = subjects.split(".")
    literal = list(itertools.takewhile(lambda t: t not in ("*", ">"), tokens))
    return "".join(t + "." for t in literal)


class _Delivery(NamedTuple):
    consumer: str
    delivered: int
    sseq: int
    dseq: int


def _delivery(reply: str | None) -> _Delivery:
    """Which consumer delivered this message, how many times the server delivered it,
    its stream sequence and the delivery's number, from its reply subject
    (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
    or with a domain and an account hash after `ACK` and a token at the end on newer
    servers)."""
    tokens = (reply or "").split(".")
    at = 2 if len(tokens) == 9 else 4
    try:
        return _Delivery(
            tokens[at + 1], int(tokens[at + 2]), int(tokens[at + 3]), int(tokens[at + 4])
        )
    except (IndexError, ValueError):
        raise NatsError(f"not a JetStream delivery: reply subject {reply!r}") from None
