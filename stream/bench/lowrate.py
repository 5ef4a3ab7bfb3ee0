"""Daemon CPU per frame under many connections at a low rate (docs/benchmarks.md).

`python -m stream.bench.lowrate SRC_DIR {tcp,udp} OUT.json` starts a daemon from the
source tree `SRC_DIR` (synthetic feed off, ports chosen by the kernel), drives it with
`enactive-stream send` from that tree — `CONNECTIONS` sensors, one stream each, at
`RATE_HZ` for `DURATION_S` — in its own process, and writes the daemon's process CPU
time per processed frame and the sender's CPU time. Running it on two trees, alternating,
compares them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request

from .procfs import cpu_seconds

CONNECTIONS, RATE_HZ, DURATION_S = 200, 20.0, 10.0


def _processed(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("enactive_frames_processed_total")
    )


def main(argv: list[str]) -> int:
    src, transport, out = argv
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "PYTHONPATH": src, "XDG_STATE_HOME": tmp}
    ready = os.path.join(tmp, "ready.json")
    sets = [
        "synthetic.streams=0",
        "log.status_interval_s=0",
        "batching.serve_while_compiling=false",
    ] + [
        f"{key}=127.0.0.1:0" for key in ("metrics.listen", "output.tcp", "ingest.tcp", "ingest.udp")
    ]
    cli = [sys.executable, "-m", "stream.cli"]
    args = [a for key in sets for a in ("--set", key)]
    daemon = subprocess.Popen(
        [*cli, "run", *args, "--ready-file", ready],
        cwd=src,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not os.path.exists(ready):  # the daemon writes it once ready
            if daemon.poll() is not None:
                raise SystemExit(f"daemon exited {daemon.returncode}")
            time.sleep(0.05)
        ports = json.load(open(ready))
        cpu0, frames0 = cpu_seconds(daemon.pid), _processed(ports["metrics"])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        send = [
            "send", "--port", str(ports["tcp"]), "--transport", transport,
            "--streams", str(CONNECTIONS), "--connections", str(CONNECTIONS),
            "--rate", str(RATE_HZ), "--duration", str(DURATION_S),
        ]  # fmt: skip
        subprocess.run([*cli, *send], cwd=src, env=env, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        expected = frames0 + CONNECTIONS * RATE_HZ * DURATION_S
        deadline = time.monotonic() + 10
        while _processed(ports["metrics"]) < expected and time.monotonic() < deadline:
            time.sleep(0.05)  # the last frames (UDP may lose some: then the deadline)
        cpu1, frames1 = cpu_seconds(daemon.pid), _processed(ports["metrics"])
    finally:
        daemon.terminate()
        daemon.wait()
    frames = frames1 - frames0
    result = {
        "transport": transport,
        "frames": frames,
        "daemon_cpu_s": cpu1 - cpu0,
        "daemon_cpu_us_per_frame": (cpu1 - cpu0) / max(frames, 1) * 1e6,
        "sender_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }
    with open(out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
