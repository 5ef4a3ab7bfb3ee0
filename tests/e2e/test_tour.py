"""The README's 30-second tour, run literally twice in a row against one daemon: every
command succeeds both times and every frame both `send` runs deliver yields a moment."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from .daemon import DIMS, DaemonProcess

README = Path(__file__).resolve().parents[2] / "README.md"
CLI = [sys.executable, "-m", "stream.cli"]
DIM_FLAGS = [
    "--state-dim", str(DIMS.sensory), "--proprio-dim", str(DIMS.proprio),
    "--tactile-dim", str(DIMS.tactile), "--motor-dim", str(DIMS.motor),
]  # fmt: skip


def tour_commands() -> list[list[str]]:
    """The `enactive-stream …` commands of the README's tour, in order."""
    text = README.read_text()
    section = text.split("## A 30-second tour", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "the tour has a sh block"
    return [
        shlex.split(line)
        for line in block.group(1).splitlines()
        if line.startswith("enactive-stream ")
    ]


def send_frames(command: list[str]) -> int:
    """Frames one `send` command of the tour sends."""
    args = dict(zip(command[2::2], command[3::2], strict=False))
    ticks = round(float(args["--duration"]) * float(args["--rate"]))
    return int(args["--streams"]) * ticks


def test_the_readme_tour_works_twice_in_a_row(tmp_path: Path, compilation_cache: str) -> None:
    commands = tour_commands()
    sends = [c for c in commands if c[1] == "send"]
    assert sends and any(c[1] == "subscribe" for c in commands)
    expected = 2 * sum(map(send_frames, sends))
    d = DaemonProcess(tmp_path, compilation_cache, "[synthetic]\nstreams = 4\n").start()
    try:
        watcher = d.subscribe("sim-*")  # every moment of what `send` sends, in the background
        got: list[int] = []
        reading = threading.Thread(target=lambda: got.append(len(watcher.read(expected, 120))))
        reading.start()
        for _ in range(2):
            for command in commands:
                argv = [*CLI, *command[1:]]
                if command[1] == "send":
                    argv += ["--port", str(d.ports["tcp"]), *DIM_FLAGS]
                elif command[1] == "subscribe":
                    argv += ["--port", str(d.ports["output"])]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, (command, out.stderr)
                assert "Traceback" not in out.stderr
                if command[1] == "send":
                    assert f"{send_frames(command)} accepted, 0 rejected" in out.stdout
                else:
                    lines = out.stdout.splitlines()
                    count = int(command[command.index("--count") + 1])
                    assert len(lines) == count
                    assert all(json.loads(line)["stream"].startswith("body-") for line in lines)
        reading.join(150)
        assert got == [expected]  # one moment per frame, both runs
        per_stream: dict[str, list[int]] = {}
        for m in watcher.moments:
            per_stream.setdefault(m.stream_id, []).append(m.seq)
        for seqs in per_stream.values():  # the second run is a new session: seq 1 again
            ticks = len(seqs) // 2
            assert seqs == list(range(1, ticks + 1)) * 2
        rejected = {
            k: v for k, v in d.metrics().items() if k[0] == "enactive_frames_rejected_total"
        }
        assert sum(rejected.values()) == 0
    finally:
        d.kill()


def test_the_protocol_pages_python_client_works_against_the_default_model_twice(
    tmp_path: Path, compilation_cache: str
) -> None:
    doc = (README.parent / "docs" / "protocol.md").read_text()
    section = doc.split("## A Python client", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    defaults = {"STATE_DIM": "32", "PROPRIO_DIM": "64", "TACTILE_DIM": "32", "MOTOR_DIM": "32"}
    env = {f"ENACTIVE_MODEL_{k}": v for k, v in defaults.items()}
    d = DaemonProcess(tmp_path, compilation_cache, env=env).start()
    try:
        client = code.group(1).replace("7400", str(d.ports["tcp"]))
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", client], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "1000 accepted, 0 rejected"
        # A sender that gets it wrong hears about it: the wrong sizes, answered per frame.
        wrong = client.replace("D, P, T, M = 32, 64, 32, 32", "D, P, T, M = 3, 64, 32, 32")
        out = subprocess.run([sys.executable, "-c", wrong], capture_output=True, text=True)
        assert out.stdout.splitlines()[-1] == "0 accepted, 1000 rejected"
        assert out.stdout.splitlines()[0] == "seq 1 rejected: dim_mismatch"
    finally:
        d.kill()
