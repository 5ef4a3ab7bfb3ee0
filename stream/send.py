"""The `send` client: simulated sensor streams pushed at a daemon.

Open-loop load: every stream gets one frame per tick, ticks are due at absolute times
`start + k / rate_hz`, and a late tick is sent as soon as possible (never skipped), so
the report's `elapsed_s` shows when the daemon could not keep up. Streams are spread over
`connections` TCP connections (stream `i` on connection `i % connections`); with UDP every
frame is one datagram. Signals come from `SyntheticBodies`.

Every run is a new session of its streams: each stream's first frame carries the session
start (`FRAME_START`, JSON `"start": true`), so its seq may start at 1 again however
often `send` is run against the same daemon. Over TCP it asks for replies (`FRAME_REPLY`;
a JSON connection always gets them), reads them, and, after its last frame, half-closes
and reads until the daemon closes: the report then counts every frame the daemon
rejected, by reason. UDP gets no replies.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
from typing import Any, Literal

import anyio
from anyio.abc import SocketStream

from .protocol import Dims, ReplyReader, encode_frame, encode_json_frame
from .synthetic import SyntheticBodies

__all__ = ["SendReport", "Transport", "run_sender", "send"]

Transport = Literal["tcp", "udp", "json"]

CLOSE_TIMEOUT_S = 10.0
"""How long a TCP connection waits, after its last frame, for the daemon to read it all."""


@dataclasses.dataclass(frozen=True, slots=True)
class SendReport:
    """What one `run_sender` call sent.

    - `frames`: frames sent, `ticks * streams`.
    - `bytes`: their encoded size.
    - `ticks`: ticks sent (per stream, seq 1..ticks).
    - `elapsed_s`: seconds from the first tick's deadline to the last frame's send.
    - `transport`: how they were sent.
    - `rejected`: frames the daemon rejected, by reason (TCP and JSON: every one; UDP:
        nothing is known, always empty).
    - `complete`: whether every connection was closed by the daemon after answering all
        it read (False: it did not close within `CLOSE_TIMEOUT_S`; some replies may be
        missing). Always False for UDP.
    """

    frames: int
    bytes: int
    ticks: int
    elapsed_s: float
    transport: str = "tcp"
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    complete: bool = False

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def accepted(self) -> int | None:
        """Frames the daemon took in (passed decoding and the seq check); None for UDP."""
        return None if self.transport == "udp" else self.frames - sum(self.rejected.values())

    def summary(self) -> str:
        """One human line: what was sent, and what the daemon said of it."""
        line = (
            f"sent {self.frames} frames ({self.ticks} per stream) in {self.elapsed_s:.2f} s "
            f"over {self.transport}"
        )
        if self.transport == "udp":
            return line + "; UDP gets no replies: see enactive_frames_rejected_total"
        line += f": {self.accepted} accepted, {sum(self.rejected.values())} rejected"
        if self.rejected:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items()))
            line += f" ({reasons})"
        if not self.complete:
            line += "; the daemon did not close the connection in time, replies may be missing"
        return line

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with `accepted` and `frames_per_s`."""
        return {
            **dataclasses.asdict(self),
            "accepted": self.accepted,
            "frames_per_s": self.frames_per_s,
        }


async def run_sender(
    host: str,
    port: int,
    *,
    streams: int,
    rate_hz: float,
    duration_s: float,
    transport: Transport,
    dims: Dims,
    seed: int = 0,
    connections: int = 1,
    prefix: str = "sim",
) -> SendReport:
    """Send `streams` synthetic streams at `rate_hz` frames per second each.

    **Arguments:**

    - `host`, `port`: the daemon's ingest address.
    - `streams`: the number of streams, >= 1, with ids `f"{prefix}-{i:04d}"`.
    - `rate_hz`: ticks per second, > 0; every stream sends one frame per tick.
    - `duration_s`: run length; `ceil(duration_s * rate_hz)` ticks (at least one).
    - `transport`: `"tcp"` (binary frames), `"json"` (JSON lines over TCP) or `"udp"`.
    - `dims`: modality sizes; must match the daemon's or its frames are rejected.
    - `seed`: fixes the signals.
    - `connections`: TCP connections to spread the streams over (ignored for UDP).
    - `prefix`: the stream-id prefix.

    **Returns:**

    A `SendReport`, with the rejections the daemon answered (TCP and JSON).

    **Raises:**

    `ValueError` for an argument out of range; `OSError` when the daemon cannot be reached.
    """
    if streams < 1 or connections < 1:
        raise ValueError(f"streams={streams}, connections={connections}; both must be >= 1")
    if rate_hz <= 0 or duration_s < 0:
        raise ValueError(f"rate_hz={rate_hz} must be > 0 and duration_s={duration_s} >= 0")
    if transport not in ("tcp", "udp", "json"):
        raise ValueError(f"transport={transport!r}, expected 'tcp', 'udp' or 'json'")
    bodies = SyntheticBodies(streams, dims, seed=seed, prefix=prefix, dt=1.0 / rate_hz)
    ticks = max(1, math.ceil(duration_s * rate_hz - 1e-9))
    encode = encode_json_frame if transport == "json" else encode_frame
    bounds = list(itertools.pairwise(itertools.accumulate(dims, initial=0)))
    sent_bytes = 0

    flags: dict[str, bool] = {} if transport == "json" else {"reply": transport == "tcp"}

    def encoded(k: int) -> list[bytes]:
        t = k / rate_hz
        values = bodies.tick(t)
        sensory, proprio, tactile, motor = (values[:, a:b] for a, b in bounds)
        return [
            encode(sid, k + 1, t, sensory=s, proprio=p, tactile=ta, motor=m, start=k == 0, **flags)
            for sid, s, p, ta, m in zip(
                bodies.stream_ids, sensory, proprio, tactile, motor, strict=True
            )
        ]

    rejected: collections.Counter[str] = collections.Counter()
    complete = False

    start = anyio.current_time()
    if transport == "udp":
        async with await anyio.create_connected_udp_socket(host, port) as udp:
            for k in range(ticks):
                await anyio.sleep_until(start + k / rate_hz)
                for record in encoded(k):
                    await udp.send(record)
                    sent_bytes += len(record)
            elapsed = anyio.current_time() - start
    else:
        n = min(connections, streams)
        links = [await anyio.connect_tcp(host, port) for _ in range(n)]
        closed = [anyio.Event() for _ in links]
        try:
            async with anyio.create_task_group() as readers:
                for link, done in zip(links, closed, strict=True):
                    readers.start_soon(_read_replies, link, transport, rejected, done)
                for k in range(ticks):
                    await anyio.sleep_until(start + k / rate_hz)
                    records = encoded(k)
                    for c, link in enumerate(links):
                        chunk = b"".join(records[c::n])
                        await link.send(chunk)
                        sent_bytes += len(chunk)
                elapsed = anyio.current_time() - start
                # Half-close, then let the readers read until the daemon closes: it has
                # answered every frame by then.
                for link in links:
                    await link.send_eof()
                with anyio.move_on_after(CLOSE_TIMEOUT_S):
                    for done in closed:
                        await done.wait()
                    complete = True
                readers.cancel_scope.cancel()
        finally:
            for link in links:
                await link.aclose()
    return SendReport(
        frames=ticks * streams,
        bytes=sent_bytes,
        ticks=ticks,
        elapsed_s=elapsed,
        transport=transport,
        rejected=dict(rejected),
        complete=complete,
    )


async def _read_replies(
    link: SocketStream,
    transport: Transport,
    rejected: collections.Counter[str],
    closed: anyio.Event,
) -> None:
    """Count the daemon's replies on `link` by reason until it closes the connection."""
    binary, pending = ReplyReader(), b""
    try:
        while True:
            data = await link.receive()
            if transport == "json":
                *lines, pending = (pending + data).split(b"\n")
                rejected.update(json.loads(line)["error"] for line in lines if line.strip())
            else:
                rejected.update(reply.reason for reply in binary.feed(data))
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        closed.set()


def send(
    host: str,
    port: int,
    *,
    streams: int,
    rate_hz: float,
    duration_s: float,
    transport: Transport,
    dims: Dims,
    seed: int = 0,
    connections: int = 1,
    prefix: str = "sim",
) -> SendReport:
    """`run_sender` in a fresh event loop (the synchronous entry point for the CLI)."""
    run = functools.partial(
        run_sender,
        host,
        port,
        streams=streams,
        rate_hz=rate_hz,
        duration_s=duration_s,
        transport=transport,
        dims=dims,
        seed=seed,
        connections=connections,
        prefix=prefix,
    )
    return anyio.run(run)
