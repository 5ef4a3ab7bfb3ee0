"""`enactive-stream`: run the daemon, send simulated sensor data, inspect, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .config import EMBEDDED_DEFAULT_OVERRIDES, ConfigError, load_config
from .failures import check_state_dir, print_error, startup_cause

__all__ = ["main"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = value.strip()
    return out


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one configuration key (repeatable)",
    )


def _load(args: argparse.Namespace, *, embedded: bool = False) -> Any:
    overrides = _overrides(args)
    if embedded:
        overrides = {**EMBEDDED_DEFAULT_OVERRIDES, **overrides}
    return load_config(args.config, overrides=overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio
    import prometheus_client

    from .daemon import Daemon

    embedded = args.config is None and not os.environ.get("ENACTIVE_CONFIG")
    config = _load(args, embedded=embedded)
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if embedded:
        print(
            f"enactive-stream: embedded default — {config.synthetic.streams} synthetic bodies "
            f"at {config.synthetic.rate_hz:g} Hz; sensors on tcp/udp {config.ingest.tcp}, "
            f"subscribers on {config.output.tcp}, metrics on http://{config.metrics.listen}"
            f"/metrics",
            file=sys.stderr,
            flush=True,
        )
    # The daemon is the whole process: leave out the `_created` series, which would double
    # the size of every scrape.
    prometheus_client.disable_created_metrics()
    try:
        check_state_dir(config.state.dir)
        daemon = Daemon(config, ready_file=args.ready_file)
        anyio.run(daemon.run)
    except BaseException as exc:
        cause = startup_cause(exc, config)
        if cause is None:
            raise
        print_error(cause)
        return 2
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    from .protocol import Dims
    from .send import send

    dims = Dims(args.state_dim, args.proprio_dim, args.tactile_dim, args.motor_dim)
    report = send(
        args.host,
        args.port,
        streams=args.streams,
        rate_hz=args.rate,
        duration_s=args.duration,
        transport=args.transport,
        dims=dims,
        seed=args.seed,
        connections=args.connections,
        prefix=args.prefix,
    )
    print(report)
    return 0


def _cmd_subscribe(args: argparse.Namespace) -> int:

    from .protocol import MomentReader, moment_to_json

    with socket.create_connection((args.host, args.port)) as sock:
        sock.sendall(f"SUB {'json' if args.format == 'json' else 'binary'} {args.glob}\n".encode())
        reader, pending, shown = MomentReader(), b"", 0
        out = sys.stdout.buffer
        while args.count == 0 or shown < args.count:
            data = sock.recv(1 << 16)
            if not data:
                break
            if data.startswith(b"ERR "):
                sys.stderr.write(data.decode(errors="replace"))
                return 1
            if args.format == "json":  # JSON lines as the daemon wrote them
                *lines, pending = (pending + data).split(b"\n")
                lines = [line + b"\n" for line in lines]
            else:
                lines = [moment_to_json(m) for m in reader.feed(data)]
            if args.count:
                lines = lines[: args.count - shown]
            shown += len(lines)
            out.write(b"".join(lines))
            out.flush()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import processors

    config = _load(args)
    processors.enable_compilation_cache(config.device.compilation_cache_dir)
    info = {"jit": processors.get_jit_info(), "config": config.as_dict()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{args.file}: ok")
    if args.show:
        print(config.to_toml())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    from .bench import BenchError, BenchSettings, format_table, run_bench, write_plot

    changes: dict[str, Any] = {}
    for flag, key in (
        ("streams", "streams"),
        ("connections", "connections"),
        ("runs", "runs"),
        ("duration", "latency_s"),
        ("soak_frames", "soak_frames"),
        ("cache_dir", "cache_dir"),
    ):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    if args.no_baseline:
        changes["baseline"] = False
    if args.adaptive:
        changes["adaptive"] = True
    if args.buckets:
        changes["buckets"] = tuple(int(b) for b in args.buckets.split(","))
    try:
        settings = BenchSettings.quick(**changes) if args.quick else BenchSettings(**changes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        result = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as e:
        print(f"enactive-stream bench: {e}", file=sys.stderr)
        return 1
    print(format_table(result))
    for path in (args.json, args.plot):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        write_plot(result, args.plot)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enactive-stream",
        description="Real-time sensor streams through ahead-of-time compiled JAX models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (no arguments: the embedded default)")
    _add_config_args(run)
    run.add_argument(
        "--ready-file", metavar="FILE", help="write the bound ports here (JSON) once ready"
    )
    run.set_defaults(fn=_cmd_run)

    send = sub.add_parser("send", help="a simulated sensor client")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=7400)
    send.add_argument("--streams", type=int, default=8)
    send.add_argument("--rate", type=float, default=100.0, help="frames/s per stream")
    send.add_argument("--duration", type=float, default=5.0, help="seconds")
    send.add_argument("--transport", choices=("tcp", "udp", "json"), default="tcp")
    send.add_argument("--connections", type=int, default=1)
    send.add_argument("--prefix", default="sim", help="stream id prefix")
    send.add_argument("--seed", type=int, default=0)
    send.add_argument("--state-dim", type=int, default=32)
    send.add_argument("--proprio-dim", type=int, default=64)
    send.add_argument("--tactile-dim", type=int, default=32)
    send.add_argument("--motor-dim", type=int, default=32)
    send.set_defaults(fn=_cmd_send)

    subscribe = sub.add_parser("subscribe", help="print the moments of matching streams")
    subscribe.add_argument("glob", nargs="?", default="*", help="stream ids to follow")
    subscribe.add_argument("--host", default="127.0.0.1")
    subscribe.add_argument("--port", type=int, default=7401)
    subscribe.add_argument(
        "--format",
        choices=("json", "binary"),
        default="json",
        help="what to ask the daemon for (printed as JSON lines either way)",
    )
    subscribe.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    subscribe.set_defaults(fn=_cmd_subscribe)

    info = sub.add_parser("info", help="JIT backend, devices and the effective configuration")
    _add_config_args(info)
    info.set_defaults(fn=_cmd_info)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.add_argument("--show", action="store_true", help="print the effective configuration")
    check.set_defaults(fn=_cmd_check_config)

    bench = sub.add_parser(
        "bench",
        help="end-to-end benchmark: kernel, throughput, latency, baseline, restart, memory",
        description="Measure the daemon end to end (docs/benchmarks.md). The kernel alone: "
        "python -m stream.bench.kernel.",
    )
    bench.add_argument("--quick", action="store_true", help="the short run (< 2 minutes)")
    bench.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency CDFs")
    bench.add_argument("--streams", type=int, help="client streams (default 1024)")
    bench.add_argument("--connections", type=int, help="client TCP connections (default 2)")
    bench.add_argument("--runs", type=int, help="throughput runs, median reported")
    bench.add_argument("--duration", type=float, help="seconds of load per latency run")
    bench.add_argument("--soak-frames", type=int, help="frames between the two RSS readings")
    bench.add_argument("--cache-dir", help="JAX compilation cache (default: the configured one)")
    bench.add_argument("--no-baseline", action="store_true", help="skip the baseline service")
    bench.add_argument(
        "--adaptive",
        action="store_true",
        help="run the daemon with adaptive batching (SLO: p99 5 ms)",
    )
    bench.add_argument("--buckets", metavar="B1,B2,…", help="the daemon's batch buckets")
    bench.set_defaults(fn=_cmd_bench)
    return parser


# --- start-up failures: one line, exit status 2 ------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A start-up failure the operator can fix (a bad configuration
    file, key or value; an unreadable or mismatched weights file; a missing device; a
    port in use; an unusable checkpoint or state directory) exits with status 2 and one
    line on stderr, `enactive-stream: error: <cause>`, instead of a traceback."""
    args = _parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        cause = startup_cause(exc)
        if cause is None:
            raise
        print_error(cause)
        return 2


if __name__ == "__main__":
    sys.exit(main())
