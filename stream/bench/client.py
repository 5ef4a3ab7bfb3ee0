"""The benchmark client: a load generator and a moment receiver, in its own process.

`main([SPEC.json])` runs one measurement described by a `ClientSpec` saved as JSON and
prints the result as one JSON object; `stream.bench.services.launch_client` starts it in
a fresh process.

Frames are pre-encoded (`FrameBlock`, one per connection; stream `i` goes over connection
`i % connections`), then sent by one thread per connection with `sendall`, while the main
thread receives moments (`SUB binary *`, subscribed and confirmed through the service's
`/metrics` before the first frame is sent). Nothing here builds a Python object per frame
or per moment. Modes:

- `throughput`: every connection sends its frames back to back; the clock runs from the
    first byte sent to the last moment received, counted in bytes.
- `latency`: open-loop load at `rate` frames/s in ticks of `tick_s`: tick `k` is due at
    `t0 + k·tick_s` and carries the frames scheduled up to its end, stamped with the tick's
    due time (`time.perf_counter`) in the f64 `timestamp` field — whether or not the
    service kept up, so a late tick's wait counts (no coordinated omission). Every moment
    echoes the timestamp; latency = receipt time − timestamp, receipt being the end of
    the `recv` that completed the record. Frames due in the first `warmup_s` seconds
    are sent and received like the rest but left out of the statistics: they measure
    the new process and its new connections starting up, not the service's steady state
    (wrk2 leaves out its calibration period the same way).
- `udp`: the same paced schedule, one datagram per frame, no subscription (overload).

A block holds `rounds` rounds; `repeats` > 1 sends it again with every seq advanced by
`rounds`, so long runs need little memory.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stream.protocol import Dims

from .probe import RunProbe
from .stats import cdf, percentiles
from .wire import FrameBlock, parse_records, receipt_times, stream_ids

__all__ = ["ClientError", "ClientSpec", "run_client"]

RECV_CHUNK = 1 << 20
"""Most bytes taken by one `recv`."""
_SUBSCRIBERS = re.compile(rb"^enactive_subscribers (\S+)$", re.MULTILINE)


class ClientError(RuntimeError):
    """The client could not complete its run (service unreachable, moments missing)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSpec:
    """One client run.

    - `mode`: `"throughput"`, `"latency"` or `"udp"`.
    - `ingest_port`: the service's TCP (or UDP) ingest port; `output_port`: its subscriber
        port; `metrics_port`: its HTTP port (for `enactive_subscribers`).
    - `streams`: S, ids from `stream_ids(streams, prefix)`; `connections`: ≥ 1.
    - `dims`: the modality sizes `(D, P, T, M)`.
    - `record_bytes`: the size of one moment record (checked against the records).
    - `rounds`, `repeats`, `first_seq`: see the module docstring; frames sent =
        `streams · rounds · repeats`, seq `first_seq … first_seq + rounds·repeats − 1`.
    - `rate`: offered frames/s in all (`latency`, `udp`); `tick_s`: the pacing tick.
    - `warmup_s`: `latency` only: the leading seconds of the schedule left out of the
        statistics.
    - `timeout_s`: the longest wait for the next byte before giving up.
    - `daemon_pid`: when > 0, the service's process: its CPU time and `/metrics` are read
        when the first frame is due, at the end of the warm-up and after the last moment
        (`stream.bench.probe.RunProbe`), and the result gets `daemon`.
    """

    mode: str
    ingest_port: int
    output_port: int = 0
    metrics_port: int = 0
    streams: int = 1024
    connections: int = 2
    dims: tuple[int, int, int, int] = (32, 64, 32, 32)
    record_bytes: int = 0
    rounds: int = 1
    repeats: int = 1
    first_seq: int = 1
    rate: float = 0.0
    tick_s: float = 0.001
    warmup_s: float = 0.0
    prefix: str = "b-"
    seed: int = 0
    host: str = "127.0.0.1"
    timeout_s: float = 30.0
    daemon_pid: int = 0

    @property
    def frames(self) -> int:
        """Frames this run sends."""
        return self.streams * self.rounds * self.repeats

    def __post_init__(self) -> None:
        if self.mode not in ("throughput", "latency", "udp"):
            raise ValueError(f"mode = {self.mode!r}, expected throughput, latency or udp")
        if min(self.streams, self.connections, self.rounds, self.repeats, self.first_seq) < 1:
            raise ValueError("streams, connections, rounds, repeats, first_seq must be >= 1")
        if self.mode != "throughput" and not (self.rate > 0 and self.tick_s > 0):
            raise ValueError(f"rate = {self.rate}, tick_s = {self.tick_s}: both must be > 0")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s = {self.warmup_s}, expected >= 0")
        if self.mode != "udp" and self.record_bytes <= 0:
            raise ValueError(f"record_bytes = {self.record_bytes}, expected > 0")


def _subscribers(host: str, port: int) -> float:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        found = _SUBSCRIBERS.search(r.read())
    return float(found.group(1)) if found else 0.0


def subscribe(host: str, output_port: int, metrics_port: int, timeout_s: float) -> socket.socket:
    """Connect to the subscriber port and send `SUB binary *`; return once the service's
    `/metrics` counts a subscriber (the caller's: one client at a time)."""
    sock = socket.create_connection((host, output_port), timeout=timeout_s)
    sock.sendall(b"SUB binary *\n")
    deadline = time.monotonic() + timeout_s
    while _subscribers(host, metrics_port) < 1:  # a readiness check
        if time.monotonic() > deadline:
            sock.close()
            raise ClientError(f"not subscribed within {timeout_s} s")
        time.sleep(0.01)
    return sock


def _subscribe(spec: ClientSpec) -> socket.socket:
    return subscribe(spec.host, spec.output_port, spec.metrics_port, spec.timeout_s)


def _blocks(spec: ClientSpec) -> list[FrameBlock]:
    ids = stream_ids(spec.streams, spec.prefix)
    n = min(spec.connections, spec.streams)
    return [
        FrameBlock(ids[c::n], spec.rounds, Dims(*spec.dims), first_seq=spec.first_seq, seed=c)
        for c in range(n)
    ]


def _paced(
    block: FrameBlock,
    repeats: int,
    rate: float,
    t0: float,
    tick: float,
    send: Callable[[int, int], None],
) -> tuple[float, float]:
    """Send `block` `repeats` times on the open-loop schedule; returns (end, max lag)."""
    per_block, total = len(block), len(block) * repeats
    sent = k = 0
    max_lag = 0.0
    while sent < total:
        due_at = t0 + k * tick
        delay = due_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        due = min(total, math.floor((k + 1) * tick * rate + 1e-9))
        while sent < due:
            r, i = divmod(sent, per_block)
            if i == 0 and r > 0:
                block.seq += np.uint64(block.rounds)
            j = min(due - r * per_block, per_block)
            block.timestamp[i:j] = due_at
            send(i, j)
            sent = r * per_block + j
        max_lag = max(max_lag, time.perf_counter() - due_at)
        k += 1
    return time.perf_counter(), max_lag


def _sender(
    spec: ClientSpec, block: FrameBlock, conn: socket.socket, share: float
) -> Callable[[float], tuple[float, float]]:
    view, size = block.bytes_view(), block.frame_size

    def send_tcp(i: int, j: int) -> None:
        conn.sendall(view[i * size : j * size])

    # One view per datagram, made once (the block is rewritten in place: seq, timestamps),
    # sent by a loop that runs in C: with a Python loop the overload phase's client fell
    # short of its 2 × the max.
    datagrams = (
        [view[x * size : (x + 1) * size] for x in range(len(block))] if spec.mode == "udp" else []
    )

    def send_udp(i: int, j: int) -> None:
        collections.deque(map(conn.send, datagrams[i:j]), maxlen=0)

    def throughput(t0: float) -> tuple[float, float]:
        for r in range(spec.repeats):
            if r:
                block.seq += np.uint64(block.rounds)
            conn.sendall(view)
        return time.perf_counter(), 0.0

    if spec.mode == "throughput":
        return throughput
    send = send_udp if spec.mode == "udp" else send_tcp
    return lambda t0: _paced(block, spec.repeats, spec.rate * share, t0, spec.tick_s, send)


def _receive_count(sock: socket.socket, total: int, timeout: float) -> float:
    """Receive exactly `total` bytes, keeping none; returns the time the last arrived."""
    buf = bytearray(RECV_CHUNK)
    view = memoryview(buf)
    got, first = 0, True
    sock.settimeout(timeout)
    while got < total:
        n = _recv(sock, view[: min(RECV_CHUNK, total - got)], got, total)
        if first and n >= 4 and bytes(view[:4]) != b"ESM1":
            raise ClientError(f"subscriber stream starts with {bytes(view[:4])!r}, not b'ESM1'")
        first = False
        got += n
    return time.perf_counter()


def _recv(sock: socket.socket, view: memoryview, got: int, total: int) -> int:
    try:
        n = sock.recv_into(view)
    except TimeoutError:
        raise ClientError(f"timed out after {got} of {total} moment bytes") from None
    if n == 0:
        raise ClientError(f"subscriber connection closed after {got} of {total} moment bytes")
    return n


def _receive_all(
    sock: socket.socket,
    buf: bytearray,
    timeout: float,
    until: Callable[[int, float], bool] | None = None,
    poll_s: float = 0.05,
) -> tuple[list[int], list[float]]:
    """Fill `buf` exactly, logging (bytes so far, time) per recv.

    `buf` is allocated (and so zeroed, every page touched) before the clock starts:
    allocating ~100 MB here would hold the GIL for tens of ms while the senders start.

    With `until`, a receipt that may end short of `buf` (UDP loses frames): every `poll_s`
    without a byte it is called with (bytes so far, seconds since the last byte) and the
    receipt ends when it returns true; `timeout` seconds without a byte still fail."""
    total = len(buf)
    view = memoryview(buf)
    ends: list[int] = []
    times: list[float] = []
    got = 0
    if until is None:
        sock.settimeout(timeout)
        while got < total:
            got += _recv(sock, view[got : min(got + RECV_CHUNK, total)], got, total)
            times.append(time.perf_counter())
            ends.append(got)
        return ends, times
    sock.settimeout(poll_s)
    last = time.perf_counter()
    while got < total:
        try:
            n = sock.recv_into(view[got : min(got + RECV_CHUNK, total)])
        except TimeoutError:
            idle = time.perf_counter() - last
            if until(got, idle):
                break
            if idle > timeout:
                raise ClientError(f"timed out after {got} of {total} moment bytes") from None
            continue
        if n == 0:
            raise ClientError(f"subscriber connection closed after {got} of {total} moment bytes")
        got += n
        last = time.perf_counter()
        times.append(last)
        ends.append(got)
    return ends, times


def _connect(spec: ClientSpec, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            if spec.mode == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.connect((spec.host, spec.ingest_port))
            else:
                s = socket.create_connection((spec.host, spec.ingest_port), timeout=None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def run_client(spec: ClientSpec) -> dict[str, Any]:
    """Run one client measurement (blocking; call it in its own process).

    **Arguments:**

    - `spec`: what to send where.

    **Returns:** a JSON-ready dict: `mode`, `frames`, `offered_frames_per_s`, `send_s`
    (first byte to last frame sent), `sent_frames_per_s`, `max_send_lag_ms`, and, unless
    `udp`: `elapsed_s` (first byte sent → last moment received), `frames_per_s`; for
    `latency` also `latency_ms` / `server_latency_ms` (`percentiles`, in ms) and
    `cdf_ms` (`cdf` of the client latency, in ms); with `spec.daemon_pid`, `daemon`:
    `{"run": …, "measured": …}` (`stream.bench.probe.daemon_delta`: the whole run, and
    after the warm-up).

    **Raises:** `ClientError` when moments are missing or malformed; `OSError` when the
    service is unreachable.
    """
    blocks = _blocks(spec)
    record_total = spec.frames * spec.record_bytes
    sub = _subscribe(spec) if spec.mode != "udp" else None
    socks: list[socket.socket] = []
    try:
        socks = _connect(spec, len(blocks))
        senders = [
            _sender(spec, b, s, b.streams / spec.streams)
            for b, s in zip(blocks, socks, strict=True)
        ]
        buf = bytearray(record_total if spec.mode == "latency" else 0)
        barrier = threading.Barrier(len(senders) + 1)
        t0_box: list[float] = []
        ends: list[tuple[float, float]] = []
        errors: list[BaseException] = []

        def work(fn: Callable[[float], tuple[float, float]]) -> None:
            try:
                barrier.wait()
                ends.append(fn(t0_box[0]))
            except BaseException as e:  # re-raised by the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(fn,), daemon=True) for fn in senders]
        for t in threads:
            t.start()
        probe = None
        if spec.daemon_pid > 0:
            probe = RunProbe(spec.host, spec.metrics_port, spec.daemon_pid)
            probe.begin()
        # A paced schedule starts just after the barrier; a throughput run right away.
        t0_box.append(time.perf_counter() + (0.0 if spec.mode == "throughput" else 0.005))
        if probe is not None and spec.warmup_s > 0:
            probe.start_warm(t0_box[0] + spec.warmup_s)
        barrier.wait()
        out: dict[str, Any] = {"mode": spec.mode, "frames": spec.frames}
        if spec.mode == "throughput":
            assert sub is not None
            done = _receive_count(sub, record_total, spec.timeout_s)
            out["elapsed_s"] = done - t0_box[0]
            if probe is not None:
                out["daemon"] = probe.finish()
        elif spec.mode == "latency":
            assert sub is not None
            chunk_ends, chunk_times = _receive_all(sub, buf, spec.timeout_s)
            out["elapsed_s"] = chunk_times[-1] - t0_box[0]
            if probe is not None:
                out["daemon"] = probe.finish()
            _latencies(out, buf, chunk_ends, chunk_times, spec, t0_box[0] + spec.warmup_s)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        if probe is not None and "daemon" not in out:  # udp: the last frame sent
            out["daemon"] = probe.finish()
    finally:
        for s in socks:
            s.close()
        if sub is not None:
            sub.close()
    send_end = max(end for end, _ in ends)
    out["send_s"] = send_end - t0_box[0]
    out["sent_frames_per_s"] = spec.frames / out["send_s"]
    out["max_send_lag_ms"] = 1e3 * max(lag for _, lag in ends)
    out["offered_frames_per_s"] = spec.rate if spec.mode != "throughput" else None
    if "elapsed_s" in out:
        out["frames_per_s"] = spec.frames / out["elapsed_s"]
    return out


def _latencies(
    out: dict[str, Any],
    buf: bytearray,
    chunk_ends: Sequence[int],
    chunk_times: Sequence[float],
    spec: ClientSpec,
    measured_from: float,
) -> None:
    try:
        stats = latency_stats(
            buf, spec.record_bytes, spec.frames, chunk_ends, chunk_times, measured_from
        )
    except ClientError:
        raise ClientError(f"no frame due after the {spec.warmup_s} s warm-up") from None
    out.update(stats)


def latency_stats(
    buf: bytearray,
    record_bytes: int,
    n: int,
    chunk_ends: Sequence[int],
    chunk_times: Sequence[float],
    measured_from: float,
) -> dict[str, Any]:
    """Latency of the first `n` records in `buf`, received as the log `chunk_ends` /
    `chunk_times` says: receipt time − the timestamp each echoes, for the records stamped
    at `measured_from` or later.

    **Returns:** `measured_frames`, `latency_ms` and `server_latency_ms` (the daemon's own
    `latency_ns`; `percentiles`, in ms), `cdf_ms` (`cdf` of the client latency, in ms).

    **Raises:** `ClientError` when no record was stamped at `measured_from` or later.
    """
    fields = parse_records(buf, record_bytes, n)
    received = receipt_times(chunk_ends, chunk_times, record_bytes, n)
    measured = fields["timestamp"] >= measured_from
    if not measured.any():
        raise ClientError("no frame due after the warm-up")
    latency = (received - fields["timestamp"])[measured]
    return {
        "measured_frames": int(measured.sum()),
        "latency_ms": percentiles(latency, scale=1e3),
        "server_latency_ms": percentiles(fields["latency_ns"][measured], scale=1e-6),
        "cdf_ms": cdf(latency, scale=1e3),
    }


def run_spec_main(
    argv: Sequence[str] | None, spec: Callable[..., Any], run: Callable[[Any], Any], name: str
) -> int:
    """A measurement process's `main`: build `spec` from the JSON file named by the one
    argument, `run` it, print the result as one JSON object (an error: one line, 1)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: main([SPEC.json])", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        raw = json.load(f)
    raw["dims"] = tuple(raw["dims"])
    sys.setswitchinterval(0.0005)  # the receiver must not wait 5 ms for the GIL
    try:
        result = run(spec(**raw))
    except (ClientError, OSError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `ClientSpec` saved as JSON in the one argument; print the result as JSON."""
    return run_spec_main(argv, ClientSpec, run_client, "client")
