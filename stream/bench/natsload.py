"""The NATS load generator of `enactive-stream bench --nats`, in its own process.

`main([SPEC.json])` runs one measurement described by a `NatsLoadSpec` saved as JSON and
prints the result as one JSON object (`stream.bench.natsbench` starts it in a fresh
process, as the other benchmark clients).

```
 publisher ─PUB sensors.<id>, reply: our inbox─► SENSORS ─► daemon ─► moments.<id> ─► MOMENTS
    ▲ at most `window` frames not yet stored                              │ (also delivered
    └──── JetStream's acknowledgements (one subscription, counted) ◄──    ▼  to core subscribers)
                                     reader: a core subscription to `moments.>` (2nd connection)
```

Frames are published as core NATS messages whose reply subject is an inbox of ours:
JetStream answers there once a frame is stored, and one subscription counts the answers
(one holding `"error"` is counted as refused). That is `js.publish_async` without a
future and a JSON parse per frame, about 3× less CPU per frame, so the generator takes
less of the host from the daemon. Each stream's frame is encoded once (`FrameBlock`);
only its seq and timestamp are rewritten before each publication. Frame `i` is stream
`i mod S`'s, round `i div S`.

- `max`: every frame as fast as JetStream stores them, at most `window` in flight.
- `paced`: frame `i` due at `t0 + i / rate`, stamped with its due time (no coordinated
    omission: a late publication carries its wait), published as soon as it is due.

Timestamps are wall-clock seconds (`time.time()` at `t0`, advanced by
`time.perf_counter`); a moment's receipt time is taken when the reader's callback
runs. Latency = receipt − the timestamp the moment echoes, for frames due after the
first `warmup_s`. Once the last moment is in, the generator waits until the durable
consumer has every frame acknowledged (the daemon acknowledges after a durable
checkpoint), and reads how much the `MOMENTS` stream grew.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import re
import resource
import struct
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from stream.protocol import MOMENT_HEADER_BYTES, Dims

from .client import ClientError, run_spec_main
from .probe import RunProbe, daemon_delta
from .procfs import cpu_seconds
from .stats import cdf, percentiles
from .wire import FRAME_SEQ_OFFSET, FRAME_TIMESTAMP_OFFSET, FrameBlock, parse_records, stream_ids

__all__ = ["NatsLoadSpec", "main", "metric_sum", "moment_counts", "run_natsload"]

ACK_POLL_S = 0.05
"""How often the consumer is asked whether every frame is acknowledged."""
_SEQ_STAMP = struct.Struct("<Qd")
assert FRAME_TIMESTAMP_OFFSET == FRAME_SEQ_OFFSET + 8  # one pack writes both


@dataclasses.dataclass(frozen=True, slots=True)
class NatsLoadSpec:
    """One generator run.

    - `mode`: `"max"` or `"paced"` (see the module).
    - `url`: the server; `metrics_port`: the daemon's HTTP port.
    - `streams`: S, ids `stream_ids(streams, prefix)`; `rounds`: frames per stream;
        `first_seq`: seq of every stream's first frame of this run.
    - `rate`: `paced`: frames/s in all; `warmup_s`: the leading seconds of the schedule
        left out of the latency figures (and of the daemon's `measured` window).
    - `window`: frames published and not yet stored by JetStream, at most.
    - `dims`, `record_bytes`: the modality sizes, the size of one moment record.
    - `daemon_pid`, `broker_pid`: processes whose CPU time is read (0: not read).
    - `sample_s`: how often the daemon's ack lag is read from `/metrics` during the run.
    - `frames_stream`, `durable`, `moments_stream`: the daemon's JetStream names.
    - `timeout_s`: the longest wait for the next moment, and for the acknowledgements.
    """

    mode: str
    url: str
    metrics_port: int
    streams: int = 1024
    rounds: int = 100
    first_seq: int = 1
    rate: float = 0.0
    warmup_s: float = 0.0
    window: int = 2048
    dims: tuple[int, int, int, int] = (32, 64, 32, 32)
    record_bytes: int = 0
    daemon_pid: int = 0
    broker_pid: int = 0
    sample_s: float = 0.5
    prefix: str = "n-"
    seed: int = 0
    frames_stream: str = "SENSORS"
    durable: str = "enactive"
    moments_stream: str = "MOMENTS"
    host: str = "127.0.0.1"
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in ("max", "paced"):
            raise ValueError(f"mode = {self.mode!r}, expected max or paced")
        if min(self.streams, self.rounds, self.first_seq, self.window) < 1:
            raise ValueError("streams, rounds, first_seq, window must be >= 1")
        if self.mode == "paced" and not self.rate > 0:
            raise ValueError(f"rate = {self.rate}: paced needs a rate > 0")
        if self.record_bytes <= 0 or self.warmup_s < 0 or self.sample_s <= 0:
            raise ValueError("need record_bytes > 0, warmup_s >= 0, sample_s > 0")

    @property
    def frames(self) -> int:
        """Frames this run publishes."""
        return self.streams * self.rounds


def moment_counts(
    data: bytes | bytearray,
    record_bytes: int,
    prefix: str,
    streams: int,
    first_seq: int,
    rounds: int,
) -> dict[str, int]:
    """How often each expected moment arrived, from back-to-back moment records of one
    size whose stream ids are `stream_ids(streams, prefix)`.

    **Arguments:**

    - `data`: `n · record_bytes` bytes of records.
    - `prefix`, `streams`, `first_seq`, `rounds`: the moments expected: each stream's
        seqs `first_seq … first_seq + rounds − 1`.

    **Returns:** `received` (n), `distinct` ((stream, seq) pairs), `duplicated` (records
    beyond the first of their pair), `unexpected` (distinct pairs not expected: another
    stream id or seq), `missing` (expected pairs not received).
    """
    n = len(data) // record_bytes
    expected = streams * rounds
    if n == 0:
        return {"received": 0, "distinct": 0, "duplicated": 0, "unexpected": 0, "missing": expected}
    rows = np.frombuffer(data, np.uint8, n * record_bytes).reshape(n, record_bytes)
    width = len(stream_ids(streams, prefix)[0])
    ids = rows[:, MOMENT_HEADER_BYTES : MOMENT_HEADER_BYTES + width]
    head = np.frombuffer(prefix.encode(), np.uint8)
    digits = ids[:, len(head) :].astype(np.int64) - ord("0")
    id_length = rows[:, 12].astype(np.int64) | (rows[:, 13].astype(np.int64) << 8)
    ours = (
        (ids[:, : len(head)] == head).all(axis=1)
        & ((digits >= 0) & (digits <= 9)).all(axis=1)
        & (id_length == width)
    )
    index = digits @ (10 ** np.arange(digits.shape[1] - 1, -1, -1, dtype=np.int64))
    seq = parse_records(rows, record_bytes, n)["seq"].astype(np.int64)
    keys = np.where(ours, index, -1) * (1 << 40) + seq
    unique, counts = np.unique(keys, return_counts=True)
    stream_of, seq_of = unique >> 40, unique & ((1 << 40) - 1)
    wanted = (
        (stream_of >= 0)
        & (stream_of < streams)
        & (seq_of >= first_seq)
        & (seq_of < first_seq + rounds)
    )
    return {
        "received": n,
        "distinct": int(unique.size),
        "duplicated": int((counts - 1).sum()),
        "unexpected": int((~wanted).sum()),
        "missing": expected - int(wanted.sum()),
    }


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` in a `/metrics` text whose labels include
    `labels` (0 if none)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    for found in pattern.finditer(text):
        have = found.group(1) or ""
        if all(f'{k}="{v}"' in have for k, v in labels.items()):
            total += float(found.group(2))
    return total


class _AckLagSampler:
    """Reads `enactive_source_ack_lag_seconds{source="nats"}` every `period` s in a
    thread of its own, from `start()` to `stop()`."""

    def __init__(self, host: str, port: int, period: float) -> None:
        self.url = f"http://{host}:{port}/metrics"
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            self.samples.append(metric_sum(text, "enactive_source_ack_lag_seconds", source="nats"))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    return cpu_seconds(pid) if pid > 0 else 0.0


class _Run:
    """The state of one run on the event loop: what was published, acknowledged,
    received."""

    def __init__(self, spec: NatsLoadSpec) -> None:
        self.spec = spec
        ids = stream_ids(spec.streams, spec.prefix)
        self.subjects = [f"sensors.{s}" for s in ids]
        block = FrameBlock(ids, 1, Dims(*spec.dims), first_seq=spec.first_seq, seed=spec.seed)
        self.templates = [bytearray(row.tobytes()) for row in block.data]
        self.published = 0
        self.acked = 0
        self.refused = 0
        self.last_ack = 0.0
        self.room = asyncio.Event()
        self.all_acked = asyncio.Event()
        self.moments: list[bytes] = []
        self.times = array.array("d")
        self.all_in = asyncio.Event()
        self.lags = array.array("d")  # paced: per frame, publication − due time
        self.send_end = 0.0  # when the last frame was published

    async def on_ack(self, msg: Any) -> None:
        self.acked += 1
        if b'"error"' in msg.data:
            self.refused += 1
        if self.published - self.acked <= self.spec.window // 2:
            self.room.set()
        if self.acked == self.spec.frames:
            self.last_ack = time.perf_counter()
            self.all_acked.set()

    async def on_moment(self, msg: Any) -> None:
        self.moments.append(msg.data)
        self.times.append(time.perf_counter())
        if len(self.moments) >= self.spec.frames:
            self.all_in.set()

    async def publish(self, nc: Any, inbox: str, i: int, stamp: float) -> None:
        while self.published - self.acked >= self.spec.window:
            self.room.clear()
            await self.room.wait()
        s = i % self.spec.streams
        template = self.templates[s]
        _SEQ_STAMP.pack_into(
            template, FRAME_SEQ_OFFSET, self.spec.first_seq + i // self.spec.streams, stamp
        )
        await nc.publish(self.subjects[s], bytes(template), reply=inbox)
        self.published += 1

    async def publish_all(self, nc: Any, inbox: str, t0: float, wall0: float) -> None:
        spec, clock = self.spec, time.perf_counter
        if spec.mode == "max":
            for i in range(spec.frames):
                await self.publish(nc, inbox, i, wall0 + (clock() - t0))
            return
        period, i = 1.0 / spec.rate, 0
        while i < spec.frames:
            now = clock()
            due = t0 + i * period
            if due > now:
                await asyncio.sleep(due - now)
                continue
            last = min(spec.frames, int((now - t0) * spec.rate) + 1)
            while i < last:
                due = t0 + i * period
                self.lags.append(clock() - due)
                await self.publish(nc, inbox, i, wall0 + (due - t0))
                i += 1

    async def receive_all(self) -> None:
        """Wait for every moment; `ClientError` after `timeout_s` without one."""
        while not self.all_in.is_set():
            before = len(self.moments)
            try:
                await asyncio.wait_for(self.all_in.wait(), self.spec.timeout_s)
            except TimeoutError:
                if len(self.moments) == before:
                    raise ClientError(
                        f"no moment for {self.spec.timeout_s} s: {len(self.moments)} of "
                        f"{self.spec.frames} received, {self.acked} frames stored "
                        f"({self.refused} refused)"
                    ) from None


async def _acknowledged(js: Any, spec: NatsLoadSpec, last_seq: int) -> bool:
    """Wait until the durable consumer has acknowledged every frame up to stream
    sequence `last_seq` (False after `timeout_s`)."""
    deadline = time.perf_counter() + spec.timeout_s
    while time.perf_counter() < deadline:
        info = await js.consumer_info(spec.frames_stream, spec.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if not info.num_ack_pending and not info.num_pending and floor >= last_seq:
            return True
        await asyncio.sleep(ACK_POLL_S)
    return False


async def _run(spec: NatsLoadSpec) -> dict[str, Any]:
    import nats
    import nats.errors

    slow: list[BaseException] = []

    async def on_error(e: Exception) -> None:
        slow.append(e)

    options: dict[str, Any] = {"allow_reconnect": False, "error_cb": on_error}
    try:
        pub = await nats.connect(spec.url, name="bench publisher", **options)
        sub = await nats.connect(spec.url, name="bench reader", **options)
    except (nats.errors.Error, OSError) as e:
        raise ClientError(f"cannot connect to {spec.url}: {e}") from None
    run = _Run(spec)
    try:
        js = pub.jetstream()
        stored0 = (await js.stream_info(spec.moments_stream)).state.messages
        inbox = pub.new_inbox()
        await pub.subscribe(inbox, cb=run.on_ack, pending_msgs_limit=1 << 22)
        await sub.subscribe(
            "moments.>", cb=run.on_moment, pending_msgs_limit=1 << 24, pending_bytes_limit=1 << 32
        )
        await sub.flush()
        await pub.flush()
        probe = RunProbe(spec.host, spec.metrics_port, spec.daemon_pid) if spec.daemon_pid else None
        sampler = _AckLagSampler(spec.host, spec.metrics_port, spec.sample_s)
        if probe is not None:
            probe.begin()
        t0, wall0 = time.perf_counter() + 0.005, time.time() + 0.005
        if probe is not None and spec.warmup_s > 0:
            probe.start_warm(t0 + spec.warmup_s)
        cpu0, broker0 = _cpu_s(), _cpu_of(spec.broker_pid)
        sampler.start()
        await run.publish_all(pub, inbox, t0, wall0)
        run.send_end = time.perf_counter()
        await pub.flush()
        try:
            await asyncio.wait_for(run.all_acked.wait(), spec.timeout_s)
        except TimeoutError:
            raise ClientError(
                f"JetStream acknowledged {run.acked} of {spec.frames} frames "
                f"({spec.timeout_s} s after the last publication)"
            ) from None
        await run.receive_all()
        lag_samples = sampler.stop()
        cpu = _cpu_s() - cpu0
        daemon = probe.finish() if probe is not None else None
        last_seq = (await js.stream_info(spec.frames_stream)).state.last_seq
        acked = await _acknowledged(js, spec, last_seq)
        acked_at = time.perf_counter()
        broker = _cpu_of(spec.broker_pid) - broker0
        if probe is not None and daemon is not None:
            assert probe.first is not None
            after = probe.snapshot()
            daemon["acked"] = daemon_delta(probe.first, after)
            daemon["redeliveries"] = metric_sum(
                after.metrics, "enactive_source_redeliveries_total"
            ) - metric_sum(probe.first.metrics, "enactive_source_redeliveries_total")
            daemon["sink_duplicates"] = metric_sum(
                after.metrics, "enactive_sink_duplicates_total"
            ) - metric_sum(probe.first.metrics, "enactive_sink_duplicates_total")
        stored = (await js.stream_info(spec.moments_stream)).state.messages - stored0
    except nats.errors.Error as e:
        raise ClientError(f"nats: {type(e).__name__}: {e}") from None
    finally:
        for nc in (pub, sub):
            await nc.close()
    return _result(spec, run, t0, wall0, cpu, broker, daemon, lag_samples, acked, acked_at,
                   stored, slow)  # fmt: skip


def _result(
    spec: NatsLoadSpec,
    run: _Run,
    t0: float,
    wall0: float,
    cpu: float,
    broker: float,
    daemon: dict[str, Any] | None,
    lag_samples: Sequence[float],
    acked: bool,
    acked_at: float,
    stored: int,
    errors: Sequence[BaseException],
) -> dict[str, Any]:
    record = spec.record_bytes
    sizes = {len(m) for m in run.moments}
    data = b"".join(m for m in run.moments if len(m) == record)
    try:
        counts = moment_counts(data, record, spec.prefix, spec.streams, spec.first_seq, spec.rounds)
    except ValueError as e:  # a record that is not a moment of this size
        raise ClientError(f"moments: {e}") from None
    counts["unexpected"] += sum(1 for m in run.moments if len(m) != record)
    last = run.times[-1]
    out: dict[str, Any] = {
        "mode": spec.mode,
        "frames": spec.frames,
        "offered_frames_per_s": spec.rate if spec.mode == "paced" else None,
        "published": run.published,
        "refused": run.refused,
        "send_s": run.send_end - t0,
        "sent_frames_per_s": spec.frames / (run.send_end - t0),
        "publish_s": run.last_ack - t0,
        "publish_frames_per_s": spec.frames / (run.last_ack - t0),
        "elapsed_s": last - t0,
        "frames_per_s": spec.frames / (last - t0),
        "moments": counts,
        "stored_moments": stored,
        "exactly_once": (
            counts["duplicated"] == counts["unexpected"] == counts["missing"] == 0
            and stored == spec.frames
            and run.refused == 0
        ),
        "all_acknowledged": acked,
        "ack_drain_s": acked_at - last,
        "ack_lag_samples_s": list(lag_samples),
        "generator_cpu_s": cpu,
        "broker_cpu_s": broker,
        "client_errors": [f"{type(e).__name__}: {e}" for e in errors][:5],
        "record_sizes": sorted(sizes),
    }
    if spec.mode == "paced":
        out["send_lag_ms"] = percentiles(run.lags, scale=1e3) if len(run.lags) else None
        fields = parse_records(np.frombuffer(data, np.uint8), record, len(data) // record)
        received = wall0 + (np.frombuffer(run.times, np.float64) - t0)
        received = received[[len(m) == record for m in run.moments]]
        measured = fields["timestamp"] >= wall0 + spec.warmup_s
        if not measured.any():
            raise ClientError(f"no frame due after the {spec.warmup_s} s warm-up")
        latency = (received - fields["timestamp"])[measured]
        out["measured_frames"] = int(measured.sum())
        out["latency_ms"] = percentiles(latency, scale=1e3)
        out["server_latency_ms"] = percentiles(fields["latency_ns"][measured], scale=1e-6)
        out["cdf_ms"] = cdf(latency, scale=1e3)
    if daemon is not None:
        out["daemon"] = daemon
    return out


def run_natsload(spec: NatsLoadSpec) -> dict[str, Any]:
    """Run one generator measurement (blocking; call it in its own process).

    **Returns:** a JSON-ready dict: `mode`, `frames`, `offered_frames_per_s` (paced),
    `published`, `refused` (frames JetStream answered with an error), `send_s` and
    `sent_frames_per_s` (t0 → the last frame handed to the connection), `publish_s` and
    `publish_frames_per_s` (t0 → the last frame stored), `elapsed_s` and `frames_per_s`
    (t0 → the last moment received), `moments` (`moment_counts`), `stored_moments` (how
    much `MOMENTS` grew), `exactly_once`, `all_acknowledged`, `ack_drain_s` (the last
    moment → every frame acknowledged), `ack_lag_samples_s` (the daemon's ack lag, read
    every `sample_s` from t0 to the last moment), `generator_cpu_s` (this process, t0 →
    the last moment), `broker_cpu_s` (t0 → every frame acknowledged), `client_errors`,
    `record_sizes`; paced: `send_lag_ms`, `measured_frames`, `latency_ms`,
    `server_latency_ms` (`percentiles`, ms), `cdf_ms`; with `daemon_pid`: `daemon`
    (`run`, `measured`: `daemon_delta`s to the last moment; `acked`: to every frame
    acknowledged; `redeliveries`, `sink_duplicates`: counter deltas over `acked`).

    **Raises:** `ClientError` when moments stop coming, or NATS fails.
    """
    return asyncio.run(_run(spec))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `NatsLoadSpec` saved as JSON in the one argument; print the result as JSON."""
    return run_spec_main(argv, NatsLoadSpec, run_natsload, "natsload")
