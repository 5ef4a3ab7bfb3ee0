"""Ordinary failures of every command: one line on stderr, `enactive-stream: error: <cause>
(<fix>)`, exit status 2 for a usage or configuration error and 1 for a runtime one, never a
traceback. Each case runs the real command line in a subprocess; none needs a daemon
(start-up failures of `run` itself: `test_startup_failures.py`). The benchmark's exit
status is checked in-process against a canned result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import stream.bench
from stream.bench import BenchError
from stream.cli import main

from .daemon import free_port

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "stream.cli"]


def _fails(*args: str, status: int = 2) -> str:
    """Runs the command; checks its exit status and that stderr is one error line with no
    traceback; returns that line."""
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=100)
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert lines[0].startswith("enactive-stream: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["send", "--bogus"], "unrecognized arguments: --bogus"),
        (["send", "--streams", "0"], "argument --streams: expected an integer >= 1, got 0"),
        (["send", "--rate", "-1"], "argument --rate: expected a number > 0, got -1"),
        (["send", "--port", "http"], "argument --port: expected an integer in [1, 65535]"),
        (["subscribe", "--timeout", "-2"], "argument --timeout: expected a number >= 0"),
        (["check-config"], "the following arguments are required: file"),
        (["run", "--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
        (["run", "--set", "batching"], "--set 'batching': expected SECTION.KEY=VALUE"),
        (["bench", "--buckets", "1,x"], "argument --buckets: expected an integer >= 1, got 'x'"),
        (["bench", "--streams", "0"], "argument --streams: expected an integer >= 1, got 0"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_error(args: list[str], cause: str) -> None:
    line = _fails(*args)
    assert cause in line
    command = "" if args[0] == "frobnicate" else f" {args[0]}"
    assert line.endswith(f"(see enactive-stream{command} --help)"), line


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("check-config", "missing"),
        ("check-config", "directory"),
        ("check-config", "bad TOML"),
        ("run", "missing"),
        ("run", "bad TOML"),
        ("info", "missing"),
    ],
)
def test_unusable_config_file(tmp_path: Path, command: str, kind: str) -> None:
    path = tmp_path / "daemon.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "bad TOML":
        path.write_text("[batching\nmax_wait_ms = 5\n")
    line = _fails(command, str(path) if command == "check-config" else f"--config={path}")
    assert str(path) in line
    expected = {
        "missing": "No such file or directory",
        "directory": "Is a directory",
        "bad TOML": "invalid TOML",
    }[kind]
    assert expected in line


@pytest.mark.parametrize("command", ["send", "subscribe"])
def test_nothing_listening(command: str) -> None:
    port = free_port()  # nothing listens on it
    args = ["--duration", "0.1"] if command == "send" else []
    line = _fails(command, "--port", str(port), *args, status=1)
    assert f"cannot reach 127.0.0.1:{port}" in line and "enactive-stream run" in line


def test_bench_output_that_cannot_be_written(tmp_path: Path) -> None:
    line = _fails("bench", "--quick", "--json", str(tmp_path))  # refused before measuring
    assert f"--json {tmp_path}: is a directory" in line


# --- the benchmark's exit status, against canned results ------------------------------------


def _result(**met: bool | None) -> dict[str, Any]:
    targets = {
        name: {"value": 7.0, "op": "<=", "target": 5.0, "met": ok, "what": name}
        for name, ok in met.items()
    }
    return {"targets": targets}


@pytest.fixture
def bench_result(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the patched `run_bench` returns; tests fill in its `targets`."""
    result: dict[str, Any] = {"targets": {}}
    monkeypatch.setattr(stream.bench, "run_bench", lambda settings, log: result)
    monkeypatch.setattr(stream.bench, "format_table", lambda result: "(the table)")
    return result


def test_bench_exits_1_when_a_target_is_missed(
    bench_result: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_result.update(_result(p99_at_half_load_ms=False, warm_restart_s=True))
    assert main(["bench", "--quick"]) == 1
    out, err = capsys.readouterr()
    assert out == "(the table)\n"
    assert err == (
        "enactive-stream: error: bench: targets missed: p99_at_half_load_ms = 7 (want <= 5) "
        "(--report-only to exit 0)\n"
    )


def test_bench_report_only_exits_0_whatever_the_targets(
    bench_result: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_result.update(_result(p99_at_half_load_ms=False))
    assert main(["bench", "--quick", "--report-only"]) == 0
    assert "targets missed (--report-only): p99_at_half_load_ms" in capsys.readouterr().err


def test_bench_exits_0_when_every_measured_target_is_met(bench_result: dict[str, Any]) -> None:
    bench_result.update(_result(p99_at_half_load_ms=True, throughput_vs_baseline=None))
    assert main(["bench", "--quick", "--no-baseline"]) == 0


def test_bench_failure_is_one_line_after_the_services_output(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(settings: object, log: object) -> None:
        raise BenchError("daemon exited 2:\nits log line 1\nits log line 2")

    monkeypatch.setattr(stream.bench, "run_bench", fail)
    assert main(["bench", "--quick"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "its log line 1",
        "its log line 2",
        "enactive-stream: error: bench: daemon exited 2 (its output above)",
    ]
