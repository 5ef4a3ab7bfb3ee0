"""Lab Streaming Layer in: real pylsl outlets — in this process, or in a child whose clock
libfaketime offsets — feeding a real daemon process (`[lsl]`): samples become moments at
the outlet's rate, timestamps come corrected to the daemon's clock, an outlet may go and
come back, a stalled daemon resumes on fresh data, a misshapen outlet is refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream.protocol import (
    FLAG_ABSENT,
    MOTOR,
    PROPRIO,
    SENSORY,
    TACTILE,
    Moment,
    MomentReader,
    decode_frame,
)
from stream.recording import RecordingReader

from .daemon import CONFIG, DIMS, DaemonProcess, need, run_without, wait_for

pytestmark = pytest.mark.timeout(300)

ALL4 = SENSORY | PROPRIO | TACTILE | MOTOR


@pytest.fixture(scope="module")
def pylsl() -> Any:
    try:
        import pylsl
    except (ImportError, RuntimeError):
        pylsl = None
    need("pylsl (the lsl extra, with its liblsl)", pylsl is not None)
    return pylsl


def lsl_daemon(
    tmp: Path, cache: str, kind: str, *, freshness: str = "all", clock_sync: str = "processing"
) -> DaemonProcess:
    """A daemon taking every outlet of a type starting with `kind`; outlet `pm` maps to
    stream `arm-pm`, its 5 channels motor then proprio; every frame is recorded."""
    tmp.mkdir(exist_ok=True)
    extra = f"""\
[record]
path = "{tmp / "frames.rec"}"
[lsl]
predicate = "starts-with(type, '{kind}')"
freshness = "{freshness}"
clock_sync = "{clock_sync}"
resolve_interval_s = 0.1
[[lsl.outlets]]
name = "pm"
stream_id = "arm-pm"
modalities = ["motor", "proprio"]
"""
    d = DaemonProcess(tmp, cache)
    d.config.write_text(CONFIG.format(state=d.state, cache=cache) + extra)
    return d


class Moments:
    """Every moment a `SUB binary *` subscriber gets, with its arrival time
    (`time.monotonic()`, the daemon's clock), read by a thread of its own."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", daemon.ports["output"]), timeout=10)
        self.sock.sendall(b"SUB binary *\n")
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, Moment]] = []
        self._lock = threading.Lock()
        self._reader = MomentReader()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert daemon.wait_metric("enactive_subscribers", {}, 1) == 1

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            moments = self._reader.feed(data)
            with self._lock:
                self.got += [(now, m) for m in moments]

    def of(self, stream_id: str) -> list[tuple[float, Moment]]:
        with self._lock:
            return [(t, m) for t, m in self.got if m.stream_id == stream_id]

    def wait(self, stream_id: str, n: int, timeout: float = 20.0) -> list[tuple[float, Moment]]:
        wait_for(lambda: len(self.of(stream_id)) >= n, f"{n} moments of {stream_id}", timeout)
        return self.of(stream_id)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class Pusher:
    """Pushes into `outlet` from a thread, `rate_hz` samples a second (`count` in all, or
    until stopped): sample k's channel c is k + c/64, exact in float32."""

    def __init__(self, outlet: Any, rate_hz: float, count: int | None = None) -> None:
        self.outlet, self.rate_hz, self.count = outlet, rate_hz, count
        self.pushed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._push, daemon=True)

    def start(self, consumers_within: float = 20.0) -> Pusher:
        """Start once the daemon's inlet is connected."""
        assert self.outlet.wait_for_consumers(consumers_within), "no inlet connected"
        self._thread.start()
        return self

    def _push(self) -> None:
        channels = self.outlet.channel_count
        base = np.arange(channels, dtype=np.float32) / 64
        start = time.monotonic()
        while not self._stop.is_set() and (self.count is None or self.pushed < self.count):
            self.outlet.push_sample(base + self.pushed)
            self.pushed += 1
            self._stop.wait(max(0.0, start + self.pushed / self.rate_hz - time.monotonic()))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.pushed

    def join(self) -> int:
        self._thread.join()
        return self.pushed


class Outlets:
    def __init__(self, pylsl: Any, kind: str) -> None:
        self.pylsl, self.kind = pylsl, kind
        self.held: list[Any] = []

    def open(
        self,
        name: str,
        channels: int = DIMS.total,
        fmt: str = "float32",
        rate_hz: float = 200.0,
        source_id: str | None = None,
    ) -> Any:
        info = self.pylsl.StreamInfo(
            name, f"{self.kind}-x", channels, rate_hz, fmt, source_id or f"{name}-{self.kind}"
        )
        outlet = self.pylsl.StreamOutlet(info)
        self.held.append(outlet)
        return outlet

    def close(self, outlet: Any) -> None:
        self.held.remove(outlet)  # the last reference: liblsl destroys it, inlets see it lost


@contextlib.contextmanager
def running(daemon: DaemonProcess) -> Iterator[tuple[DaemonProcess, Moments]]:
    daemon.start()
    moments = Moments(daemon)
    try:
        yield daemon, moments
    finally:
        moments.close()
        daemon.kill()


def recorded(daemon: DaemonProcess, stream_id: str) -> list[Any]:
    """The frames of `stream_id` the daemon recorded so far, decoded."""
    with RecordingReader(daemon.tmp / "frames.rec") as reader:
        frames = [decode_frame(r.frame, DIMS) for r in reader]
    return [f for f in frames if f.stream_id == stream_id]


def metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    return daemon.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def stale(daemon: DaemonProcess) -> float:
    """Frames shed by a freshness policy."""
    return metric(daemon, "enactive_frames_dropped_total", reason="stale")


@pytest.fixture(scope="module")
def kind_all() -> str:
    return f"e2e-all-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def every_sample(
    tmp_path_factory: pytest.TempPathFactory, compilation_cache: str, pylsl: Any, kind_all: str
) -> Iterator[tuple[DaemonProcess, Moments]]:
    """A daemon with freshness `all` (shared by the tests that lose no outlet)."""
    d = lsl_daemon(tmp_path_factory.mktemp("lsl-all"), compilation_cache, kind_all)
    with running(d) as both:
        yield both


def test_samples_become_moments_at_the_outlets_rate(
    every_sample: tuple[DaemonProcess, Moments], pylsl: Any, kind_all: str
) -> None:
    daemon, moments = every_sample
    outlets = Outlets(pylsl, kind_all)
    full = Pusher(outlets.open("flow"), 200.0, count=300).start()
    pm_channels = DIMS.motor + DIMS.proprio
    mapped = Pusher(outlets.open("pm", pm_channels, fmt="double64", rate_hz=100.0), 100.0, 100)
    mapped.start()
    assert (full.join(), mapped.join()) == (300, 100)
    wait_for(
        lambda: len(recorded(daemon, "flow")) == 300 and len(recorded(daemon, "arm-pm")) == 100,
        "every sample recorded",
    )
    # Every sample a frame, in order, its channels in place.
    frames = recorded(daemon, "flow")
    base = np.arange(DIMS.total, dtype=np.float32) / 64
    for k, f in enumerate(frames):
        assert f.present == ALL4
        np.testing.assert_array_equal(f.payload, base + k)
    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs))
    assert all(abs(f.seq / 1e6 - f.timestamp) < 1e-3 for f in frames)  # µs of the timestamp
    span = frames[-1].timestamp - frames[0].timestamp
    assert 299 / span == pytest.approx(200.0, rel=0.1)  # the outlet's rate
    pm = recorded(daemon, "arm-pm")
    proprio = slice(DIMS.sensory, DIMS.sensory + DIMS.proprio)
    motor = slice(DIMS.total - DIMS.motor, DIMS.total)
    for k, f in enumerate(pm):  # its channels: motor, then proprio; sensory, tactile absent
        assert f.present == MOTOR | PROPRIO
        channels = np.arange(pm_channels, dtype=np.float32) / 64 + k
        expected = np.zeros(DIMS.total, np.float32)
        expected[motor], expected[proprio] = channels[: DIMS.motor], channels[DIMS.motor :]
        np.testing.assert_array_equal(f.payload, expected)
    # One moment per frame, carrying its seq and timestamp.
    got = moments.wait("flow", 300)
    assert [(m.seq, m.timestamp) for _, m in got] == [(f.seq, f.timestamp) for f in frames]
    assert len(moments.wait("arm-pm", 100)) == 100
    # ... as the samples were taken, not in bursts (past the first: the inlet connects,
    # then takes the first clock offset estimate while samples queue)
    arrived = [t for t, _ in got[-100:]]
    assert arrived[-1] - arrived[0] == pytest.approx(99 / 200, rel=0.2)
    assert stale(daemon) == 0


def test_a_misshapen_outlet_is_refused_with_one_line(
    every_sample: tuple[DaemonProcess, Moments], pylsl: Any, kind_all: str
) -> None:
    daemon, moments = every_sample
    outlets = Outlets(pylsl, kind_all)
    outlets.open("short", channels=DIMS.total - 1)
    outlets.open("words", fmt="string")
    beside = Pusher(outlets.open("beside"), 200.0, count=200).start()  # 1 s: ten resolves
    beside.join()
    assert len(moments.wait("beside", 200)) == 200
    log = daemon.output().splitlines()
    (short,) = [line for line in log if "'short'" in line]
    assert "refused" in short and f"{DIMS.total - 1} channels, expected {DIMS.total}" in short
    (words,) = [line for line in log if "'words'" in line]
    assert "refused" in words and "channel format string" in words
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.http("/readyz") == (200, "ready\n")


def test_a_stalled_daemon_with_freshness_all_sheds_nothing(
    every_sample: tuple[DaemonProcess, Moments], pylsl: Any, kind_all: str
) -> None:
    """Every sample captured while the daemon was stopped is processed after: its first
    moments after the stall are old."""
    daemon, moments = every_sample
    outlets = Outlets(pylsl, kind_all)
    pusher = Pusher(outlets.open("stall-all"), 200.0).start()
    moments.wait("stall-all", 20)
    stopped, resumed = stall(daemon)
    moments.wait("stall-all", len(moments.of("stall-all")) + 20)
    pushed = pusher.stop()
    got = moments.wait("stall-all", pushed)
    assert len(got) == pushed  # every sample, late or not
    late = [(t, m) for t, m in got if t > resumed and m.timestamp > stopped + 0.05]
    first_t, first = late[0]
    assert first_t - first.timestamp > 1.5  # worked through from the stall's start
    assert stale(daemon) == 0


def stall(daemon: DaemonProcess, seconds: float = 2.0) -> tuple[float, float]:
    """Stop the daemon (SIGSTOP) for `seconds`, deliberately: a consumer that falls
    behind. Returns when it was stopped and resumed (the daemon's clock)."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    time.sleep(seconds)  # the stall itself, not a wait for readiness
    resumed = time.monotonic()
    daemon.proc.send_signal(signal.SIGCONT)
    return stopped, resumed


def test_a_stalled_daemon_resumes_on_fresh_data(
    tmp_path: Path, compilation_cache: str, pylsl: Any
) -> None:
    kind = f"e2e-latest-{uuid.uuid4().hex[:8]}"
    d = lsl_daemon(tmp_path, compilation_cache, kind, freshness="latest")
    with running(d) as (daemon, moments):
        outlets = Outlets(pylsl, kind)
        pusher = Pusher(outlets.open("stall"), 200.0).start()
        moments.wait("stall", 20)
        shed_before = stale(daemon)
        stopped, resumed = stall(daemon)
        wait_for(lambda: sum(t > resumed for t, _ in moments.of("stall")) >= 20, "moments after")
        pusher.stop()
        after = [(t, m) for t, m in moments.of("stall") if t > resumed]
        fresh = [(t, m) for t, m in after if m.timestamp > stopped + 0.05]  # not pre-stall
        first_t, first = fresh[0]
        # captured just before it arrived (not in the stall), its timestamp right
        assert abs(first_t - first.timestamp) < 0.1, (first_t - resumed, first_t - first.timestamp)
        in_stall = [m for _, m in fresh if m.timestamp < resumed - 0.3]
        assert not in_stall, [resumed - m.timestamp for m in in_stall]
        shed = stale(daemon) - shed_before
        assert shed > 100, shed  # ~400 captured in the stall: shed, not stepped


def test_an_outlet_that_goes_and_comes_back_continues_its_stream(
    tmp_path: Path, compilation_cache: str, pylsl: Any
) -> None:
    kind = f"e2e-loss-{uuid.uuid4().hex[:8]}"
    d = lsl_daemon(tmp_path, compilation_cache, kind)
    with running(d) as (daemon, moments):
        outlets = Outlets(pylsl, kind)
        assert metric(daemon, "enactive_source_up", source="lsl") == 1
        first = outlets.open("arm", source_id="arm-unit-1")
        pusher = Pusher(first, 200.0).start()
        moments.wait("arm", 20)
        before = moments.wait("arm", pusher.stop())  # every sample it pushed
        outlets.close(first)
        del first, pusher
        assert daemon.wait_metric("enactive_source_disconnects_total", {"source": "lsl"}, 1) == 1
        assert metric(daemon, "enactive_source_up", source="lsl") == 0  # an outlet missing
        gone = time.monotonic()
        # The same name from another unit (a new source_id and uid): the stream goes on.
        back = Pusher(outlets.open("arm", source_id="arm-unit-2"), 200.0, count=100).start()
        back.join()
        got = moments.wait("arm", len(before) + 100)
        assert daemon.wait_metric("enactive_source_reconnects_total", {"source": "lsl"}, 1) == 1
        assert metric(daemon, "enactive_source_up", source="lsl") == 1
        assert metric(daemon, "enactive_source_disconnects_total", source="lsl") == 1
        after = [m for _, m in got[len(before) :]]
        assert len(after) == 100 and all(m.timestamp > gone for m in after)
        seqs = [m.seq for _, m in got]
        assert seqs == sorted(set(seqs))  # one stream, its seq still increasing
        assert daemon.proc is not None and daemon.proc.poll() is None


CHILD = """\
import ctypes, os, sys, time, pylsl

class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

libc = ctypes.CDLL(None, use_errno=True)
CLOCK_GETTIME = {{"x86_64": 228, "aarch64": 113}}[os.uname().machine]

def true_clock():  # CLOCK_MONOTONIC by system call: out of libfaketime's reach
    ts = Timespec()
    assert libc.syscall(CLOCK_GETTIME, 1, ctypes.byref(ts)) == 0
    return ts.sec + ts.nsec * 1e-9

name, kind = sys.argv[1], sys.argv[2]
info = pylsl.StreamInfo(name, kind, {channels}, 100.0, "float32", name + "-" + kind)
outlet = pylsl.StreamOutlet(info)
base = true_clock()
print("clocks", base, pylsl.local_clock() - true_clock(), flush=True)
k = 0
while k < 6000:  # at most a minute; the test ends it sooner
    taken = true_clock()  # the sample's capture, on the daemon's clock; stamped on liblsl's
    outlet.push_sample([taken - base] + [float(k)] * ({channels} - 1), pylsl.local_clock())
    k += 1
    time.sleep(max(0.0, base + k / 100 - true_clock()))
"""


@pytest.mark.parametrize("clock_sync", ["processing", "time_correction", "none"])
def test_timestamps_of_an_offset_clock_are_corrected(
    tmp_path: Path, compilation_cache: str, pylsl: Any, clock_sync: str
) -> None:
    """An outlet whose clock (CLOCK_MONOTONIC, under libfaketime) is far from the
    daemon's: its samples' timestamps come on the daemon's clock, within 5 ms of when
    they were taken (each sample carries that, read past libfaketime) — except with
    `clock_sync = "none"`, which keeps the outlet's clock."""
    faketime = shutil.which("faketime")
    need("faketime (Debian package faketime)", faketime is not None)
    assert faketime is not None
    kind = f"e2e-clock-{uuid.uuid4().hex[:8]}"
    child_code = CHILD.format(channels=DIMS.total)
    argv = [faketime, "-m", "-f", "+30s", sys.executable, "-c", child_code, "skewed", kind]
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "0"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            base, offset = (float(x) for x in line.split()[1:])  # offset: its clock - ours
            assert abs(offset) > 20, f"libfaketime did not move liblsl's clock: {line!r}"
            d = lsl_daemon(tmp_path, compilation_cache, kind, clock_sync=clock_sync)
            with running(d) as (daemon, _):
                wait_for(lambda: len(recorded(daemon, "skewed")) >= 150, "150 samples", 60)
                frames = recorded(daemon, "skewed")[-100:]  # (the inlet's start settled)
        finally:
            child.kill()
    error = np.median([f.timestamp - (base + float(f.payload[0])) for f in frames])
    if clock_sync == "none":
        assert error == pytest.approx(offset, abs=0.005)  # the outlet's own clock
    else:
        assert abs(error) < 0.005, (error, offset)


def test_the_core_runs_without_pylsl(tmp_path: Path) -> None:
    """Without pylsl: the daemon's modules import, and an [lsl] section is refused with
    one line naming the extra (exit status 2)."""
    r = run_without(
        ["pylsl"],
        ["stream.lsl", "stream.sources.lsl"],
        "[lsl]\npredicate = \"type='EEG'\"\n",
        tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "enactive-stream: error: the LSL source needs the lsl extra: "
        "pip install 'enactive-stream[lsl]'"
    )


DOCS = Path(__file__).parents[2] / "docs" / "integrations.md"
SECTION = "\n## Lab Streaming Layer\n"


@pytest.mark.skipif(
    SECTION not in DOCS.read_text(), reason="docs/integrations.md has no LSL section yet"
)
def test_the_integrations_example(tmp_path: Path, compilation_cache: str, pylsl: Any) -> None:
    """docs/integrations.md's LSL example, as printed (its outlet's type made this test's
    own), against a daemon with the default model: the arm's samples become moments of
    stream `arm-1`, its proprio and motor present, sensory and tactile absent."""
    section = DOCS.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    outlet = section.split("```python\n", 1)[1].split("```", 1)[0]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    assert "# outlet.py" in outlet and "[lsl]" in toml
    kind = f"docs-{uuid.uuid4().hex[:8]}"
    outlet, toml = (b.replace("'EnactiveSensors'", f"'{kind}'") for b in (outlet, toml))
    outlet = outlet.replace('"EnactiveSensors"', f'"{kind}"')
    d = DaemonProcess(tmp_path, compilation_cache)
    d.config.write_text(
        f"""[ingest]\ntcp = ""\nudp = ""\n[output]\ntcp = "127.0.0.1:0"\n[metrics]
listen = "127.0.0.1:0"\n[batching]\nbuckets = [8]\n[state]\ndir = "{d.state}"
[device]\ncompilation_cache_dir = "{compilation_cache}"\n[log]\nstatus_interval_s = 0
{toml}"""
    )
    with subprocess.Popen([sys.executable, "-c", outlet], stderr=subprocess.PIPE) as arm:
        try:
            with running(d) as (daemon, moments):
                got = [m for _, m in moments.wait("arm-1", 10)]
                assert "open: 96 float32 channels at 250 Hz -> stream 'arm-1'" in daemon.output()
        finally:
            arm.kill()
    assert all(m.flags & FLAG_ABSENT for m in got)  # sensory, tactile absent
    assert all(abs(m.seq / 1e6 - m.timestamp) < 1e-3 for m in got)
