"""`enactive-stream replay`: a recording fed back to a daemon, frame for frame.

The frames go out in file order, byte for byte as recorded (stream id, seq, timestamp,
modalities, payload, the session-start flag), so a fresh daemon admits exactly the frames
the recording daemon stepped, in the same order per stream (docs/recording.md, for when
its moments are bit-identical). Over TCP (one connection, so the file's order is kept)
each frame also carries `FRAME_REPLY`, and the report counts every frame the daemon
rejected, by reason; over UDP nothing is answered, and a daemon under load may drop
datagrams.

Pacing: at `speed` 1 the frames keep the gaps between their recorded receipt times, at
`speed` X those gaps divided by X (a receipt time earlier than the one before it, as
across two recording runs on different clocks, is no gap); with `speed=None` there is no
pacing at all. Frames due at the same time go out together, up to `CHUNK_BYTES` per send.

Into NATS (`nats://HOST:PORT`, the `nats` extra) each frame is published to JetStream on
`<subject prefix><stream id>` (`sensors.` by default: what the daemon's `[nats]` source
consumes), in file order, the server confirming each; rejections are then the daemon's
to count (`enactive_frames_rejected_total{source="nats"}`).

Targets are URLs, `tcp://HOST:PORT`, `udp://HOST:PORT` or `nats://HOST:PORT`
(`parse_target`); another scheme is a `ReplayUsageError`.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
import struct
from typing import Any

import anyio

from .config import parse_address
from .protocol import FRAME_HEADER_BYTES, FRAME_REPLY
from .recording import RecordingReader
from .send import SendRecords, Transport, deliver

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_TARGET",
    "ReplayReport",
    "ReplayUsageError",
    "Target",
    "parse_target",
    "replay",
    "run_replay",
]

DEFAULT_TARGET = "tcp://127.0.0.1:7400"
"""The daemon's default sensor listener."""
CHUNK_BYTES = 1 << 16
"""Frames sent together at most, in bytes (one frame larger than this goes alone)."""
_TRANSPORTS: dict[str, Transport] = {"tcp": "tcp", "udp": "udp"}
SCHEMES = ("tcp", "udp", "nats")
NATS_WINDOW = 1024
"""Frames published to NATS and not yet confirmed, at most."""


_ID_LENGTH = struct.Struct("<H")  # the frame header's stream-id length, at offset 12


class ReplayUsageError(ValueError):
    """A replay target that cannot be used: an unknown scheme or a bad address."""


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where to replay to: `scheme` (`tcp`, `udp` or `nats`), `host` and `port`."""

    scheme: str
    host: str
    port: int

    @property
    def transport(self) -> Transport:
        return _TRANSPORTS[self.scheme]

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_target(text: str) -> Target:
    """Read a `--to` URL.

    **Arguments:**

    - `text`: `tcp://HOST:PORT`, `udp://HOST:PORT` or `nats://HOST:PORT` (an IPv6 host
        in brackets).

    **Returns:**

    The `Target`.

    **Raises:**

    `ReplayUsageError` naming the value and the valid forms.
    """
    scheme, sep, address = text.partition("://")
    forms = "tcp://HOST:PORT, udp://HOST:PORT or nats://HOST:PORT"
    if not sep:
        raise ReplayUsageError(f"--to {text!r}: expected {forms}")
    if scheme not in SCHEMES:
        raise ReplayUsageError(f"--to {text!r}: unknown scheme {scheme!r}, expected {forms}")
    try:
        host, port = parse_address(address)
    except ValueError as e:
        raise ReplayUsageError(f"--to {text!r}: {e}") from None
    if port == 0:
        raise ReplayUsageError(f"--to {text!r}: the port must be in [1, 65535]")
    return Target(scheme, host, port)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayReport:
    """What one replay sent.

    - `frames`, `bytes`: frames sent and their size.
    - `elapsed_s`: seconds from the first frame to the last frame's send.
    - `target`: where to, as a URL.
    - `rejected`: frames the daemon rejected, by reason (TCP; UDP: nothing is known).
    - `complete`: whether the daemon closed the connection after answering everything
        (TCP; always False for UDP).
    - `ignored_bytes`, `tail`: what was left unread at the end of the file and why (0 and
        "" for a whole file).
    """

    frames: int
    bytes: int
    elapsed_s: float
    target: str
    rejected: dict[str, int]
    complete: bool
    ignored_bytes: int = 0
    tail: str = ""

    def summary(self) -> str:
        """One human line."""
        line = f"replayed {self.frames} frames in {self.elapsed_s:.2f} s to {self.target}"
        if self.target.startswith("udp:"):
            return line + "; UDP gets no replies: see enactive_frames_rejected_total"
        if self.target.startswith("nats:"):
            return line + ", all stored by the server; see enactive_frames_rejected_total"
        rejected = sum(self.rejected.values())
        line += f": {self.frames - rejected} accepted, {rejected} rejected"
        if self.rejected:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items()))
            line += f" ({reasons})"
        if not self.complete:
            line += "; the daemon did not close the connection in time, replies may be missing"
        return line

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def run_replay(
    reader: RecordingReader,
    target: Target,
    *,
    speed: float | None = 1.0,
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
    subject_prefix: str = "sensors.",
) -> ReplayReport:
    """Send every frame of a recording to a daemon.

    **Arguments:**

    - `reader`: the recording, not iterated yet; it is read to its end (or to the first
        damaged record: `reader.ignored`, `reader.problem`).
    - `target`: where to.
    - `speed`: > 0, how much faster than recorded (1: the recorded pacing); None: as fast
        as the daemon takes them.
    - `tls`, `token`: as for `stream.send.run_sender` (TCP only).
    - `subject_prefix`: NATS only: a frame of stream `s` is published to `prefix + s`.

    **Returns:**

    A `ReplayReport`.

    **Raises:**

    As `stream.send.deliver`: `ValueError`, `OSError`, `SendError`; into NATS,
    `stream.jetstream.NatsError` (no server, no stream for the subjects, the extra not
    installed).
    """
    if speed is not None and not speed > 0:
        raise ValueError(f"speed={speed}, expected > 0")
    if target.scheme == "nats":
        return await _replay_nats(reader, target, speed=speed, subject_prefix=subject_prefix)
    reply = target.transport == "tcp"
    frames = 0
    elapsed = 0.0

    async def produce(send: SendRecords) -> None:
        nonlocal frames, elapsed
        start = anyio.current_time()
        pacing = _Pacing(speed)
        chunk: list[bytes] = []
        size = 0

        async def flush() -> bool:
            nonlocal chunk, size, frames
            ok = await send(chunk)
            if ok:
                frames += len(chunk)
            chunk, size = [], 0
            return ok

        for record in reader:
            due = pacing.due(record.received_ns)
            if due is not None:
                if chunk and not await flush():
                    return  # the daemon closed the connection: `deliver` says why
                await anyio.sleep_until(due)
            frame = record.frame
            if reply:
                frame = _with_reply(frame)
            chunk.append(frame)
            size += len(frame)
            if size >= CHUNK_BYTES and not await flush():
                return
        if chunk:
            await flush()
        elapsed = anyio.current_time() - start

    delivered = await deliver(
        target.host, target.port, produce, transport=target.transport, tls=tls, token=token
    )
    return ReplayReport(
        frames=frames,
        bytes=delivered.bytes,
        elapsed_s=elapsed,
        target=str(target),
        rejected=delivered.rejected,
        complete=delivered.complete,
        ignored_bytes=reader.ignored,
        tail=reader.problem,
    )


async def _replay_nats(
    reader: RecordingReader, target: Target, *, speed: float | None, subject_prefix: str
) -> ReplayReport:
    from .jetstream import NatsError, NatsSettings, connect

    url = f"nats://{target.host}:{target.port}"
    nc = await connect(NatsSettings(url=url, connect_timeout_s=5.0), name="enactive-stream replay")
    import nats.errors

    js = nc.jetstream(publish_async_max_pending=NATS_WINDOW)
    frames = size = 0
    start = anyio.current_time()
    pacing = _Pacing(speed)
    window: list[Any] = []
    try:
        for record in reader:
            due = pacing.due(record.received_ns)
            if due is not None:
                await anyio.sleep_until(due)
            frame = record.frame
            (id_length,) = _ID_LENGTH.unpack_from(frame, 12)
            stream_id = frame[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + id_length].decode()
            window.append(await js.publish_async(subject_prefix + stream_id, frame))
            frames += 1
            size += len(frame)
            if len(window) >= NATS_WINDOW:
                await _confirmed(window)
        await _confirmed(window)
    except nats.errors.Error as e:
        raise NatsError(f"publishing to {url}: {e}") from None
    finally:
        await nc.close()
    return ReplayReport(
        frames=frames,
        bytes=size,
        elapsed_s=anyio.current_time() - start,
        target=str(target),
        rejected={},
        complete=True,
        ignored_bytes=reader.ignored,
        tail=reader.problem,
    )


class _Pacing:
    """When each recorded frame is due: the gaps between recorded receipt times divided by
    `speed` (a receipt time earlier than the one before is no gap); None: no pacing."""

    def __init__(self, speed: float | None) -> None:
        self.speed = speed
        self.at = anyio.current_time()
        self.previous: int | None = None

    def due(self, received_ns: int) -> float | None:
        """The time the frame received at `received_ns` is due; None if due now."""
        if self.speed is None:
            return None
        if self.previous is not None:
            self.at += max(received_ns - self.previous, 0) / 1e9 / self.speed
        self.previous = received_ns
        return self.at if self.at > anyio.current_time() else None


async def _confirmed(window: list[Any]) -> None:
    """Wait for the server to store every frame of `window` (raising the first failure:
    no stream for the subject, say), then empty it."""
    import asyncio

    await asyncio.gather(*window)
    window.clear()


def _with_reply(frame: bytes) -> bytes:
    """`frame` with `FRAME_REPLY` set in its header flags (the u16 at offset 10)."""
    flagged = bytearray(frame)
    flagged[10] |= FRAME_REPLY
    return bytes(flagged)


def replay(
    reader: RecordingReader,
    target: Target,
    *,
    speed: float | None = 1.0,
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
    subject_prefix: str = "sensors.",
) -> ReplayReport:
    """`run_replay` in a fresh event loop (the synchronous entry point for the CLI)."""
    run = functools.partial(
        run_replay,
        reader,
        target,
        speed=speed,
        tls=tls,
        token=token,
        subject_prefix=subject_prefix,
    )
    return anyio.run(run)
