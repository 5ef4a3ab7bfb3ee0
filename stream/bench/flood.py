"""A flood of distinct stream ids beside a latency-checked control stream, in a real daemon.

`python -m stream.bench.flood [--ids N] [--rate-hz R] [--json OUT]` starts a daemon
(`python -m stream.cli run --config …`: synthetic feed off, ports chosen by the kernel, a
ready file), then, each in a process of its own:

- a **control** client that sends one stream (`control-0`) at 100 Hz over TCP for the
    whole run, its send time (`time.monotonic()`: CLOCK_MONOTONIC is shared by the
    processes of one host) in each frame's timestamp, and subscribes to its own moments
    (`SUB binary control-0`): latency = the moment's receipt time − that timestamp;
- a **flooder** that sends `N` distinct stream ids (`f-0000000`, …), one frame each
    (seq 1), as UDP datagrams as fast as it can, or at `R` frames/s.

Phases, by the control frames' send times:

```
baseline   control alone for `baseline_s`                        (RSS, known streams)
flood      the flooder's datagrams, then until the daemon has     (RSS, known streams)
           accounted for every one of them (rejected, dropped or processed)
after      control alone for `after_s`
probe      one frame of a brand-new stream over TCP with the REPLY flag: admitted (its
           moment arrives) or rejected (`too_many_streams`), retried while a full table
           may still make room from idle streams (`state.reclaim_idle_s`)
```

Reported: control latency p50/p99/max and frames lost per phase; the daemon's RSS
(`VmRSS`) before and after the flood, its peak (`VmHWM`), `enactive_known_streams` before
and after, bytes of RSS per known stream (ΔRSS / Δknown); the daemon's process CPU
seconds per phase (`/proc/<pid>/stat`), the flooder's and the control client's own; frames
received, rejected and dropped by reason (`/metrics`); and the probe's fate.
`run_flood(FloodSettings(…), workdir)` is the same run as a function (the e2e test uses
it with small numbers). Figures: docs/operations.md, "Limits and guarantees".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from stream.protocol import Dims, MomentReader, ReplyReader, encode_frame

from .procfs import cpu_seconds
from .services import BenchError, ServiceProcess, peak_rss_bytes
from .stats import percentiles
from .wire import FrameBlock

__all__ = [
    "CONTROL_ID",
    "SMALL_MODEL",
    "FloodSettings",
    "format_table",
    "main",
    "probe_new_stream",
    "role_main",
    "run_flood",
]

SMALL_MODEL: Mapping[str, Any] = {
    "state_dim": 8,
    "proprio_dim": 6,
    "tactile_dim": 4,
    "motor_dim": 3,
    "retention_depth": 3,
    "protention_horizon": 2,
    "hidden_dim": 8,
    "som_grid": (3, 3),
    "attention_heads": 2,
}
"""The small model of the e2e tests (`tests/e2e/daemon.py`'s `MODEL`): quick to compile."""
SMALL_DIMS = Dims(8, 6, 4, 3)
"""The small model's modality sizes."""
CONTROL_ID = "control-0"
"""The control stream's id (the flood's ids start with `f-`, the probes' with `probe-`)."""
FLOOD_PREFIX, PROBE_PREFIX = "f-", "probe-"
ROLE_ARGV = (
    sys.executable,
    "-c",
    "import sys; from stream.bench.flood import role_main; sys.exit(role_main(sys.argv[1:]))",
)
"""How the control and flooder processes start (`-m stream.bench.flood` would run this
module as `__main__` next to its imported copy)."""
POLL_S = 0.05
"""How often the orchestrator polls `/metrics` while it waits for a state."""
CHUNK = 65536
"""Flood frames pre-encoded per `FrameBlock`."""


@dataclasses.dataclass(frozen=True)
class FloodSettings:
    """One flood run.

    - `ids`: distinct stream ids the flooder sends, one frame each; `rate_hz`: its
        frames/s (0: as fast as it can).
    - `control_hz`: the control stream's rate; `baseline_s`, `after_s`: seconds of control
        alone before and after the flood.
    - `max_known`: `state.max_known_streams`; `reclaim_idle_s`: `state.reclaim_idle_s`;
        `max_streams`: `state.max_streams`, the device slab (None: the daemon's default,
        or `max_known` where that is smaller); `checkpoint_interval_s`: as configured
        (None: the daemon's default).
    - `model`: `"small"` (`SMALL_MODEL`) or `"default"` (the daemon's own sizes);
        `buckets`, `max_wait_ms`: `[batching]` (None: the daemon's defaults).
    - `cache_dir`: the JAX compilation cache ("": the user's, as the daemon finds it).
    - `probe_wait_s`: how long the probe keeps trying a new stream after a
        `too_many_streams` rejection, when `reclaim_idle_s` is at most this (0: one try).
    - `settle_timeout_s`: the longest the daemon may take to account for the flood;
        `drain_s`: the longest the control client waits for its last moments.
    """

    ids: int = 1_000_000
    rate_hz: float = 0.0
    control_hz: float = 100.0
    baseline_s: float = 5.0
    after_s: float = 5.0
    max_known: int = 65536
    reclaim_idle_s: float = 300.0
    max_streams: int | None = None
    checkpoint_interval_s: float | None = None
    model: str = "small"
    buckets: tuple[int, ...] | None = None
    max_wait_ms: float | None = None
    cache_dir: str = ""
    probe_wait_s: float = 30.0
    settle_timeout_s: float = 300.0
    drain_s: float = 30.0

    @property
    def dims(self) -> Dims:
        """The daemon's modality sizes."""
        if self.model == "small":
            return SMALL_DIMS
        from stream.config import ModelConfig  # imports JAX: not in the child processes

        m = ModelConfig()
        return Dims(m.state_dim, m.proprio_dim, m.tactile_dim, m.motor_dim)


def _toml(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def daemon_toml(settings: FloodSettings, state_dir: Path) -> str:
    """The daemon's configuration for a flood run: loopback ports chosen by the kernel,
    no synthetic feed, no status line, state in `state_dir`, the stream table's sizes
    and the model of `settings`."""
    from stream.config import StateConfig  # imports JAX: not in the child processes

    state = [f"dir = {_toml(str(state_dir))}", f"max_known_streams = {settings.max_known}"]
    state.append(f"reclaim_idle_s = {settings.reclaim_idle_s}")
    max_streams = settings.max_streams
    if max_streams is None and settings.max_known < StateConfig().max_streams:
        max_streams = settings.max_known
    if max_streams is not None:
        state.append(f"max_streams = {max_streams}")
    if settings.checkpoint_interval_s is not None:
        state.append(f"checkpoint_interval_s = {settings.checkpoint_interval_s}")
    batching = ["serve_while_compiling = false"]  # measured from ready: all compiled
    if settings.buckets is not None:
        batching.append(f"buckets = {_toml(settings.buckets)}")
    if settings.max_wait_ms is not None:
        batching.append(f"max_wait_ms = {settings.max_wait_ms}")
    if settings.model not in ("small", "default"):
        raise ValueError(f"model = {settings.model!r}, expected 'small' or 'default'")
    model = "".join(f"{k} = {_toml(v)}\n" for k, v in SMALL_MODEL.items())
    text = (
        '[ingest]\ntcp = "127.0.0.1:0"\nudp = "127.0.0.1:0"\n'
        '[output]\ntcp = "127.0.0.1:0"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'
        "[synthetic]\nstreams = 0\n"
        "[log]\nstatus_interval_s = 0\n"
        "[state]\n" + "".join(line + "\n" for line in state)
    )
    text += "[batching]\n" + "".join(line + "\n" for line in batching)
    if settings.model == "small":
        text += f"[model]\n{model}"
    if settings.cache_dir:
        text += f"[device]\ncompilation_cache_dir = {_toml(settings.cache_dir)}\n"
    return text


# --- the daemon's side, read by the orchestrator ---------------------------------------


def udp_kernel_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the UDP socket bound to `port` (its receive buffer
    was full): the `drops` column of `/proc/net/udp`, None when no socket has that port."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[-1])
    return None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The daemon at one moment: its counters, gauges, RSS and CPU time."""

    at: float
    rss: int
    cpu_s: float
    kernel_drops: int | None
    received: dict[str, float]
    rejected: dict[str, float]  # "source/reason" -> count (every series)
    dropped: dict[str, float]
    processed: float
    known: float
    active: float
    expirations: float
    evictions: float
    checkpoints: float
    batches: float
    stage_sum: dict[str, float]  # stage -> seconds (enactive_stage_latency_seconds)
    stage_count: dict[str, float]

    @classmethod
    def take(cls, daemon: ServiceProcess) -> Snapshot:
        """Read `/metrics`, RSS and CPU of `daemon` now."""
        samples = daemon.samples()
        at, rss, cpu = time.monotonic(), daemon.rss(), cpu_seconds(daemon.pid)

        def total(name: str) -> float:
            return sum(v for n, _, v in samples if n == name)

        def by(name: str, *labels: str) -> dict[str, float]:
            out: dict[str, float] = {}
            for n, ls, v in samples:
                if n == name:
                    key = "/".join(ls.get(label, "") for label in labels)
                    out[key] = out.get(key, 0.0) + v
            return out

        return cls(
            at=at,
            rss=rss,
            cpu_s=cpu,
            kernel_drops=udp_kernel_drops(daemon.ports["udp"]),
            received=by("enactive_frames_received_total", "source"),
            rejected=by("enactive_frames_rejected_total", "source", "reason"),
            dropped=by("enactive_frames_dropped_total", "reason"),
            processed=total("enactive_frames_processed_total"),
            known=total("enactive_known_streams"),
            active=total("enactive_active_streams"),
            expirations=total("enactive_state_expirations_total"),
            evictions=total("enactive_state_evictions_total"),
            checkpoints=total("enactive_state_checkpoints_total"),
            batches=total("enactive_batches_total"),
            stage_sum=by("enactive_stage_latency_seconds_sum", "stage"),
            stage_count=by("enactive_stage_latency_seconds_count", "stage"),
        )


def _diff(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, int]:
    """The non-zero differences of two label → count maps."""
    keys = sorted(set(after) | set(before))
    out = {k: int(after.get(k, 0.0) - before.get(k, 0.0)) for k in keys}
    return {k: v for k, v in out.items() if v}


def _flood_accounting(now: Snapshot, before: Snapshot) -> dict[str, int]:
    """What became of the flood's datagrams between two snapshots: received on UDP,
    rejected by reason, dropped, admitted (the rest), and processed: Δprocessed −
    Δ(TCP frames received), the control stream being the only TCP sender and its frames
    all admitted — exact within the one control frame that may be in flight at either
    snapshot."""
    received = int(now.received.get("udp", 0.0) - before.received.get("udp", 0.0))
    rejected = {
        key.split("/", 1)[1]: n
        for key, n in _diff(now.rejected, before.rejected).items()
        if key.startswith("udp/")
    }
    dropped = int(sum(now.dropped.values()) - sum(before.dropped.values()))
    tcp = now.received.get("tcp", 0.0) - before.received.get("tcp", 0.0)
    return {
        "received": received,
        "rejected": sum(rejected.values()),
        "dropped": dropped,
        "admitted": received - sum(rejected.values()) - dropped,
        "processed": int(now.processed - before.processed - tcp),
    }


# --- the child processes ----------------------------------------------------------------


class _Child:
    """A control or flooder process: a JSON spec in, lines on stdout (`ready`), a line on
    stdin to go on (`go`, `stop`), a JSON result in `out`."""

    def __init__(self, role: str, spec: Mapping[str, Any], workdir: Path) -> None:
        self.role = role
        spec_path = workdir / f"{role}-spec.json"
        spec_path.write_text(json.dumps(spec))
        self.out = workdir / f"{role}-out.json"
        self.out.unlink(missing_ok=True)
        self.err_path = workdir / f"{role}.log"
        self._err = self.err_path.open("wb")
        self.proc = subprocess.Popen(
            [*ROLE_ARGV, role, str(spec_path), str(self.out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
        )

    def expect(self, line: str, timeout: float) -> None:
        """Wait for `line` on the child's stdout; `BenchError` if it exits or is late."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                got = self.proc.stdout.readline().decode().strip()
                if got == line:
                    return
                if not got:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"{self.role}: no {line!r} in {timeout} s:\n{self.log()}")
        self.proc.wait(5)
        raise BenchError(f"{self.role} exited {self.proc.returncode}:\n{self.log()}")

    def tell(self, line: str, *, close: bool = False) -> None:
        """Write one line to the child's stdin (and close it)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        if close:
            self.proc.stdin.close()

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the child to exit and read its result."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.role} did not finish in {timeout} s:\n{self.log()}") from None
        self._close()
        if rc != 0:
            raise BenchError(f"{self.role} exited {rc}:\n{self.log()}")
        out: dict[str, Any] = json.loads(self.out.read_text())
        return out

    def log(self) -> str:
        """The end of the child's stderr."""
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """Kill the child if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:  # the child is gone; nothing was waiting to go
                    pass
        self._err.close()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stdin_line(timeout: float) -> str | None:
    """One line from stdin if one is there within `timeout` s ("" at EOF; None: none)."""
    ready, _, _ = select.select([sys.stdin], [], [], max(timeout, 0.0))
    if not ready:
        return None
    return sys.stdin.readline().strip() or ""


def _wait_subscribed(metrics_port: int, at_least: int, timeout: float) -> None:
    """Poll `/metrics` until `enactive_subscribers` is at least `at_least`."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("enactive_subscribers ") and float(line.split()[1]) >= at_least:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"subscriber not registered within {timeout} s")
        time.sleep(POLL_S)


def _payload(dims: Dims) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        name: rng.standard_normal(size).astype(np.float32)
        for name, size in zip(("sensory", "proprio", "tactile", "motor"), dims, strict=True)
    }


def run_control(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The control client (its own process): subscribe to `CONTROL_ID`'s moments, say
    `ready`, send it at `spec["hz"]` over TCP until `stop` (or EOF) on stdin, then wait
    up to `spec["drain_s"]` for the moments still due.

    **Returns:** `{"seq", "sent", "received"}` (lists by seq; `received` is None for a
    frame whose moment never came), `"rejected"` (the daemon's replies, by reason),
    `"send_lag_max_s"` (how late the latest send was against its schedule),
    `"cpu_s"` (this process's CPU seconds while it ran).
    """
    dims = Dims(*spec["dims"])
    period = 1.0 / float(spec["hz"])
    sub = socket.create_connection(("127.0.0.1", spec["output_port"]), timeout=10)
    sub.sendall(f"SUB binary {CONTROL_ID}\n".encode())
    _wait_subscribed(spec["metrics_port"], 1, 30.0)
    ingest = socket.create_connection(("127.0.0.1", spec["tcp_port"]), timeout=10)
    ingest.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = bytearray(encode_frame(CONTROL_ID, 1, 0.0, reply=True, start=True, **_payload(dims)))
    later_flags = struct.unpack_from("<H", encode_frame(CONTROL_ID, 1, 0.0, reply=True), 10)[0]
    moments, replies = MomentReader(), ReplyReader()
    sent: list[float] = []
    received: dict[int, float] = {}
    rejected: dict[str, int] = {}
    lag_max = 0.0
    cpu0 = time.process_time()
    _say("ready")

    def read(sock: socket.socket) -> None:
        data = sock.recv(1 << 16)
        now = time.monotonic()
        if not data:
            raise BenchError("the daemon closed the control client's connection")
        if sock is sub:
            for moment in moments.feed(data):
                received.setdefault(moment.seq, now)
        else:
            for reply in replies.feed(data):
                rejected[reply.reason] = rejected.get(reply.reason, 0) + 1

    stopping = False
    due = time.monotonic()
    stdin = sys.stdin.fileno()
    while not stopping:
        wait = max(due - time.monotonic(), 0.0)
        ready, _, _ = select.select([sub, ingest, stdin], [], [], wait)
        stopping = stdin in ready
        for sock in (sub, ingest):
            if sock in ready:
                read(sock)
        now = time.monotonic()
        if now >= due and not stopping:
            seq = len(sent) + 1
            struct.pack_into("<Qd", frame, 24, seq, now)
            ingest.sendall(frame)
            sent.append(now)
            if seq == 1:
                struct.pack_into("<H", frame, 10, later_flags)
            lag_max = max(lag_max, now - due)
            due += period
            if due <= now:  # behind (the host was busy): no burst to catch up
                due = now + period
    deadline = time.monotonic() + float(spec["drain_s"])
    while len(received) < len(sent) and time.monotonic() < deadline:
        ready, _, _ = select.select([sub, ingest], [], [], 0.1)
        for sock in (sub, ingest):
            if sock in ready:
                read(sock)
    cpu = time.process_time() - cpu0
    return {
        "seq": list(range(1, len(sent) + 1)),
        "sent": sent,
        "received": [received.get(seq) for seq in range(1, len(sent) + 1)],
        "rejected": rejected,
        "send_lag_max_s": lag_max,
        "cpu_s": cpu,
    }


def flood_ids(n: int, lo: int, hi: int) -> list[str]:
    """Ids `lo..hi-1` of a flood of `n`: `f-` and the index, zero-padded to one width."""
    width = max(len(str(n - 1)), 1)
    return [f"{FLOOD_PREFIX}{i:0{width}d}" for i in range(lo, hi)]


def run_flooder(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The flooder (its own process): pre-encode `spec["ids"]` frames, one per stream id,
    seq 1; say `ready`; at `go` on stdin send them as UDP datagrams to
    `spec["udp_port"]`, as fast as it can or at `spec["rate_hz"]` frames/s.

    **Returns:** `sent`, `errors` (sends the kernel refused), `send_s`, `cpu_s` (CPU
    seconds while sending), `build_cpu_s` (encoding them)."""
    n, dims, rate = int(spec["ids"]), Dims(*spec["dims"]), float(spec["rate_hz"])
    build0 = time.process_time()
    blocks = [
        FrameBlock(flood_ids(n, lo, min(lo + CHUNK, n)), 1, dims, seed=lo)
        for lo in range(0, n, CHUNK)
    ]
    build = time.process_time() - build0
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", spec["udp_port"]))
    _say("ready")
    if _stdin_line(3600.0) != "go":
        raise BenchError("flooder: expected 'go'")
    send = sock.send
    sent = errors = 0
    cpu0, t0 = time.process_time(), time.monotonic()
    for block in blocks:
        size, view = block.frame_size, block.bytes_view()
        rows = len(block)
        row = 0
        while row < rows:
            stop = rows
            if rate > 0:  # this many are due by now
                due = int((time.monotonic() - t0) * rate) - sent
                if due <= 0:
                    time.sleep(0.0005)
                    continue
                stop = min(rows, row + due)
            for i in range(row, stop):
                try:
                    send(view[i * size : (i + 1) * size])
                except OSError:  # ENOBUFS and the like: lost, like a dropped datagram
                    errors += 1
            sent += stop - row
            row = stop
    return {
        "sent": sent - errors,
        "errors": errors,
        "send_s": time.monotonic() - t0,
        "cpu_s": time.process_time() - cpu0,
        "build_cpu_s": build,
        "frame_bytes": blocks[0].frame_size if blocks else 0,
    }


def role_main(argv: Sequence[str]) -> int:
    """`ROLE_ARGV role spec.json out.json`: run the control client or the flooder."""
    role, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if role == "control":
        result = run_control(spec)
    elif role == "flooder":
        result = run_flooder(spec)
    else:
        raise SystemExit(f"unknown role {role!r}")
    Path(out_path).write_text(json.dumps(result))
    return 0


# --- the probe: is a brand-new stream still admitted? -----------------------------------


def probe_new_stream(
    daemon: ServiceProcess, dims: Dims, stream_id: str, subscriber: socket.socket
) -> tuple[str, float]:
    """Send one frame of a new stream over TCP with the REPLY flag, half-close, and read
    the replies until the daemon closes the connection; without a rejection, wait for its
    moment on `subscriber` (subscribed to the probes' ids).

    **Returns:** `("admitted", seconds to its moment)` or `(rejection reason, seconds)`.
    """
    t0 = time.monotonic()
    frame = encode_frame(stream_id, 1, t0, reply=True, start=True, **_payload(dims))
    with socket.create_connection(("127.0.0.1", daemon.ports["tcp"]), timeout=30) as sock:
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        replies, reader = [], ReplyReader()
        while data := sock.recv(1 << 16):
            replies += reader.feed(data)
    if replies:
        return replies[0].reason, time.monotonic() - t0
    moments, deadline = MomentReader(), t0 + 30.0
    while True:
        subscriber.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = subscriber.recv(1 << 16)
        except TimeoutError:
            raise BenchError(f"{stream_id} was not rejected, yet no moment came") from None
        if not data:
            raise BenchError("the probe's subscriber was closed")
        if any(m.stream_id == stream_id for m in moments.feed(data)):
            return "admitted", time.monotonic() - t0


def _probe(daemon: ServiceProcess, settings: FloodSettings) -> dict[str, Any]:
    """Probe new streams (no other subscriber left): once, and while the answer is
    `too_many_streams` and the table may still make room (`reclaim_idle_s` ≤
    `probe_wait_s`), again every 0.2 s."""
    daemon.wait_until(lambda: daemon.metric("enactive_subscribers") == 0, "no subscriber")
    with socket.create_connection(("127.0.0.1", daemon.ports["output"]), timeout=10) as sub:
        sub.sendall(f"SUB binary {PROBE_PREFIX}*\n".encode())
        _wait_subscribed(daemon.ports["metrics"], 1, 30.0)
        t0 = time.monotonic()
        first, first_s = probe_new_stream(daemon, settings.dims, f"{PROBE_PREFIX}0", sub)
        outcome, tries = first, 1
        wait = 0 < settings.reclaim_idle_s <= settings.probe_wait_s
        deadline = t0 + settings.reclaim_idle_s + 10.0
        while outcome == "too_many_streams" and wait and time.monotonic() < deadline:
            time.sleep(0.2)  # the pace of the retries, not a readiness check
            outcome, _ = probe_new_stream(daemon, settings.dims, f"{PROBE_PREFIX}{tries}", sub)
            tries += 1
    return {
        "first_try": first,
        "first_try_s": first_s,
        "admitted": outcome == "admitted",
        "outcome": outcome,
        "tries": tries,
        "waited_s": time.monotonic() - t0,
    }


# --- the run ------------------------------------------------------------------------------


def _phase_stats(control: Mapping[str, Any], lo: float, hi: float) -> dict[str, Any]:
    """Latency (ms) and losses of the control frames sent in `[lo, hi)`."""
    sent = np.asarray(control["sent"], np.float64)
    got = np.asarray([np.nan if r is None else r for r in control["received"]], np.float64)
    mask = (sent >= lo) & (sent < hi)
    latency = (got - sent)[mask]
    arrived = latency[~np.isnan(latency)]
    out: dict[str, Any] = {"sent": int(mask.sum()), "lost": int(np.isnan(latency).sum())}
    if arrived.size:
        p = percentiles(arrived, (50.0, 99.0), scale=1e3)
        out.update(p50_ms=p["p50"], p99_ms=p["p99"], max_ms=p["max"])
    return out


def _latency_series(control: Mapping[str, Any], t0: float, step: float = 0.5) -> list[Any]:
    """`[seconds since t0, p50 ms, max ms, frames]` of the control frames sent in each
    `step` s (frames still without a moment left out)."""
    sent = np.asarray(control["sent"], np.float64)
    got = np.asarray([np.nan if r is None else r for r in control["received"]], np.float64)
    latency, at = (got - sent) * 1e3, sent - t0
    out = []
    for lo in np.arange(np.floor(at.min() / step) * step, at.max() + step, step):
        x = latency[(at >= lo) & (at < lo + step)]
        x = x[~np.isnan(x)]
        if x.size:
            out.append([round(float(lo), 3), float(np.median(x)), float(x.max()), int(x.size)])
    return out


def _daemon(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """The daemon between two snapshots: CPU seconds, wall time, their ratio (cores),
    device batches and evictions per second, and the mean time a frame spent in each
    pipeline stage (`enactive_stage_latency_seconds`), in ms."""
    cpu, wall = b.cpu_s - a.cpu_s, b.at - a.at
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "cores": cpu / wall if wall > 0 else 0.0,
        "batches_per_s": (b.batches - a.batches) / wall if wall > 0 else 0.0,
        "evictions_per_s": (b.evictions - a.evictions) / wall if wall > 0 else 0.0,
        "stage_mean_ms": {
            stage: 1e3 * (b.stage_sum[stage] - a.stage_sum.get(stage, 0.0)) / n
            for stage, count in b.stage_count.items()
            if (n := count - a.stage_count.get(stage, 0.0)) > 0
        },
    }


def _settle(daemon: ServiceProcess, before: Snapshot, timeout: float) -> Snapshot:
    """Poll until the daemon has accounted for every datagram of the flood: none still
    arriving, each rejected, dropped or processed."""
    deadline = time.monotonic() + timeout
    last: tuple[float, ...] | None = None
    while True:
        now = Snapshot.take(daemon)
        flood = _flood_accounting(now, before)
        key = (flood["received"], flood["rejected"], flood["dropped"], now.known)
        if key == last and flood["processed"] >= flood["admitted"]:
            return now
        if time.monotonic() > deadline:
            raise BenchError(f"the flood was not accounted for in {timeout} s: {flood}")
        last = key
        time.sleep(POLL_S * 2)


def run_flood(
    settings: FloodSettings, workdir: Path, *, log: IO[str] | None = None
) -> dict[str, Any]:
    """Start a daemon, the control client and the flooder; run the phases; stop them.

    **Arguments:** `settings`, the run; `workdir`, where the configuration, state, logs
    and the children's results go; `log`, where progress lines go (None: nowhere).

    **Returns:** every figure, as `format_table` shows them (see the module docstring).

    **Raises:** `BenchError` when a process fails or a state is not reached in time.
    """

    def say(line: str) -> None:
        if log is not None:
            log.write(f"[flood] {line}\n")
            log.flush()

    workdir.mkdir(parents=True, exist_ok=True)
    config, ready, state = workdir / "daemon.toml", workdir / "ready.json", workdir / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh table: no stream known from before
    config.write_text(daemon_toml(settings, state))
    argv = [sys.executable, "-m", "stream.cli", "run", "--config", str(config)]
    daemon = ServiceProcess("daemon", [*argv, "--ready-file", str(ready)], ready, workdir)
    children: list[_Child] = []
    dims = list(settings.dims)
    load_before = os.getloadavg()
    try:
        start_s = daemon.start()
        say(f"daemon ready in {start_s:.1f} s: {daemon.ports}")
        flooder = _Child(
            "flooder",
            {"ids": settings.ids, "rate_hz": settings.rate_hz, "dims": dims,
             "udp_port": daemon.ports["udp"]},
            workdir,
        )  # fmt: skip
        children.append(flooder)
        flooder.expect("ready", timeout=600.0)
        say(f"flooder ready: {settings.ids:,} frames encoded")
        control = _Child(
            "control",
            {"hz": settings.control_hz, "dims": dims, "drain_s": settings.drain_s,
             "tcp_port": daemon.ports["tcp"], "output_port": daemon.ports["output"],
             "metrics_port": daemon.ports["metrics"]},
            workdir,
        )  # fmt: skip
        children.append(control)
        control.expect("ready", timeout=60.0)
        t_control = time.monotonic()
        daemon.wait_until(
            lambda: Snapshot.take(daemon).received.get("tcp", 0.0) >= 1, "first control frame"
        )
        base = Snapshot.take(daemon)
        say(f"baseline: control alone for {settings.baseline_s} s")
        time.sleep(settings.baseline_s)  # the phase's length, not a readiness check
        before = Snapshot.take(daemon)
        t_flood = before.at
        say(f"flood: {settings.ids:,} ids")
        flooder.tell("go", close=True)
        rss_series: list[tuple[float, int]] = []
        while flooder.proc.poll() is None:
            rss_series.append((time.monotonic() - t_flood, daemon.rss()))
            time.sleep(0.25)  # a sampling period
        flooded = flooder.result(60.0)
        t_flood_end = time.monotonic()
        say(f"flood sent in {flooded['send_s']:.1f} s; waiting for the daemon to account for it")
        settled = _settle(daemon, before, settings.settle_timeout_s)
        t_settled = settled.at
        say(f"settled {t_settled - t_flood_end:.1f} s after the last datagram")
        say(f"after: control alone for {settings.after_s} s")
        time.sleep(settings.after_s)  # the phase's length, not a readiness check
        end = Snapshot.take(daemon)
        control.tell("stop", close=True)
        controlled = control.result(settings.drain_s + 30.0)
        probe = _probe(daemon, settings)
        peak = peak_rss_bytes(daemon.pid)
        probed = Snapshot.take(daemon)
        t_stop = time.monotonic()
        daemon.stop(timeout=600.0)  # drains and writes the final checkpoint
        stop_s = time.monotonic() - t_stop
    finally:
        for child in children:
            child.kill()
        daemon.kill()
    known_delta = settled.known - before.known
    rss_delta = settled.rss - before.rss
    flood = _flood_accounting(settled, before)
    return {
        "settings": dataclasses.asdict(settings),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "daemon_start_s": start_s,
        "daemon_stop_s": stop_s,
        "control": {
            "baseline": _phase_stats(controlled, t_control, t_flood),
            "flood": _phase_stats(controlled, t_flood, t_settled),
            "after": _phase_stats(controlled, t_settled, end.at),
            "rejected": controlled["rejected"],
            "send_lag_max_ms": controlled["send_lag_max_s"] * 1e3,
            "series": _latency_series(controlled, t_flood),
            "cpu_s": controlled["cpu_s"],
        },
        "flood": {
            **flood,
            "sent": flooded["sent"],
            "send_errors": flooded["errors"],
            "send_s": flooded["send_s"],
            "send_rate_per_s": flooded["sent"] / max(flooded["send_s"], 1e-9),
            "settle_s": t_settled - t_flood_end,
            "frame_bytes": flooded["frame_bytes"],
            "rejected_by_reason": {
                k.split("/", 1)[1]: v
                for k, v in _diff(settled.rejected, before.rejected).items()
                if k.startswith("udp/")
            },
            "dropped_by_reason": _diff(settled.dropped, before.dropped),
            "kernel_drops": (
                settled.kernel_drops - before.kernel_drops
                if settled.kernel_drops is not None and before.kernel_drops is not None
                else None
            ),
            "uncounted": flooded["sent"] - flood["received"],
            "reclaimed": int(settled.expirations - before.expirations),
            "flooder_cpu_s": flooded["cpu_s"],
            "flooder_build_cpu_s": flooded["build_cpu_s"],
        },
        "memory": {
            "rss_before": before.rss,
            "rss_after": settled.rss,
            "rss_end": end.rss,
            "rss_peak": peak,
            "rss_series": rss_series,
            "known_before": int(before.known),
            "known_after": int(settled.known),
            "known_end": int(end.known),
            "active_after": int(settled.active),
            "bytes_per_known_stream": rss_delta / known_delta if known_delta > 0 else None,
        },
        "daemon": {
            "baseline": _daemon(base, before),
            "flood": _daemon(before, settled),
            "after": _daemon(settled, end),
        },
        "totals": {
            "received": _diff(probed.received, {}),
            "rejected": _diff(probed.rejected, {}),
            "dropped": _diff(probed.dropped, {}),
            "processed": int(probed.processed),
            "evictions": int(probed.evictions),
            "expirations": int(probed.expirations),
            "checkpoints": int(probed.checkpoints),
        },
        "probe": probe,
    }


# --- the report -------------------------------------------------------------------------


def _ms(stats: Mapping[str, Any], key: str) -> str:
    return f"{stats[key]:,.1f}" if key in stats else "-"


def format_table(result: Mapping[str, Any]) -> str:
    """The run's figures as a few small plain-text tables."""
    s, c, f, m = result["settings"], result["control"], result["flood"], result["memory"]
    rate = "as fast as it can" if not s["rate_hz"] else f"{s['rate_hz']:,.0f} frames/s"
    lines = [
        f"flood of {s['ids']:,} distinct ids over UDP ({rate}), control {CONTROL_ID} at "
        f"{s['control_hz']:g} Hz over TCP; model {s['model']}, max_known_streams "
        f"{s['max_known']:,}, reclaim_idle_s {s['reclaim_idle_s']:g}; host: "
        f"{result['host']['cpus']} CPUs, load average "
        f"{result['host']['loadavg_before'][0]:.1f} before, "
        f"{result['host']['loadavg_after'][0]:.1f} after",
        "",
        f"{'control':<10} {'sent':>6} {'lost':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"
        f" {'daemon CPU s':>13} {'cores':>6} {'batches/s':>10} {'evictions/s':>12}"
        f" {'queue ms':>9} {'device ms':>10}",
    ]
    for phase in ("baseline", "flood", "after"):
        p, cpu = c[phase], result["daemon"][phase]
        lines.append(
            f"{phase:<10} {p['sent']:>6,} {p['lost']:>5,} {_ms(p, 'p50_ms'):>9} "
            f"{_ms(p, 'p99_ms'):>9} {_ms(p, 'max_ms'):>9} {cpu['cpu_s']:>13.2f} "
            f"{cpu['cores']:>6.2f} {cpu['batches_per_s']:>10,.0f} {cpu['evictions_per_s']:>12,.0f}"
            f" {_ms(cpu['stage_mean_ms'], 'queue'):>9} {_ms(cpu['stage_mean_ms'], 'device'):>10}"
        )
    per = m["bytes_per_known_stream"]
    probe = result["probe"]
    lines += [
        "(queue, device ms: the daemon's mean per frame, flood frames too; a stream gets one "
        "frame into each batch)",
        "",
        f"flood: {f['sent']:,} sent in {f['send_s']:.2f} s ({f['send_rate_per_s']:,.0f}/s), "
        f"{f['received']:,} received, {f['admitted']:,} admitted, {f['processed']:,} "
        f"processed, {f['rejected']:,} rejected {f['rejected_by_reason'] or ''}, "
        f"{f['dropped']:,} dropped {f['dropped_by_reason'] or ''}, {f['reclaimed']:,} "
        f"idle streams reclaimed; accounted for {f['settle_s']:.2f} s after the last datagram",
        f"the kernel dropped {f['kernel_drops']} at the daemon's UDP socket "
        f"(/proc/net/udp); sent but never counted received: {f['uncounted']:,}",
        f"known streams {m['known_before']:,} -> {m['known_after']:,} "
        f"(on the device {m['active_after']:,}); RSS {m['rss_before'] / 2**20:,.1f} -> "
        f"{m['rss_after'] / 2**20:,.1f} MiB (peak {m['rss_peak'] / 2**20:,.1f}, end "
        f"{m['rss_end'] / 2**20:,.1f}): "
        + (f"{per:,.0f} bytes per known stream" if per is not None else "no new known stream"),
        f"CPU s: flooder {f['flooder_cpu_s']:.2f} (+{f['flooder_build_cpu_s']:.2f} encoding), "
        f"control client {c['cpu_s']:.2f}; control frames rejected: {c['rejected'] or 'none'}",
        f"a new stream after the flood: first try {probe['first_try']} "
        f"({probe['first_try_s'] * 1e3:.0f} ms), then "
        f"{'admitted' if probe['admitted'] else probe['outcome']} after {probe['tries']} "
        f"tries, {probe['waited_s']:.1f} s",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = FloodSettings()
    p = argparse.ArgumentParser(
        prog="python -m stream.bench.flood",
        description="A flood of distinct stream ids beside a latency-checked control stream.",
    )
    p.add_argument("--ids", type=int, default=d.ids, help="distinct stream ids to flood")
    p.add_argument("--rate-hz", type=float, default=d.rate_hz, help="flood frames/s (0: max)")
    p.add_argument("--max-known", type=int, default=d.max_known, help="state.max_known_streams")
    p.add_argument(
        "--reclaim-idle-s", type=float, default=d.reclaim_idle_s, help="state.reclaim_idle_s"
    )
    p.add_argument("--max-streams", type=int, default=None, help="state.max_streams (slab)")
    p.add_argument(
        "--checkpoint-interval-s", type=float, default=None, help="state.checkpoint_interval_s"
    )
    p.add_argument("--model", choices=("small", "default"), default=d.model, help="model sizes")
    p.add_argument("--baseline-s", type=float, default=d.baseline_s, help="control alone before")
    p.add_argument("--after-s", type=float, default=d.after_s, help="control alone after")
    p.add_argument("--control-hz", type=float, default=d.control_hz, help="control rate")
    p.add_argument("--cache-dir", default="", help="JAX compilation cache (default: the user's)")
    p.add_argument(
        "--workdir", help="keep the config, logs and state here (its state/ is cleared first)"
    )
    p.add_argument("--json", metavar="OUT", help="write every figure as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run one flood, print the table, write the JSON."""
    a = _parser().parse_args(argv)
    settings = FloodSettings(
        ids=a.ids,
        rate_hz=a.rate_hz,
        control_hz=a.control_hz,
        baseline_s=a.baseline_s,
        after_s=a.after_s,
        max_known=a.max_known,
        reclaim_idle_s=a.reclaim_idle_s,
        max_streams=a.max_streams,
        checkpoint_interval_s=a.checkpoint_interval_s,
        model=a.model,
        cache_dir=a.cache_dir,
    )
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        workdir = Path(a.workdir) if a.workdir else Path(tmp)
        try:
            result = run_flood(settings, workdir, log=sys.stderr)
        except BenchError as e:
            print(f"flood: {e}", file=sys.stderr)
            return 1
    print(format_table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
