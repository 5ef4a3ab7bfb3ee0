"""The fleet load generator: many sensors, each at its own low rate, in its own process.

`main([SPEC.json])` runs one measurement described by a `FleetSpec` saved as JSON and
prints the result as one JSON object; `stream.bench.services.launch_client` starts it in
a fresh process (`argv=FLEET_ARGV`).

`sensors` streams at `rate_hz` frames/s each, over `connections` sockets (TCP, or UDP
with one datagram per frame); sensor `s` sends on socket `s · connections // sensors`.
With `spread`, sensor `s`'s frames are due at `t0 + (k + s / sensors) / rate_hz`, one
frame per send: a fleet whose sensors are not synchronised. Without it every sensor's
`k`-th frame is due at `t0 + k / rate_hz` and each socket sends its sensors' frames of
a tick in one send (the shape of the synthetic feed and of `enactive-stream send`).

One thread sends, over non-blocking sockets, from a schedule computed up front: each
sensor's frame is encoded once (`FrameBlock`) and only its seq and its f64 timestamp are
rewritten before each send (`struct.pack_into`). Sends are paced by absolute due times
and stamped with their due time, not the time they went out: a late send carries the
wait for it (no coordinated omission). A TCP socket the kernel will not take more from
keeps the rest, in order, until it can. The main thread receives every moment (`SUB
binary *`, `stream.bench.client`'s subscription and receive log); latency = the end of
the `recv` that completed a record − the timestamp it echoes. Frames due in the first
`warmup_s` are sent and received like the rest and left out of the statistics, and the
daemon's figures (with `daemon_pid`) are taken over the same window
(`stream.bench.probe.RunProbe`).

UDP: a datagram the kernel refuses (`EAGAIN`) is counted as not sent; the receipt ends
`drain_s` after the last moment once everything is sent, and the frames whose moments
never came are counted as lost. Over either transport the receipt also ends once no
moment came for `SETTLE_S` and the daemon has finished with every frame sent (processed,
rejected or dropped): moments it could not deliver (its subscriber buffer full) are then
counted as `lost` too, and the daemon's own counts say why (`daemon`); or once no moment
came for `STALL_S`, the daemon's queues are empty and it has still not received every
frame sent: it stopped reading some connections, and those frames are `unread`.
"""

from __future__ import annotations

import array
import dataclasses
import math
import resource
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from stream.protocol import Dims

from .client import ClientError, _receive_all, latency_stats, run_spec_main, subscribe
from .probe import RunProbe, accounted, daemon_delta, queue_depths
from .stats import percentiles
from .wire import FRAME_SEQ_OFFSET, FRAME_TIMESTAMP_OFFSET, FrameBlock, stream_ids

__all__ = ["FleetSpec", "main", "raise_nofile_limit", "run_fleet"]

SETTLE_S = 1.0
"""Seconds without a moment, everything sent, before the client asks whether the daemon
has finished with every frame (then the moments still missing will not come)."""
STALL_S = 10.0
"""Seconds without a moment, everything sent, the daemon's queues empty and frames sent
still not received by it: the daemon stopped reading some connections. The run ends
there and reports them (`unread`)."""
_SEQ_STAMP = struct.Struct("<Qd")
assert FRAME_TIMESTAMP_OFFSET == FRAME_SEQ_OFFSET + 8  # one pack writes both


def raise_nofile_limit(need: int = 0) -> int:
    """Raise this process's soft `RLIMIT_NOFILE` to its hard limit (children inherit it).

    **Returns:** the soft limit now. **Raises:** `ClientError` when it is below `need`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < need:
        raise ClientError(
            f"{need} file descriptors needed, RLIMIT_NOFILE allows {soft} (ulimit -n)"
        )
    return soft


@dataclasses.dataclass(frozen=True, slots=True)
class FleetSpec:
    """One fleet run.

    - `transport`: `"tcp"` or `"udp"`.
    - `ingest_port`: the daemon's TCP or UDP ingest port; `output_port`: its subscriber
        port; `metrics_port`: its HTTP port.
    - `sensors`: streams, ids `stream_ids(sensors, prefix)`; `connections`: sockets,
        1..`sensors`.
    - `rate_hz`: frames/s of each sensor; `duration_s`: the measured seconds;
        `warmup_s`: seconds before them, sent at the same rate and left out.
    - `spread`: phases spread over the period, one frame per send (see the module).
    - `dims`, `record_bytes`: the modality sizes, the size of one moment record.
    - `first_seq`: seq of every sensor's first frame (frames carry `first_seq + k`).
    - `daemon_pid`: the daemon's process (0: no daemon figures).
    - `drain_s`: UDP: how long to wait for more moments once everything is sent.
    - `timeout_s`: the longest wait for the next moment byte.
    """

    transport: str
    ingest_port: int
    output_port: int
    metrics_port: int
    sensors: int = 1000
    connections: int = 1000
    rate_hz: float = 25.0
    duration_s: float = 10.0
    warmup_s: float = 1.0
    spread: bool = True
    dims: tuple[int, int, int, int] = (32, 64, 32, 32)
    record_bytes: int = 0
    first_seq: int = 1
    daemon_pid: int = 0
    prefix: str = "f-"
    seed: int = 0
    host: str = "127.0.0.1"
    drain_s: float = 0.5
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "udp"):
            raise ValueError(f"transport = {self.transport!r}, expected tcp or udp")
        if self.sensors < 1 or not 1 <= self.connections <= self.sensors:
            raise ValueError(
                f"sensors = {self.sensors}, connections = {self.connections}: "
                "need 1 <= connections <= sensors"
            )
        if not (self.rate_hz > 0 and self.duration_s > 0 and self.warmup_s >= 0):
            raise ValueError("need rate_hz > 0, duration_s > 0, warmup_s >= 0")
        if self.record_bytes <= 0 or self.first_seq < 1:
            raise ValueError(f"record_bytes = {self.record_bytes}, first_seq = {self.first_seq}")

    @property
    def mode(self) -> str:
        """For messages: `fleet-tcp` or `fleet-udp`."""
        return f"fleet-{self.transport}"

    @property
    def rounds(self) -> int:
        """Frames per sensor: the warm-up and the measured seconds at `rate_hz`."""
        return math.ceil((self.warmup_s + self.duration_s) * self.rate_hz)

    @property
    def frames(self) -> int:
        """Frames this run sends."""
        return self.sensors * self.rounds


@dataclasses.dataclass(slots=True)
class _Group:
    """Frames sent together: one sensor (spread), or one socket's sensors (aligned)."""

    sock: int
    offset: float  # seconds after the start of each period
    data: bytearray  # the group's rows, back to back
    rows: int
    datagrams: list[memoryview]  # UDP: one view per row


def _groups(spec: FleetSpec) -> list[_Group]:
    ids = stream_ids(spec.sensors, spec.prefix)
    block = FrameBlock(ids, 1, Dims(*spec.dims), first_seq=spec.first_seq, seed=spec.seed)
    size = block.frame_size
    raw = block.data
    owner = [s * spec.connections // spec.sensors for s in range(spec.sensors)]
    period = 1.0 / spec.rate_hz
    spans: list[tuple[int, int, int, float]] = []  # (sock, first row, end row, offset)
    if spec.spread:
        spans = [(owner[s], s, s + 1, period * s / spec.sensors) for s in range(spec.sensors)]
    else:
        for c in range(spec.connections):
            rows = [s for s in range(spec.sensors) if owner[s] == c]
            spans.append((c, rows[0], rows[-1] + 1, 0.0))
    groups = []
    for sock, lo, hi, offset in spans:
        data = bytearray(raw[lo:hi].tobytes())
        view = memoryview(data)
        datagrams = [view[r * size : (r + 1) * size] for r in range(hi - lo)]
        groups.append(_Group(sock, offset, data, hi - lo, datagrams))
    return groups


def _connect(spec: FleetSpec) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(spec.connections):
            if spec.transport == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.connect((spec.host, spec.ingest_port))
            else:
                s = socket.create_connection((spec.host, spec.ingest_port), timeout=spec.timeout_s)
                socks.append(s)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


class _Sender:
    """Sends the schedule (see the module); `run(t0)` in a thread of its own."""

    def __init__(self, spec: FleetSpec, groups: list[_Group], socks: list[socket.socket]) -> None:
        self.spec, self.groups, self.socks = spec, groups, socks
        self.frame_size = len(groups[0].datagrams[0])
        self.lags = array.array("d")  # per send: start − due, seconds
        self.sent = 0
        self.refused = 0  # UDP datagrams the kernel would not take
        self.end = 0.0
        self.cpu_s = 0.0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._pending: dict[int, bytearray] = {}
        self._selector = selectors.DefaultSelector()

    def run(self, t0: float) -> None:
        c0 = time.thread_time()
        try:
            self._schedule(t0)
            self._flush_all()
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            self.end = time.perf_counter()
            self.cpu_s = time.thread_time() - c0
            self._selector.close()
            self.done.set()

    def _schedule(self, t0: float) -> None:
        spec, groups = self.spec, self.groups
        period, size = 1.0 / spec.rate_hz, self.frame_size
        pack, clock, sleep, lags = _SEQ_STAMP.pack_into, time.perf_counter, time.sleep, self.lags
        udp = spec.transport == "udp"
        socks = self.socks
        for k in range(spec.rounds):
            seq, base = spec.first_seq + k, t0 + k * period
            for g in groups:
                due = base + g.offset
                now = clock()
                if due > now:
                    if self._pending:
                        self._wait_writable(due - now)
                    else:
                        sleep(due - now)
                    now = clock()
                lags.append(now - due)
                data = g.data
                for r in range(g.rows):
                    pack(data, r * size + FRAME_SEQ_OFFSET, seq, due)
                if udp:
                    self._send_datagrams(socks[g.sock], g.datagrams)
                else:
                    self._send_tcp(g.sock, data)

    def _send_datagrams(self, sock: socket.socket, datagrams: list[memoryview]) -> None:
        for d in datagrams:
            try:
                sock.send(d)
                self.sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                self.refused += 1

    def _send_tcp(self, i: int, data: bytearray) -> None:
        rows = len(data) // self.frame_size
        pending = self._pending.get(i)
        if pending is not None:
            pending += data
            self.sent += rows
            return
        try:
            n = self.socks[i].send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            raise ClientError(
                f"connection {i} failed ({e}): did the daemon refuse it "
                "(ingest.max_connections, max_connections_per_address)?"
            ) from None
        self.sent += rows
        if n < len(data):
            self._pending[i] = bytearray(data[n:])
            self._selector.register(self.socks[i], selectors.EVENT_WRITE, i)

    def _wait_writable(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            i = key.data
            buf = self._pending[i]
            try:
                n = self.socks[i].send(buf)
            except BlockingIOError:
                continue
            except OSError as e:
                raise ClientError(f"connection {i} failed ({e})") from None
            del buf[:n]
            if not buf:
                del self._pending[i]
                self._selector.unregister(self.socks[i])

    def _flush_all(self) -> None:
        deadline = time.monotonic() + self.spec.timeout_s
        while self._pending:
            if time.monotonic() > deadline:
                raise ClientError(
                    f"{len(self._pending)} connections could not send for {self.spec.timeout_s} s"
                )
            self._wait_writable(0.05)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _daemon_view(probe: RunProbe | None) -> str:
    """What the daemon says it did since the run began (for an error message)."""
    if probe is None or probe.first is None:
        return ""
    try:
        last = probe.snapshot()
    except OSError as e:
        return f"; the daemon's /metrics: {e}"
    d = daemon_delta(probe.first, last)
    depths = queue_depths(last)
    return (
        f"; the daemon since: received {sum(d['received'].values()):.0f}, processed "
        f"{d['processed']:.0f}, rejected {d['rejected_by_reason'] or 0}, dropped "
        f"{d['dropped']:.0f}, moments dropped {d['moments_dropped_by_reason'] or 0}; "
        f"queue depths now {depths}"
    )


def run_fleet(spec: FleetSpec) -> dict[str, Any]:
    """Run one fleet measurement (blocking; call it in its own process).

    **Returns:** a JSON-ready dict: `transport`, `sensors`, `connections`, `rate_hz`,
    `spread`, `offered_frames_per_s`, `frames` (scheduled), `sent`, `refused` (UDP
    datagrams the kernel would not take), `moments` (received), `lost` (sent − moments),
    `unread` (frames the daemon never read, see the module), `measured_frames`, `send_s`
    (t0 → last send), `send_lag_ms` (`percentiles` of how
    late each send started), `latency_ms`, `server_latency_ms`, `cdf_ms` (client latency;
    see `stream.bench.client.latency_stats`), `elapsed_s` (t0 → last moment),
    `client_cpu_s` (this process from t0 to the last moment), `sender_cpu_s`,
    `receiver_cpu_s` (the two threads), and with `daemon_pid` `daemon` (`{"run": …,
    "measured": …}`, `stream.bench.probe.daemon_delta`).

    **Raises:** `ClientError` when moments are missing or malformed or a connection
    fails; `OSError` when the daemon is unreachable.
    """
    raise_nofile_limit(spec.connections + 64)
    groups = _groups(spec)
    buf = bytearray(spec.frames * spec.record_bytes)
    sub = subscribe(spec.host, spec.output_port, spec.metrics_port, spec.timeout_s)
    socks: list[socket.socket] = []
    try:
        socks = _connect(spec)
        sender = _Sender(spec, groups, socks)
        probe = None
        if spec.daemon_pid > 0:
            probe = RunProbe(spec.host, spec.metrics_port, spec.daemon_pid)
            probe.begin()
        t0 = time.perf_counter() + 0.01
        thread = threading.Thread(target=sender.run, args=(t0,), daemon=True)
        cpu0 = _cpu_s()
        thread.start()
        if probe is not None and spec.warmup_s > 0:
            probe.start_warm(t0 + spec.warmup_s)
        record = spec.record_bytes
        checked = [0.0]
        stalled: list[float] = []

        def until(got: int, idle: float) -> bool:
            if sender.error is not None:
                return True
            if not sender.done.is_set():
                return False
            if got >= sender.sent * record or (spec.transport == "udp" and idle >= spec.drain_s):
                return True
            # Moments missing: once the daemon has finished with every frame sent (a
            # subscriber's dropped moments are its own count), no more will come.
            now = time.perf_counter()
            if probe is None or probe.first is None or idle < SETTLE_S or now - checked[0] < 1:
                return False
            checked[0] = now
            snap = probe.snapshot()
            if accounted(probe.first, snap) >= sender.sent:
                return True
            # Or it stopped reading: frames sent, none in its pipeline, no moment for long.
            if idle >= STALL_S and not any(queue_depths(snap).values()):
                stalled.append(
                    sender.sent - sum(daemon_delta(probe.first, snap)["received"].values())
                )
                return True
            return False

        r0 = time.thread_time()
        try:
            ends, times = _receive_all(sub, buf, spec.timeout_s, until)
        except ClientError as e:
            raise ClientError(f"{e}; sent {sender.sent}{_daemon_view(probe)}") from None
        receiver_cpu = time.thread_time() - r0
        thread.join()
        if sender.error is not None:
            raise sender.error
        daemon = probe.finish() if probe is not None else None
        cpu = _cpu_s() - cpu0
    finally:
        for s in socks:
            s.close()
        sub.close()
    got = ends[-1] if ends else 0
    moments = got // record
    out: dict[str, Any] = {
        "transport": spec.transport,
        "sensors": spec.sensors,
        "connections": spec.connections,
        "rate_hz": spec.rate_hz,
        "spread": spec.spread,
        "offered_frames_per_s": spec.sensors * spec.rate_hz,
        "frames": spec.frames,
        "sent": sender.sent,
        "refused": sender.refused,
        "moments": moments,
        "lost": sender.sent - moments,
        "send_s": sender.end - t0,
        "send_lag_ms": percentiles(sender.lags, scale=1e3),
        "elapsed_s": (times[-1] if times else sender.end) - t0,
        "client_cpu_s": cpu,
        "sender_cpu_s": sender.cpu_s,
        "receiver_cpu_s": receiver_cpu,
        "unread": stalled[0] if stalled else 0,
    }
    if moments:
        out.update(latency_stats(buf, record, moments, ends, times, t0 + spec.warmup_s))
    if daemon is not None:
        out["daemon"] = daemon
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `FleetSpec` saved as JSON in the one argument; print the result as JSON."""
    return run_spec_main(argv, FleetSpec, run_fleet, "fleet")
