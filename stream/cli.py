"""`enactive-stream`: run the daemon, send simulated sensor data, inspect, benchmark.

Conventions: `--help` shows every default; `--help` and `--version` import neither JAX nor
the model (each command imports what it needs); an ordinary failure is one line on stderr,
`enactive-stream: error: <cause> (<fix>)`, with exit status 2 for a usage or configuration
error and 1 for a runtime one, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .failures import print_error, startup_cause

if TYPE_CHECKING:
    import ssl

    from .send import SendError

__all__ = ["main"]

PROG = "enactive-stream"


def _version() -> str:
    try:
        return importlib.metadata.version("enactive-stream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: …)` to the help of every option that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = action.default is not None and action.default != argparse.SUPPRESS
        if not shown or action.nargs == 0 or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line, `enactive-stream: error: <what> (see
    enactive-stream <command> --help)`, and exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see {self.prog} --help)")
        self.exit(2)


def _count(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _number(text, int, lo=1)


def _count_or_zero(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _number(text, int, lo=0)


def _positive(text: str) -> float:
    """An argparse type: a number > 0."""
    return _number(text, float, lo=0, lo_open=True)


def _non_negative(text: str) -> float:
    """An argparse type: a number >= 0."""
    return _number(text, float, lo=0)


def _port(text: str) -> int:
    """An argparse type: a TCP/UDP port, 1–65535."""
    return _number(text, int, lo=1, hi=65535)


def _number(
    text: str, kind: type, *, lo: float, hi: float | None = None, lo_open: bool = False
) -> Any:
    what = "an integer" if kind is int else "a number"
    if hi is not None:
        what += f" in [{lo:g}, {hi:g}]"
    else:
        what += f" {'>' if lo_open else '>='} {lo:g}"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    above = value > lo if lo_open else value >= lo  # (False for NaN)
    if not above or (hi is not None and not value <= hi):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def bucket_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated batch sizes, each >= 1."""
    return tuple(_count(b) for b in text.split(","))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .config import ConfigError

    out: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"--set {item!r}: expected SECTION.KEY=VALUE (see {PROG} {args.command} --help)"
            )
        out[key.strip()] = value.strip()
    if getattr(args, "log_format", None) is not None:
        out["log.format"] = args.log_format
    if getattr(args, "record", None):
        out["record.path"] = args.record
    return out


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="TOML configuration file (default: $ENACTIVE_CONFIG)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one configuration key (repeatable)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of `run` (and `record`)."""
    _add_config_args(p)
    p.add_argument(
        "--ready-file", metavar="FILE", help="write the bound ports here (JSON) once ready"
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text or one JSON object each; overrides log.format "
        "(default: the configured one, text)",
    )
    p.add_argument(
        "--discard-checkpoint",
        action="store_true",
        help="move the checkpoint files in state.dir aside (renamed with a timestamp, never "
        "deleted) and start every stream fresh",
    )


def _add_client_security_args(p: argparse.ArgumentParser) -> None:
    """The TLS and token options of the sensor clients (`send`, `replay`)."""
    p.add_argument(
        "--tls", action="store_true", help="speak TLS 1.3 (implied by --ca, --cert; TCP only)"
    )
    p.add_argument("--ca", metavar="FILE", help="CA certificate(s) to verify the daemon with")
    p.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help="its private key (default: in --cert)")
    p.add_argument(
        "--token", help="authenticate with this token (an AUTH line before the first frame)"
    )


def _load(args: argparse.Namespace, *, embedded: bool = False) -> Any:
    from .config import EMBEDDED_DEFAULT_OVERRIDES, load_config

    overrides = _overrides(args)
    if embedded:
        overrides = {**EMBEDDED_DEFAULT_OVERRIDES, **overrides}
    return load_config(args.config, overrides=overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio
    import prometheus_client

    from .daemon import Daemon
    from .failures import check_state_dir
    from .logs import setup_logging

    embedded = args.config is None and not os.environ.get("ENACTIVE_CONFIG")
    config = _load(args, embedded=embedded)
    setup_logging(config.log)
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
        daemon = Daemon(
            config, ready_file=args.ready_file, discard_checkpoint=args.discard_checkpoint
        )
        anyio.run(daemon.run)
    except BaseException as exc:
        cause = startup_cause(exc, config)
        if cause is None:
            raise
        print_error(cause)
        return 2
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    import ssl

    from .protocol import Dims
    from .send import SendError, send

    refusal = (
        "--transport udp carries no TLS and no token: use --transport tcp or json, or drop "
        f"--tls, --ca, --cert, --key and --token (see {PROG} send --help)"
        if args.transport == "udp"
        else None
    )
    context, status = _client_tls(args, refusal)
    if status is not None:
        return status
    dims = Dims(args.state_dim, args.proprio_dim, args.tactile_dim, args.motor_dim)
    try:
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
            tls=context,
            token=args.token,
        )
    except ssl.SSLError as e:  # (before ValueError: a certificate error is both)
        print_error(
            f"TLS with {args.host}:{args.port}: {e} (check --ca, --cert, --key; send needs "
            "a daemon speaking TLS 1.3)"
        )
        return 1
    except ValueError as e:
        print_error(f"{e} (see {PROG} send --help)")
        return 2
    except SendError as e:
        print_error(_send_failure(e, args))
        return 1
    except OSError as e:
        print_error(f"{_connect_failure(args.host, args.port, e)} (is `enactive-stream run` up?)")
        return 1
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(f"enactive-stream: {report.summary()}")
    return 1 if report.rejected or (args.transport != "udp" and not report.complete) else 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import ssl

    from .jetstream import NatsError
    from .recording import RecordingError, RecordingReader
    from .replay import ReplayUsageError, parse_target, replay
    from .send import SendError

    try:
        target = parse_target(args.to)
    except ReplayUsageError as e:
        return _usage_error(f"{e} (see {PROG} replay --help)")
    refusal = (
        f"--to {target.scheme}://… takes no --tls, --ca, --cert, --key or --token here: "
        f"replay to tcp://…, or drop them (see {PROG} replay --help)"
        if target.scheme != "tcp"
        else None
    )
    context, status = _client_tls(args, refusal)
    if status is not None:
        return status
    try:
        reader = RecordingReader(args.file)
    except RecordingError as e:
        return _usage_error(f"{e} (is it a recording? docs/recording.md)")
    except OSError as e:
        return _usage_error(f"cannot read {args.file}: {e.strerror or e}")
    speed = None if args.as_fast_as_possible else args.speed
    host, port = target.host, target.port
    with reader:
        try:
            report = replay(
                reader,
                target,
                speed=speed,
                tls=context,
                token=args.token,
                subject_prefix=args.subject_prefix,
            )
        except ssl.SSLError as e:
            print_error(
                f"TLS with {host}:{port}: {e} (check --ca, --cert, --key; replay needs a "
                "daemon speaking TLS 1.3)"
            )
            return 1
        except ValueError as e:
            return _usage_error(f"{e} (see {PROG} replay --help)")
        except SendError as e:
            print_error(_send_failure(e, args))
            return 1
        except OSError as e:
            print_error(f"{_connect_failure(host, port, e)} (is `enactive-stream run` up?)")
            return 1
        except NatsError as e:
            print_error(str(e))
            return 1
    if reader.ignored:  # what a crash mid-write leaves: not an error
        print(f"{PROG}: note: {reader.tail()}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(f"{PROG}: {report.summary()}")
    return 1 if report.rejected or (target.scheme == "tcp" and not report.complete) else 0


def _client_tls(
    args: argparse.Namespace, refusal: str | None
) -> tuple[ssl.SSLContext | None, int | None]:
    """A sensor client's `--tls`, `--ca`, `--cert`, `--key`, `--token` (`send`, `replay`):
    `(context, None)` — the TLS context, None for plain — or `(None, status)` once one line
    said why not: `refusal` (the transport takes none of them; None: it does) or a file
    that cannot be used."""
    tls = bool(args.tls or args.ca or args.cert)
    if refusal is not None and (tls or args.key or args.token is not None):
        return None, _usage_error(refusal)
    if not tls:
        return None, None
    context, cause = _client_context(args.ca, args.cert, args.key)
    if context is None:
        print_error(f"{cause} (check --ca, --cert, --key)")
        return None, 1
    return context, None


def _client_context(
    ca: str | None, cert: str | None, key: str | None
) -> tuple[ssl.SSLContext | None, str]:
    """`send`'s TLS client context from `--ca`, `--cert`, `--key` (TLS 1.3 at least), and
    `""`; or None, and why a file cannot be used."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        return None, f"--ca {ca}: {e.strerror or e}"
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # (to half-close: stream.tls_client)
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            return None, f"--cert {cert}, --key {key or '(in --cert)'}: {e.strerror or e}"
    return context, ""


def _send_failure(e: SendError, args: argparse.Namespace) -> str:
    """The line for a `SendError` of a sensor client (`send`, `replay`): the cause, and
    what to check given its options."""
    tls = bool(args.tls or args.ca or args.cert)
    credentials = bool(args.token or args.cert)
    if e.refused is not None and not credentials:
        return f"the daemon requires authentication: {e.refused} (--token, or --cert and --key)"
    if e.refused is not None:
        return f"{e} (check --token, --cert and --key)"
    if not tls:
        return f"{e} (does it require TLS? --tls, --ca)"
    return f"{e} (does it require a client certificate, --cert and --key? is it stopping?)"


def _connect_failure(host: str, port: int, e: OSError) -> str:
    return f"cannot reach {host}:{port}: {(e.strerror or str(e)).lower()}"


def _cmd_subscribe(args: argparse.Namespace) -> int:
    from .protocol import MomentReader, moment_to_json

    timeout = args.timeout if args.timeout > 0 else None
    try:
        sock = socket.create_connection((args.host, args.port), timeout=timeout)
    except OSError as e:
        print_error(f"{_connect_failure(args.host, args.port, e)} (is `enactive-stream run` up?)")
        return 1
    if args.tls or args.ca or args.cert:
        import ssl

        try:
            context = ssl.create_default_context(cafile=args.ca)
            if args.cert:
                context.load_cert_chain(args.cert, args.key)
            sock = context.wrap_socket(sock, server_hostname=args.host)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            print_error(f"TLS with {args.host}:{args.port}: {e} (check --ca, --cert, --key)")
            return 1
    with sock:
        hello = f"AUTH {args.token}\n" if args.token else ""
        fmt = "json" if args.format == "json" else "binary"
        sock.sendall(f"{hello}SUB {fmt} {args.glob}\n".encode())
        reader, pending, shown = MomentReader(), b"", 0
        out = sys.stdout.buffer
        while args.count == 0 or shown < args.count:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                print_error(
                    f"no moment of {args.glob!r} within {args.timeout:g} s "
                    "(is anything sending to those streams?)"
                )
                return 1
            except OSError as e:
                print_error(f"{args.host}:{args.port}: {(e.strerror or str(e)).lower()}")
                return 1
            if not data:
                break
            if data.startswith(b"ERR "):
                print_error(data.decode(errors="replace").strip())
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
    info = {"version": _version(), "jit": processors.get_jit_info(), "config": config.as_dict()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_config
    from .security import check_policy

    config = load_config(args.file)
    check_policy(config)  # the exposure policy `run` applies (the files are read by `run`)
    print(f"{args.file}: ok")
    if args.show:
        print(config.to_toml())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchError, BenchSettings, format_table, run_bench, write_plot

    changes: dict[str, Any] = {}
    for flag, key in (
        ("streams", "streams"),
        ("connections", "connections"),
        ("runs", "runs"),
        ("duration", "latency_s"),
        ("soak_frames", "soak_frames"),
        ("cache_dir", "cache_dir"),
        ("buckets", "buckets"),
    ):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    if args.no_baseline:
        changes["baseline"] = False
    if args.adaptive:
        changes["adaptive"] = True
    if args.fleet + args.nats + args.cluster > 1:
        return _usage_error(
            f"--fleet, --nats and --cluster are separate runs (see {PROG} bench --help)"
        )
    if args.cluster:
        return _cmd_bench_cluster(args)
    if args.fleet:
        return _cmd_bench_fleet(args, changes)
    if args.nats:
        return _cmd_bench_nats(args, changes)
    try:
        settings = BenchSettings.quick(**changes) if args.quick else BenchSettings(**changes)
    except ValueError as e:
        return _usage_error(f"{e} (see {PROG} bench --help)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return _usage_error("--plot needs matplotlib (pip install 'enactive-stream[bench]')")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and (cause := _unwritable(path)):
            return _usage_error(f"{flag} {path}: {cause}")
    try:
        result = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as e:
        cause, _, output = str(e).partition("\n")
        if output.strip():  # the failed service's own output, then the one-line cause
            sys.stderr.write(output.rstrip() + "\n")
            cause = f"{cause.rstrip(': ')} (its output above)"
        print_error(f"bench: {cause}")
        return 1
    print(format_table(result))
    try:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        if args.plot:
            write_plot(result, args.plot)
    except OSError as e:
        print_error(f"bench: cannot write {e.filename}: {e.strerror or e}")
        return 1
    return _bench_status(result, report_only=args.report_only)


def _cmd_bench_fleet(args: argparse.Namespace, changes: dict[str, Any]) -> int:
    """`bench --fleet`: the kernel phase and the fleet scenarios (docs/benchmarks.md)."""
    from .bench import BenchSettings, format_table
    from .bench.scenarios import format_paced_table, run_fleet_bench
    from .bench.settings import FleetSettings

    if args.plot:
        return _usage_error(f"--plot draws the classic run only (see {PROG} bench --help)")
    fleet: dict[str, Any] = {}
    for flag, key in (
        ("fleet_sensors", "sensors"),
        ("fleet_rate", "rate_hz"),
        ("fleet_s", "duration_s"),
        ("runs", "runs"),
        ("scenarios", "scenarios"),
    ):
        if getattr(args, flag) is not None:
            fleet[key] = getattr(args, flag)
    changes.pop("runs", None)  # runs per scenario (closed loop: throughput and latency)
    try:
        settings = BenchSettings.quick(**changes) if args.quick else BenchSettings(**changes)
        sizes = FleetSettings.quick(**fleet) if args.quick else FleetSettings(**fleet)
    except ValueError as e:
        return _usage_error(f"{e} (see {PROG} bench --help)")
    if args.json and (cause := _unwritable(args.json)):
        return _usage_error(f"--json {args.json}: {cause}")
    return _bench_mode(
        args,
        lambda log: run_fleet_bench(settings, sizes, log=log),
        (format_table, format_paced_table),
    )


def _cmd_bench_nats(args: argparse.Namespace, changes: dict[str, Any]) -> int:
    """`bench --nats`: NATS JetStream ingest → moments against TCP (docs/benchmarks.md)."""
    from .bench import BenchSettings, format_table
    from .bench.broker import nats_missing
    from .bench.natsbench import run_nats_bench
    from .bench.settings import NatsBenchSettings

    if args.plot:
        return _usage_error(f"--plot draws the classic run only (see {PROG} bench --help)")
    missing = nats_missing()
    if missing:
        return _usage_error(missing)
    nats: dict[str, Any] = {}
    if "runs" in changes:
        nats["runs"] = changes.pop("runs")
    try:
        settings = BenchSettings.quick(**changes) if args.quick else BenchSettings(**changes)
        sizes = NatsBenchSettings.quick(**nats) if args.quick else NatsBenchSettings(**nats)
    except ValueError as e:
        return _usage_error(f"{e} (see {PROG} bench --help)")
    if args.json and (cause := _unwritable(args.json)):
        return _usage_error(f"--json {args.json}: {cause}")
    # (the target is reported, not an exit status)
    return _bench_mode(args, lambda log: run_nats_bench(settings, sizes, log=log), (format_table,))


def _cmd_bench_cluster(args: argparse.Namespace) -> int:
    """`bench --cluster`: scaled out over NATS JetStream (docs/benchmarks.md)."""
    from .bench.broker import nats_missing
    from .bench.cluster import ClusterBenchSettings, format_cluster_table, run_cluster_bench

    if args.plot:
        return _usage_error(f"--plot draws the classic run only (see {PROG} bench --help)")
    missing = nats_missing()
    if missing:
        return _usage_error(missing)
    given = {"runs": args.runs, "streams": args.streams, "cache_dir": args.cache_dir}
    try:
        settings = ClusterBenchSettings.of(quick=args.quick, **given)
    except ValueError as e:
        return _usage_error(f"{e} (see {PROG} bench --help)")
    if args.json and (cause := _unwritable(args.json)):
        return _usage_error(f"--json {args.json}: {cause}")
    return _bench_mode(
        args,
        lambda log: asyncio.run(run_cluster_bench(settings, log)),
        (format_cluster_table,),
    )


def _bench_mode(
    args: argparse.Namespace,
    run: Callable[[Callable[[str], None]], dict[str, Any]],
    tables: Sequence[Callable[[dict[str, Any]], str]],
) -> int:
    """Run a `bench --fleet` / `--nats` mode (`run(log)`), progress lines on stderr; print
    its `tables`, write `--json`; 0 once it ran, 1 (one line) when it could not."""
    from .bench import BenchError

    try:
        result = run(lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as e:
        cause, _, output = str(e).partition("\n")
        if output.strip():
            sys.stderr.write(output.rstrip() + "\n")
            cause = f"{cause.rstrip(': ')} (its output above)"
        print_error(f"bench: {cause}")
        return 1
    for table in tables:
        print(table(result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as e:
            print_error(f"bench: cannot write {e.filename}: {e.strerror or e}")
            return 1
    return 0


def _scenarios(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated fleet scenario names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    known = ("default", "tcp-fleet", "udp-fleet", "closed-loop")
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(known)}")
    return names


def _usage_error(cause: str) -> int:
    print_error(cause)
    return 2


def _unwritable(path: str) -> str | None:
    """Why a file cannot be written at `path` (its directory is created), or None."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"cannot create {directory}: {e.strerror or e}"
    if os.path.isdir(path):
        return "is a directory"
    if not os.access(directory, os.W_OK):
        return f"{directory} is not writable"
    return None


def _bench_status(result: dict[str, Any], *, report_only: bool) -> int:
    """1 when a measured target of `result["targets"]` was missed (and not `report_only`),
    else 0; a miss is reported on stderr either way."""
    missed = [
        f"{name} = {t['value']:.3g} (want {t['op']} {t['target']:g})"
        for name, t in result["targets"].items()
        if t["met"] is False
    ]
    if not missed:
        return 0
    if report_only:
        print(f"{PROG}: targets missed (--report-only): {'; '.join(missed)}", file=sys.stderr)
        return 0
    print_error(f"bench: targets missed: {'; '.join(missed)} (--report-only to exit 0)")
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Real-time sensor streams through ahead-of-time compiled JAX models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (no arguments: the embedded default)")
    _add_run_args(run)
    run.add_argument(
        "--record",
        metavar="FILE",
        help="append every accepted frame to this recording (docs/recording.md); "
        "overrides record.path",
    )
    run.set_defaults(fn=_cmd_run, cmd_parser=run)

    record = sub.add_parser(
        "record",
        help="run the daemon, appending every accepted frame to a recording",
        description="`run` with record.path = FILE: every frame the daemon accepts (TCP, "
        "UDP, synthetic...) is appended to FILE, in the order it is stepped; "
        "`enactive-stream replay FILE` feeds it back (docs/recording.md).",
    )
    record.add_argument("record", metavar="FILE", help="the recording (created or appended to)")
    _add_run_args(record)
    record.set_defaults(fn=_cmd_run, cmd_parser=record)

    replay = sub.add_parser(
        "replay",
        help="send a recording back to a daemon, frame for frame",
        description="Send every frame of a recording to a daemon's sensor listener, byte "
        "for byte and in order, at the recorded pace (--speed) or as fast as it takes them; "
        "exit status 1 if the daemon rejected any (docs/recording.md).",
    )
    replay.add_argument("file", metavar="FILE", help="the recording")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=_positive,
        default=1.0,
        help="replay this many times faster than recorded (0.5: half as fast)",
    )
    pace.add_argument(
        "--as-fast-as-possible",
        action="store_true",
        help="no pacing: as fast as the daemon takes the frames",
    )
    replay.add_argument(
        "--to",
        default="tcp://127.0.0.1:7400",
        metavar="URL",
        help="the daemon's sensor listener, tcp://HOST:PORT or udp://HOST:PORT (TCP counts "
        "every rejection; UDP gets no replies), or a NATS server, nats://HOST:PORT (frames "
        "published to JetStream; the nats extra)",
    )
    replay.add_argument(
        "--subject-prefix",
        default="sensors.",
        metavar="PREFIX",
        help="with nats://: publish a frame of stream S to PREFIX + S (default: sensors.)",
    )
    replay.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_client_security_args(replay)
    replay.set_defaults(fn=_cmd_replay, cmd_parser=replay)

    send = sub.add_parser("send", help="a simulated sensor client")
    send.add_argument("--host", default="127.0.0.1", help="the daemon's address")
    send.add_argument("--port", type=_port, default=7400, help="the daemon's ingest port")
    send.add_argument("--streams", type=_count, default=8, help="simulated bodies")
    send.add_argument("--rate", type=_positive, default=100.0, help="frames/s per stream")
    send.add_argument("--duration", type=_non_negative, default=5.0, help="seconds")
    send.add_argument(
        "--transport", choices=("tcp", "udp", "json"), default="tcp", help="wire format"
    )
    send.add_argument("--connections", type=_count, default=1, help="TCP connections")
    send.add_argument("--prefix", default="sim", help="stream id prefix")
    send.add_argument("--seed", type=int, default=0, help="seed of the simulated bodies")
    for name, default in (("state", 32), ("proprio", 64), ("tactile", 32), ("motor", 32)):
        send.add_argument(
            f"--{name}-dim", type=_count, default=default, help=f"{name} values per frame"
        )
    send.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_client_security_args(send)
    send.set_defaults(fn=_cmd_send, cmd_parser=send)

    subscribe = sub.add_parser("subscribe", help="print the moments of matching streams")
    subscribe.add_argument("glob", nargs="?", default="*", help="stream ids to follow")
    subscribe.add_argument("--host", default="127.0.0.1", help="the daemon's address")
    subscribe.add_argument("--port", type=_port, default=7401, help="the daemon's output port")
    subscribe.add_argument(
        "--format",
        choices=("json", "binary"),
        default="json",
        help="what to ask the daemon for (printed as JSON lines either way)",
    )
    subscribe.add_argument(
        "--count", type=_count_or_zero, default=0, help="stop after this many (0: never)"
    )
    subscribe.add_argument(
        "--timeout",
        type=_non_negative,
        default=0.0,
        help="give up (exit 1) after this many seconds without a moment (0: wait forever)",
    )
    subscribe.add_argument("--tls", action="store_true", help="speak TLS (implied by --ca, --cert)")
    subscribe.add_argument(
        "--ca", metavar="FILE", help="CA certificate(s) to verify the daemon with"
    )
    subscribe.add_argument("--cert", metavar="FILE", help="client certificate (PEM)")
    subscribe.add_argument("--key", metavar="FILE", help="its private key (default: in --cert)")
    subscribe.add_argument(
        "--token", help="authenticate with this token (an AUTH line before the SUB line)"
    )
    subscribe.set_defaults(fn=_cmd_subscribe, cmd_parser=subscribe)

    info = sub.add_parser("info", help="JIT backend, devices and the effective configuration")
    _add_config_args(info)
    info.set_defaults(fn=_cmd_info, cmd_parser=info)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", help="the TOML file")
    check.add_argument("--show", action="store_true", help="print the effective configuration")
    check.set_defaults(fn=_cmd_check_config, cmd_parser=check)

    bench = sub.add_parser(
        "bench",
        help="end-to-end benchmark: kernel, throughput, latency, baseline, restart, memory",
        description="Measure the daemon end to end (docs/benchmarks.md). The kernel alone: "
        "python -m stream.bench.kernel. Exit status 1 when a target is missed "
        "(--report-only: 0).",
    )
    bench.add_argument("--quick", action="store_true", help="the short run (< 2 minutes)")
    bench.add_argument(
        "--report-only", action="store_true", help="exit 0 even when a target is missed"
    )
    bench.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw throughput and latency CDFs")
    bench.add_argument("--streams", type=_count, help="client streams (default: 1024)")
    bench.add_argument("--connections", type=_count, help="client TCP connections (default: 2)")
    bench.add_argument(
        "--runs",
        type=_count,
        help="throughput runs, median reported (default: 5; --quick 3); --fleet: runs per "
        "scenario (default: 3); --nats: runs of every phase (default: 3; --quick 2)",
    )
    bench.add_argument(
        "--duration",
        type=_positive,
        help="seconds of load per latency run (default: 5; --quick 2)",
    )
    bench.add_argument(
        "--soak-frames",
        type=_count_or_zero,
        help="frames between the two RSS readings (default: 1000000; --quick 100000)",
    )
    bench.add_argument("--cache-dir", help="JAX compilation cache (default: the configured one)")
    bench.add_argument("--no-baseline", action="store_true", help="skip the baseline service")
    bench.add_argument(
        "--adaptive",
        action="store_true",
        help="run the daemon with adaptive batching (SLO: p99 5 ms)",
    )
    bench.add_argument(
        "--buckets",
        type=bucket_list,
        metavar="B1,B2,…",
        help="the daemon's batch buckets (default: 1,8,32,64,96,128,192,256)",
    )
    bench.add_argument(
        "--fleet",
        action="store_true",
        help="the fleet scenarios instead: daemon CPU per frame under default, tcp-fleet, "
        "udp-fleet and closed-loop loads, against the compiled step (--quick: no closed-loop)",
    )
    bench.add_argument(
        "--fleet-sensors", type=_count, help="--fleet: sensors of tcp-fleet/udp-fleet (1000)"
    )
    bench.add_argument(
        "--fleet-rate", type=_positive, metavar="HZ", help="--fleet: frames/s per sensor (25)"
    )
    bench.add_argument(
        "--fleet-s",
        type=_positive,
        metavar="SECONDS",
        help="--fleet: measured seconds per run, after 1 s of warm-up (10; --quick 3)",
    )
    bench.add_argument(
        "--scenarios",
        type=_scenarios,
        metavar="A,B,…",
        help="--fleet: which of default, tcp-fleet, udp-fleet, closed-loop (all; --quick: "
        "not closed-loop)",
    )
    bench.add_argument(
        "--nats",
        action="store_true",
        help="NATS JetStream ingest → moments published, exactly once, against the TCP "
        "path: max frames/s, latency at half load, ack lag (a nats-server of its own)",
    )
    bench.add_argument(
        "--cluster",
        action="store_true",
        help="scaled out over NATS JetStream (a 3-node nats-server cluster of its own): "
        "partition balance, CPU per frame per instance for 1, 2 and 3 instances, failover "
        "time after a SIGKILL (--runs, --quick; --streams: per instance)",
    )
    bench.set_defaults(fn=_cmd_bench, cmd_parser=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A usage error (a bad flag or value) and a start-up failure the
    operator can fix (a bad configuration file, key or value; an unreadable or mismatched
    weights file; a missing device; a port in use; an unusable checkpoint or state
    directory) exit with status 2 and one line on stderr, `enactive-stream: error:
    <cause>`, instead of a traceback; the commands' runtime failures (nothing listening,
    a failed benchmark) are one such line too, with status 1."""
    args, unknown = _parser().parse_known_args(argv)
    if unknown:  # name the command's own --help, not the program's
        args.cmd_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
