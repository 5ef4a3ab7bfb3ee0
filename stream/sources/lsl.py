"""Lab Streaming Layer ingest: one inlet per outlet that matches `lsl.predicate`, its
samples handed over as frames (label `lsl`, policy `drop_oldest`: an outlet cannot be
slowed down). Needs the `lsl` extra (pylsl); liblsl is only called in worker threads.

```
 outlets ─► resolver (every resolve_interval_s) ─► inlet per outlet ─pull─► frames ─► ring ─► ingest
               refused: wrong shape, one warning      │ lost: closed, resolved again (any uid)
```

**An outlet becomes a stream.** Its stream id is its name, or the `stream_id` of the
`[[lsl.outlets]]` table with its name; its channels fill the modalities the table lists,
in that order (default: sensory, proprio, tactile, motor — all four, in wire order), so
it must have exactly that many channels, of a numeric format (converted to float32). One
that does not (or whose name is no valid stream id) is refused with one warning line,
once per outlet (uid). The other modalities are zero and absent (presence bits clear).
One outlet per stream id at a time: another of the same id waits, with one warning,
until the first is gone.

**A sample becomes a frame** (`stream.sources.lsl_frames`): its timestamp corrected to
the daemon's clock (`clock_sync`; `stream.lsl`), its seq that timestamp in microseconds
(strictly increasing), its `received_ns` its capture time on the daemon's clock, so a
sample's age counts from its capture. A frame whose seq is not above what its stream last
had admitted (the daemon's clock restarted under a restored checkpoint: a reboot) starts
a new session (`SESSION_START`), as does one more than `ingest.max_seq_jump` above it (an
outlet back after more than an hour).

**Freshness.** The inlet holds at most `freshness.buffer_s(max_buflen_s)` seconds (1 s
for `latest`; liblsl drops what is older, uncounted), and what each pull takes is shed by
the policy (`Freshness.keep` on capture times; `latest` pulls on while more comes, and
keeps the newest of it all): shed samples count as received and dropped (`stale`). A
non-finite sample is rejected (`non_finite`); its stream goes on.

**Threads.** Each open inlet has a worker thread of its own that pulls (waiting at most
`PULL_WAIT_S`, so a stop is seen soon), turns samples into frames and posts them to a
mailbox; the event loop is woken once per burst of posts (from any number of inlets) and
hands them to the ring that `Ingest.pump` empties into the pipeline. Resolving, opening
and closing run in worker threads too.

**Loss.** A pull that finds its outlet gone (liblsl's lost error: `recover` is off, so
loss is seen) closes the inlet and reports the source down (`source_state`) while any
lost outlet is missing; an outlet of the same name — the same one back, or a new uid —
is opened at the next resolve and the stream goes on; once none is missing the source
is up again. Opens that fail are retried with a backoff per outlet, up to `MAX_RETRY_S`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ..buffers import Overflow, WeightedBuffer
from ..freshness import Freshness
from ..ingest import Ingest
from ..lsl import ClockSync, Inlet, LslError, OutletInfo, OutletLost, Resolver
from ..protocol import (
    SESSION_START,
    Dims,
    Frame,
    FrameRejected,
    check_stream_id,
)
from .lsl_frames import LABEL, MODALITIES, Framer, LastSeq, Placement, Pulled

__all__ = ["LslSettings", "LslSource", "OutletMapping"]

log = logging.getLogger(__name__)

PULL_INTERVAL_S = 0.002
"""A sample that comes sooner than this after an inlet's previous pull waits out the rest
of it, so that the ones after it come along: a fast outlet pushing sample by sample is
handed over a few samples at a time (at most 500 pulls a second per inlet), for at most
this much more latency; a slower one is not delayed at all."""
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
"""An outlet whose inlet failed to open, or was lost, is tried again after
`FIRST_RETRY_S`, doubling with each failure up to `MAX_RETRY_S`."""
MIN_THREADS = 4
"""Worker threads for resolving and opening, beside one per open inlet."""
LATEST = Freshness("latest")
"""The default policy: a stream that fell behind resumes on its newest sample."""


@dataclasses.dataclass(frozen=True, slots=True)
class OutletMapping:
    """How an outlet named `name` becomes a stream: `stream_id` (None: its name) and the
    `modalities` its channels fill, in channel order."""

    name: str
    stream_id: str | None = None
    modalities: tuple[str, ...] = MODALITIES


@dataclasses.dataclass(frozen=True, slots=True)
class LslSettings:
    """The source's settings (the `[lsl]` section; docs/configuration.md).

    - `predicate`: the XPath 1.0 predicate outlets must match (`type='EEG'`).
    - `freshness`: what a stream that fell behind sheds (`stream.freshness`); it also
        bounds each inlet's buffer (`Freshness.buffer_s(max_buflen_s)`).
    - `clock_sync`, `dejitter`: how timestamps reach the daemon's clock (`stream.lsl`).
    - `chunk_samples`: the most samples one pull takes (the inlet's buffers' rows).
    - `resolve_interval_s`: how often the outlets seen are looked at.
    - `outlets`: how named outlets map to streams; others: by their name, all four
        modalities.
    - `pull_interval_s`: `PULL_INTERVAL_S` (not configurable yet).
    """

    predicate: str
    freshness: Freshness = LATEST
    clock_sync: ClockSync = "processing"
    dejitter: bool = True
    chunk_samples: int = 1024
    max_buflen_s: int = 360
    resolve_interval_s: float = 1.0
    outlets: tuple[OutletMapping, ...] = ()
    pull_interval_s: float = PULL_INTERVAL_S

    @classmethod
    def of(cls, config: Any) -> LslSettings:
        """From a `stream.config.LslConfig`; `LslError` when two tables name the same
        outlet or stream, or a stream id is not one the protocol accepts."""
        mappings = tuple(
            OutletMapping(t["name"], t.get("stream_id"), tuple(t.get("modalities") or MODALITIES))
            for t in config.outlets
        )
        names: dict[str, str] = {}
        ids: dict[str, str] = {}
        for m in mappings:
            sid = m.stream_id or m.name
            if m.name in names:
                raise LslError(f"lsl.outlets: two tables for the outlet {m.name!r}; keep one")
            if sid in ids:
                raise LslError(
                    f"lsl.outlets: outlets {ids[sid]!r} and {m.name!r} both map to stream "
                    f"{sid!r}; give each its own stream_id (join them with [[align.bodies]])"
                )
            if m.stream_id is not None:
                try:
                    check_stream_id(m.stream_id)
                except FrameRejected as e:
                    raise LslError(
                        f"lsl.outlets: stream_id = {m.stream_id!r}: {e.detail}"
                    ) from None
            names[m.name] = ids[sid] = m.name
        return cls(
            predicate=config.predicate,
            freshness=Freshness.parse(config.freshness),
            clock_sync=config.clock_sync,
            dejitter=config.dejitter,
            chunk_samples=config.chunk_samples,
            max_buflen_s=config.max_buflen_s,
            resolve_interval_s=config.resolve_interval_s,
            outlets=mappings,
        )


class _Mailbox:
    """Where worker threads post pulls for the event loop: one wake-up (a byte on a
    socket pair) per burst of posts rather than one per post, and a thread never waits
    for the loop."""

    def __init__(self) -> None:
        self._receive, self._send = socket.socketpair()
        self._receive.setblocking(False)
        self._send.setblocking(False)
        self._items: collections.deque[Pulled] = collections.deque()
        self._armed = False  # a wake-up is on its way

    def post(self, item: Pulled) -> None:
        """Queue `item` (any thread)."""
        self._items.append(item)
        if not self._armed:
            self._armed = True
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                self._send.send(b"\0")

    async def wait(self) -> None:
        """Return once something was posted since the last `wait` (the event loop)."""
        await anyio.wait_readable(self._receive)
        with contextlib.suppress(OSError):
            self._receive.recv(4096)
        self._armed = False  # before `take`: a post after it wakes the next `wait`

    def take(self) -> list[Pulled]:
        items = self._items
        return [items.popleft() for _ in range(len(items))]

    def close(self) -> None:
        self._receive.close()
        self._send.close()


class LslSource:
    """Lab Streaming Layer outlets as a `Source` (label `lsl`, policy `drop_oldest`;
    nothing to acknowledge). See the module docstring.

    **Arguments:** `settings`, the `[lsl]` section; `dims`, the configured modality sizes;
    `ring`, frames that may wait for the pipeline (beyond, the oldest is dropped and
    counted `overload`; default: four chunks, at least 4096).
    """

    name = "lsl"
    labels: tuple[str, ...] = (LABEL,)
    overflow: Overflow = "drop_oldest"

    def __init__(self, settings: LslSettings, *, dims: Dims, ring: int | None = None) -> None:
        self.settings = settings
        self.dims = dims
        self.ring_size = ring or max(4 * settings.chunk_samples, 4096)
        self._mappings = {m.name: m for m in settings.outlets}
        self._placements: dict[tuple[str, ...], Placement] = {}
        self._limiter = anyio.CapacityLimiter(MIN_THREADS)
        self._following: dict[str, str] = {}  # stream id -> the uid of its outlet
        self._opening: dict[str, anyio.CancelScope] = {}  # stream id -> its open
        self._seqs: dict[str, LastSeq] = {}
        self._refused: set[str] = set()  # uids, each warned about once
        self._waiting: set[str] = set()  # uids of outlets whose stream id is taken, warned
        self._retry: dict[str, tuple[float, float]] = {}  # uid -> (not before, next delay)
        self._missing: set[str] = set()  # stream ids lost and not open again
        self._ingest: Ingest | None = None
        self._ring: WeightedBuffer[Frame] | None = None
        self._followers: TaskGroup | None = None
        self._mailbox: _Mailbox | None = None
        self._stopping = False

    # -- what the pipeline calls -------------------------------------------------------------

    async def run(
        self, ingest: Ingest, *, task_status: TaskStatus[int | None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Resolve outlets and follow each until the ingest stops; `started(None)` once
        the resolver runs (not waiting for outlets)."""
        resolver = await anyio.to_thread.run_sync(
            Resolver, self.settings.predicate, limiter=self._limiter
        )
        self._ingest = ingest
        ring: WeightedBuffer[Frame] = ingest.ring(self.ring_size)
        self._ring = ring
        self._mailbox = mailbox = _Mailbox()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ingest.pump, ring, functools.partial(map, self._admissible))
                async with anyio.create_task_group() as delivery:
                    delivery.start_soon(self._deliver, ingest)
                    async with anyio.create_task_group() as followers:
                        self._followers = followers
                        ingest.events.source_state(LABEL, True)
                        task_status.started(None)
                        while ingest.accepting:
                            outlets = await anyio.to_thread.run_sync(
                                resolver.outlets, limiter=self._limiter
                            )
                            self._consider(outlets)
                            with anyio.move_on_after(self.settings.resolve_interval_s):
                                await ingest.stopped.wait()
                        self._stopping = True  # the pulling threads finish their pull
                        for scope in self._opening.values():
                            scope.cancel()
                    delivery.cancel_scope.cancel()
                for pulled in mailbox.take():  # what the last pulls posted
                    self._hand_over(ingest, pulled)
                ring.close()  # the pump hands over what the ring holds, then ends
        finally:
            mailbox.close()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(resolver.close, limiter=self._limiter)

    def commit(self, positions: Sequence[object]) -> None:
        pass

    # -- resolving ---------------------------------------------------------------------------

    def _consider(self, outlets: list[OutletInfo]) -> None:
        """Open an inlet for each outlet seen that is not followed, refused or waiting
        for a retry."""
        now = time.monotonic()
        seen = {o.uid for o in outlets}
        for known in (self._refused, self._waiting):
            known &= seen  # an outlet the resolver forgot is considered afresh
        self._retry = {u: r for u, r in self._retry.items() if u in seen}
        for outlet in outlets:
            uid = outlet.uid
            if uid in self._refused or uid in self._following.values():
                continue
            retry = self._retry.get(uid)
            if retry is not None and now < retry[0]:
                continue
            mapping = self._mappings.get(outlet.name) or OutletMapping(outlet.name)
            sid = mapping.stream_id or outlet.name
            placement = self._placement(mapping.modalities)
            why = _refusal(outlet, sid, placement)
            if why is not None:
                self._refused.add(uid)
                log.warning("lsl: outlet %s refused: %s", outlet.describe(), why)
                continue
            if sid in self._following:
                if uid not in self._waiting:
                    self._waiting.add(uid)
                    log.warning(
                        "lsl: outlet %s is ignored while another outlet (uid %s) feeds "
                        "stream %r; give it its own stream_id in [[lsl.outlets]]",
                        outlet.describe(), self._following[sid], sid,
                    )  # fmt: skip
                continue
            self._waiting.discard(uid)
            self._following[sid] = uid
            self._limiter.total_tokens = MIN_THREADS + len(self._following)
            assert self._followers is not None
            self._followers.start_soon(self._follow, outlet, sid, placement)

    def _placement(self, modalities: tuple[str, ...]) -> Placement:
        placement = self._placements.get(modalities)
        if placement is None:
            placement = self._placements[modalities] = Placement.of(modalities, self.dims)
        return placement

    def _failed(self, uid: str) -> None:
        """Try the outlet `uid` again only after a backoff."""
        _, delay = self._retry.get(uid, (0.0, FIRST_RETRY_S))
        self._retry[uid] = (time.monotonic() + delay, min(2 * delay, MAX_RETRY_S))

    # -- following one outlet ------------------------------------------------------------------

    async def _follow(self, outlet: OutletInfo, sid: str, placement: Placement) -> None:
        ingest = self._ingest
        assert ingest is not None
        s = self.settings
        buffer_s = s.freshness.buffer_s(s.max_buflen_s)
        inlet: Inlet | None = None
        try:
            with anyio.CancelScope() as self._opening[sid]:
                inlet = await anyio.to_thread.run_sync(
                    functools.partial(
                        Inlet,
                        outlet,
                        max_buflen_s=buffer_s,
                        chunk_samples=s.chunk_samples,
                        clock_sync=s.clock_sync,
                        dejitter=s.dejitter,
                    ),
                    limiter=self._limiter,
                    abandon_on_cancel=True,
                )
            del self._opening[sid]
            if inlet is None:  # cancelled: stopping
                return
            self._opened(outlet, sid)
            framer = Framer(
                inlet,
                sid,
                placement,
                self._seqs.setdefault(sid, LastSeq()),
                s.freshness,
                self.dims.total,
                daemon_clock=s.clock_sync != "none",
                interval_s=s.pull_interval_s,
                rewind_s=buffer_s,
            )
            # The inlet's own worker thread pulls until the stop (or its loss) and posts
            # what it pulled, without waiting for the event loop.
            await anyio.to_thread.run_sync(self._pull, framer, limiter=self._limiter)
        except OutletLost as e:
            self._failed(outlet.uid)
            if inlet is None:
                log.info("lsl: outlet %s: %s; trying again later", outlet.describe(), e)
            else:
                self._lost(outlet, sid, e)
        finally:
            self._opening.pop(sid, None)
            del self._following[sid]
            self._limiter.total_tokens = MIN_THREADS + len(self._following)
            if inlet is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(inlet.close, limiter=self._limiter)

    def _pull(self, framer: Framer) -> None:
        """Pull and post until the source stops or this task is cancelled (in the inlet's
        worker thread; each pull waits at most `PULL_WAIT_S`, so either is seen soon)."""
        mailbox = self._mailbox
        assert mailbox is not None
        while not self._stopping:
            anyio.from_thread.check_cancelled()
            pulled = framer.pull()
            if pulled is not None:
                mailbox.post(pulled)

    async def _deliver(self, ingest: Ingest) -> None:
        """Hand over what the inlets' threads post, until cancelled."""
        mailbox = self._mailbox
        assert mailbox is not None
        while True:
            await mailbox.wait()
            for pulled in mailbox.take():
                self._hand_over(ingest, pulled)

    def _hand_over(self, ingest: Ingest, pulled: Pulled) -> None:
        ingest.received(LABEL, pulled.received)
        if pulled.stale:
            ingest.dropped("stale", pulled.stale)
        for _ in range(pulled.non_finite):
            ingest.rejected(LABEL, "non_finite")
        ring = self._ring
        assert ring is not None
        for frame in pulled.frames:
            ring.put_nowait(frame)

    def _opened(self, outlet: OutletInfo, sid: str) -> None:
        self._retry.pop(outlet.uid, None)
        rate = f"{outlet.rate_hz:g} Hz" if outlet.rate_hz else "irregular rate"
        log.info(
            "lsl: outlet %s open: %d %s channels at %s -> stream %r",
            outlet.describe(), outlet.channel_count, outlet.format_name, rate, sid,
        )  # fmt: skip
        if sid in self._missing:
            self._missing.discard(sid)
            if not self._missing:
                assert self._ingest is not None
                self._ingest.events.source_state(LABEL, True)

    def _lost(self, outlet: OutletInfo, sid: str, why: OutletLost) -> None:
        detail = f" ({why})" if str(why) else ""
        log.warning("lsl: outlet %s lost%s; resolving it again", outlet.describe(), detail)
        if not self._missing:
            assert self._ingest is not None
            self._ingest.events.source_state(LABEL, False)
        self._missing.add(sid)

    # -- on the way into the pipeline ----------------------------------------------------------

    def _admissible(self, frame: Frame) -> Frame:
        """A frame about to be handed over, marked as a session start when admission would
        otherwise refuse its seq: not above its stream's last admitted one (the clock
        restarted), or too far above it (`ingest.max_seq_jump`)."""
        ingest = self._ingest
        admission = ingest.admission if ingest is not None else None
        if admission is None:
            return frame
        table = admission.table
        last = table.admitted_seq.get(frame.stream_id)
        if last is not None and (
            frame.seq <= last or (table.max_seq_jump and frame.seq - last > table.max_seq_jump)
        ):
            frame.present |= SESSION_START
            log.info(
                "lsl: stream %r starts a new session: seq %d after %d (its clock restarted, "
                "or it was gone for long)", frame.stream_id, frame.seq, last,
            )  # fmt: skip
        return frame


def _refusal(outlet: OutletInfo, sid: str, placement: Placement) -> str | None:
    """Why `outlet` cannot feed stream `sid` through `placement`, or None."""
    try:
        check_stream_id(sid)
    except FrameRejected as e:
        return f"{e.detail}; give it a stream_id in [[lsl.outlets]]"
    if not outlet.numeric:
        return f"channel format {outlet.format_name}, expected a numeric one"
    if outlet.channel_count != placement.channels:
        return (
            f"{outlet.channel_count} channels, expected {placement.channels} "
            f"({placement.layout}); map its modalities in [[lsl.outlets]]"
        )
    return None
