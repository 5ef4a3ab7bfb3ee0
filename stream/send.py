"""The `send` client: simulated sensor streams pushed at a daemon.

Open-loop load: every stream gets one frame per tick, ticks are due at absolute times
`start + k / rate_hz`, and a late tick is sent as soon as possible (never skipped), so
the report's `elapsed_s` shows when the daemon could not keep up. Streams are spread over
`connections` TCP connections (stream `i` on connection `i % connections`); with UDP every
frame is one datagram. Signals come from `SyntheticBodies`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Literal

import anyio
from anyio.abc import SocketStream

from .protocol import Dims, encode_frame, encode_json_frame
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
    """

    frames: int
    bytes: int
    ticks: int
    elapsed_s: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0


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

    A `SendReport`.

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

    def encoded(k: int) -> list[bytes]:
        t = k / rate_hz
        values = bodies.tick(t)
        sensory, proprio, tactile, motor = (values[:, a:b] for a, b in bounds)
        return [
            encode(sid, k + 1, t, sensory=s, proprio=p, tactile=ta, motor=m)
            for sid, s, p, ta, m in zip(
                bodies.stream_ids, sensory, proprio, tactile, motor, strict=True
            )
        ]

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
        try:
            for k in range(ticks):
                await anyio.sleep_until(start + k / rate_hz)
                records = encoded(k)
                for c, link in enumerate(links):
                    chunk = b"".join(records[c::n])
                    await link.send(chunk)
                    sent_bytes += len(chunk)
            elapsed = anyio.current_time() - start
            async with anyio.create_task_group() as tg:
                for link in links:
                    tg.start_soon(_finish, link)
        finally:
            for link in links:
                await link.aclose()
    return SendReport(frames=ticks * streams, bytes=sent_bytes, ticks=ticks, elapsed_s=elapsed)


async def _finish(link: SocketStream) -> None:
    # Half-close, then read until the daemon closes: it has read every frame by then, and
    # closing with its replies unread could otherwise reset the connection.
    await link.send_eof()
    with anyio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            while True:
                await link.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


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
