"""The daemon's configuration: one frozen, validated object, loaded once.

Layers, later wins: built-in defaults, then a TOML file, then `ENACTIVE_<SECTION>_<KEY>`
environment variables, then overrides (`{"section.key": value}`, e.g. from CLI flags).
Every value is checked at load; a bad one raises `ConfigError` naming `section.key`, the
value, where it came from and what is allowed. The reference is `docs/configuration.md`.

The `[model]` sizes are `processors.ModelConfig`'s: their defaults and bounds are read from
there, and `load_config` builds that config (`Config.model_config`), so whatever the model
would refuse is refused here, as a `ConfigError`, before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import itertools
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import processors

from .freshness import Freshness
from .protocol import Dims

__all__ = [
    "DEFAULT_BUCKETS",
    "EMBEDDED_DEFAULT_OVERRIDES",
    "AlignConfig",
    "BatchingConfig",
    "Config",
    "ConfigError",
    "DeviceConfig",
    "IngestConfig",
    "LogConfig",
    "LslConfig",
    "MetricsConfig",
    "ModelConfig",
    "MqttConfig",
    "OutputConfig",
    "RecordConfig",
    "SecurityConfig",
    "StateConfig",
    "SyntheticConfig",
    "load_config",
    "parse_address",
]

ENV_PREFIX = "ENACTIVE_"
ENV_CONFIG_FILE = "ENACTIVE_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SESSION_POLICIES = ("reset", "continue")
"""What a frame that starts a new session of its stream does to the stream's state."""

# What `enactive-stream run` with no arguments uses on top of the defaults.
EMBEDDED_DEFAULT_OVERRIDES: Mapping[str, object] = {
    "synthetic.streams": 64,
    "synthetic.rate_hz": 100.0,
}


class ConfigError(ValueError):
    """A configuration value is invalid."""


def parse_address(s: str) -> tuple[str, int]:
    """Split a `host:port` address; IPv6 hosts go in brackets (`[::1]:7400`).

    **Arguments:**

    - `s`: the address, e.g. `"127.0.0.1:7400"`, `"localhost:0"`, `"[::1]:7400"`.

    **Returns:**

    `(host, port)` with the brackets of an IPv6 host removed and `port` in 0..65535.

    **Raises:**

    `ValueError` when the host is empty, the port is not an integer in 0..65535, or an
    IPv6 host lacks brackets.
    """
    if not isinstance(s, str):
        raise ValueError(f"address must be a string 'host:port', got {s!r}")
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"address {s!r}: expected '[ipv6-host]:port'")
        port_text = rest[1:]
    else:
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise ValueError(f"address {s!r}: expected 'host:port'")
        if ":" in host:
            raise ValueError(f"address {s!r}: an IPv6 host needs brackets, e.g. '[::1]:7400'")
    if not host or host != host.strip() or any(c.isspace() for c in host):
        raise ValueError(f"address {s!r}: the host must be non-empty, without spaces")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {s!r}: the port must be an integer in [0, 65535]")
    return host, int(port_text)


# --- rules: one per kind of value -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Int:
    lo: int
    hi: int

    def check(self, v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not self.lo <= v <= self.hi:
            raise _Bad(f"must be an integer in [{self.lo}, {self.hi}]")
        return v


@dataclasses.dataclass(frozen=True)
class _Float:
    lo: float
    hi: float
    lo_open: bool = False

    def check(self, v: object) -> float:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            above = self.lo < v if self.lo_open else self.lo <= v
            if above and v <= self.hi:
                return float(v)
        bracket = "(" if self.lo_open else "["
        raise _Bad(f"must be a number in {bracket}{_num(self.lo)}, {_num(self.hi)}]")


@dataclasses.dataclass(frozen=True)
class _Bool:
    def check(self, v: object) -> bool:
        if not isinstance(v, bool):
            raise _Bad("must be a boolean (true or false)")
        return v


@dataclasses.dataclass(frozen=True)
class _Str:
    choices: tuple[str, ...] = ()

    def check(self, v: object) -> str:
        if self.choices and v not in self.choices:
            raise _Bad(f"must be one of {', '.join(repr(c) for c in self.choices)}")
        if not isinstance(v, str):
            raise _Bad("must be a string")
        return os.path.expanduser(v) if not self.choices else v


@dataclasses.dataclass(frozen=True)
class _Address:
    def check(self, v: object) -> str:
        if not isinstance(v, str):
            raise _Bad('must be a string "host:port" (or "" for off)')
        if v:
            try:
                parse_address(v)
            except ValueError:
                raise _Bad(
                    'must be "host:port" with a non-empty host and a port in [0, 65535] '
                    '("[::1]:7400" for IPv6), or "" for off'
                ) from None
        return v


@dataclasses.dataclass(frozen=True)
class _IntList:
    length: int | None  # exact length, or None for "non-empty, strictly increasing"
    lo: int
    hi: int

    def check(self, v: object) -> tuple[int, ...]:
        if self.length is None:
            what = f"a non-empty, strictly increasing list of integers in [{self.lo}, {self.hi}]"
        else:
            what = f"a list of {self.length} integers in [{self.lo}, {self.hi}]"
        if not isinstance(v, list | tuple) or not v:
            raise _Bad(f"must be {what}")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int) or not self.lo <= x <= self.hi:
                raise _Bad(f"must be {what}")
        if self.length is not None and len(v) != self.length:
            raise _Bad(f"must be {what}")
        if self.length is None and any(a >= b for a, b in itertools.pairwise(v)):
            fixed = _toml_value(sorted(set(v)))
            raise _Bad(f"must be {what}; unsorted or repeated, did you mean {fixed}?")
        return tuple(v)


@dataclasses.dataclass(frozen=True)
class _Networks:
    def check(self, v: object) -> tuple[str, ...]:
        what = 'must be a list of networks in CIDR notation, e.g. ["10.20.0.0/16", "fd00::/8"]'
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            raise _Bad(what)
        for x in v:
            try:
                ipaddress.ip_network(x)
            except ValueError:
                try:
                    fixed = f"; did you mean {str(ipaddress.ip_network(x, strict=False))!r}?"
                except ValueError:
                    fixed = ""
                raise _Bad(f"{what}; {x!r} is not one{fixed}") from None
        return tuple(v)


@dataclasses.dataclass(frozen=True)
class _NatsUrl:
    def check(self, v: object) -> str:
        what = (
            'must be "nats://host:port" or "tls://host:port" (several comma-separated, for a '
            'cluster), or "" for off'
        )
        if not isinstance(v, str):
            raise _Bad(what)
        for url in filter(None, (u.strip() for u in v.split(","))):
            scheme, sep, rest = url.partition("://")
            if scheme not in ("nats", "tls") or not sep or not rest or rest.startswith(":"):
                raise _Bad(what)
        return v


@dataclasses.dataclass(frozen=True)
class _Subject:
    wildcard: bool  # a filter whose last token is `>` or `*` (the stream id follows)

    def check(self, v: object) -> str:
        tokens = v.split(".") if isinstance(v, str) else []
        ok = bool(tokens) and all(t and not any(c in t for c in " \t\r\n") for t in tokens)
        if ok and self.wildcard:
            ok = tokens[-1] in (">", "*") and len(tokens) > 1
            ok = ok and not any(t in (">", "*") for t in tokens[:-1])
        elif ok:
            ok = len(tokens) == 1 and all(c.isalnum() or c in "-_" for c in tokens[0])
        if not ok or not isinstance(v, str):
            raise _Bad(
                'must be a subject filter ending in ".>" or ".*", e.g. "sensors.>"'
                if self.wildcard
                else "must be a JetStream name: letters, digits, - and _"
            )
        return v


@dataclasses.dataclass(frozen=True)
class _Instance:
    def check(self, v: object) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1024):
            return v
        raise _Bad('must be an integer in [0, 1023], or "auto" (the host name\'s ordinal)')


MODALITIES = ("sensory", "proprio", "tactile", "motor")


@dataclasses.dataclass(frozen=True)
class _Freshness:
    def check(self, v: object) -> str:
        if isinstance(v, str):
            try:
                Freshness.parse(v)
                return v
            except ValueError:
                pass
        raise _Bad('must be "all", "latest" or "max_age_ms=N" with N > 0 (milliseconds)')


@dataclasses.dataclass(frozen=True)
class _MqttUrl:
    def check(self, v: object) -> str:
        what = 'must be "mqtt://host:port" or "mqtts://host:port", or "" for off'
        if not isinstance(v, str):
            raise _Bad(what)
        if v:
            scheme, sep, rest = v.partition("://")
            host, _, port = rest.rpartition(":") if ":" in rest.lstrip("[") else (rest, "", "")
            ok = scheme in ("mqtt", "mqtts") and sep and rest and "/" not in rest
            ok = ok and bool(host or (rest and not port)) and (not port or port.isdigit())
            if not ok or (port and not 0 < int(port) < 65536):
                raise _Bad(what)
        return v


@dataclasses.dataclass(frozen=True)
class _Topic:
    """An MQTT topic filter whose last level is `#` or `+` (the stream id), or a topic
    prefix (`wildcard=False`: no wildcard at all)."""

    wildcard: bool

    def check(self, v: object) -> str:
        levels = v.split("/") if isinstance(v, str) else []
        ok = bool(levels) and all(not any(c in lv for c in "\x00 \t\r\n") for lv in levels)
        if ok and self.wildcard:
            ok = len(levels) > 1 and levels[-1] in ("#", "+")
            ok = ok and all(lv and lv not in ("#", "+") for lv in levels[:-1])
        elif ok:
            ok = all(lv and "#" not in lv and "+" not in lv for lv in levels)
        if not ok or not isinstance(v, str):
            raise _Bad(
                'must be a topic filter ending in "/#" or "/+", e.g. "sensors/#"'
                if self.wildcard
                else 'must be a topic prefix without wildcards, e.g. "moments"'
            )
        return v


@dataclasses.dataclass(frozen=True)
class _Tables:
    """A list of tables (`[[section.key]]`), each with exactly these keys' rules; keys
    marked optional may be left out."""

    keys: tuple[tuple[str, Any, bool], ...]  # (name, rule, required)
    example: str

    def check(self, v: object) -> tuple[dict[str, Any], ...]:
        if not isinstance(v, list | tuple) or not all(isinstance(t, dict) for t in v):
            raise _Bad(f"must be a list of tables, e.g. {self.example}")
        names = [k for k, _, _ in self.keys]
        out = []
        for i, table in enumerate(v):
            for key in table:
                if key not in names:
                    raise _Bad(
                        f"table {i + 1}: unknown key {key!r}; valid keys: {', '.join(names)}"
                        f"{_did_you_mean(key, names)}"
                    )
            checked = {}
            for key, rule, required in self.keys:
                if key not in table:
                    if required:
                        raise _Bad(f"table {i + 1}: {key!r} is required")
                    continue
                try:
                    checked[key] = rule.check(table[key])
                except _Bad as bad:
                    raise _Bad(f"table {i + 1}: {key} = {_toml_value(table[key])}: {bad}") from None
            out.append(checked)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class _StreamId:
    def check(self, v: object) -> str:
        if not isinstance(v, str) or not v or len(v.encode()) > 255 or not v.isprintable():
            raise _Bad("must be a stream id: 1 to 255 bytes of printable UTF-8")
        return v


@dataclasses.dataclass(frozen=True)
class _StrList:
    item: Any
    choices: tuple[str, ...] = ()

    def check(self, v: object) -> tuple[str, ...]:
        if not isinstance(v, list | tuple) or not v:
            raise _Bad("must be a non-empty list of strings")
        items = tuple(self.item.check(x) for x in v)
        if len(set(items)) != len(items):
            raise _Bad("must not repeat an entry")
        return items


@dataclasses.dataclass(frozen=True)
class _Modalities:
    def check(self, v: object) -> tuple[str, ...]:
        what = f"must be a non-empty list of modalities, in any order, from {', '.join(MODALITIES)}"
        if (
            not isinstance(v, list | tuple)
            or not v
            or not all(x in MODALITIES for x in v)
            or len(set(v)) != len(v)
        ):
            raise _Bad(what)
        return tuple(v)


_Rule = (
    _Int | _Float | _Bool | _Str | _Address | _IntList | _Networks | _NatsUrl | _Subject
    | _Freshness | _MqttUrl | _Topic | _Tables | _StreamId | _StrList | _Modalities | _Instance
)


class _Bad(Exception):
    """Internal: a rule rejected a value; `load_config` turns it into a `ConfigError`."""


def _f(default: Any, rule: _Rule) -> Any:
    return dataclasses.field(default=default, metadata={"rule": rule})


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --- sections ---------------------------------------------------------------------------

_QUEUE = _Int(1, 1 << 24)


@dataclasses.dataclass(frozen=True, slots=True)
class IngestConfig:
    """`[ingest]`: sensor listeners and the bounded ingest queue."""

    tcp: str = _f("127.0.0.1:7400", _Address())
    udp: str = _f("127.0.0.1:7400", _Address())
    max_frame_bytes: int = _f(1 << 20, _Int(64, 64 << 20))
    queue: int = _f(8192, _QUEUE)
    udp_buffer: int = _f(8192, _QUEUE)
    session_start: str = _f("reset", _Str(SESSION_POLICIES))
    max_seq_jump: int = _f(1 << 32, _Int(0, (1 << 64) - 1))
    new_streams_per_batch: int = _f(64, _Int(0, 1 << 20))
    max_connections: int = _f(4096, _Int(0, 1 << 20))
    max_connections_per_address: int = _f(1024, _Int(0, 1 << 20))
    idle_timeout_s: float = _f(600.0, _Float(0, 86400))
    frame_timeout_s: float = _f(30.0, _Float(0, 86400))
    poll_interval_ms: float = _f(1.0, _Float(0, 100))
    udp_allow: tuple[str, ...] = _f((), _Networks())
    freshness: str = _f("all", _Freshness())


@dataclasses.dataclass(frozen=True, slots=True)
class OutputConfig:
    """`[output]`: where integrated moments go."""

    tcp: str = _f("127.0.0.1:7401", _Address())
    jsonl: str = _f("", _Str())
    stdout: bool = _f(False, _Bool())
    subscriber_buffer: int = _f(4096, _QUEUE)
    max_subscribers: int = _f(256, _Int(0, 1 << 20))
    max_subscribers_per_address: int = _f(64, _Int(0, 1 << 20))
    subscriber_max_pending_bytes: int = _f(8 << 20, _Int(1 << 12, 1 << 34))
    subscriber_socket_buffer_bytes: int = _f(256 << 10, _Int(0, 1 << 28))


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsConfig:
    """`[metrics]`: the HTTP endpoint for /metrics, /healthz, /readyz."""

    listen: str = _f("127.0.0.1:9400", _Address())


DEFAULT_BUCKETS = (1, 8, 32, 64, 96, 128, 192, 256)
"""The default batch buckets. Above 32 each bucket is at most 1.5 × the one below, so a
partly filled batch pads by at most half: the step's cost grows with its rows, and on the
reference machine adding 96 and 192 to `(1, 8, 32, 64, 128, 256)` took XLA's CPU time at
half load from 0.59 to 0.44 of a core (a ~90-frame batch no longer pads to 128). Finer
buckets (16, 48, 80) gained nothing more and pushed a warm restart past 3 s
(docs/benchmarks.md)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchingConfig:
    """`[batching]`: fixed batch buckets and the batch deadline. With
    `serve_while_compiling` the daemon is ready once its first bucket (the largest) is
    compiled and compiles the others while it serves (batches use only the compiled
    ones); without, it becomes ready once every bucket is compiled."""

    buckets: tuple[int, ...] = _f(DEFAULT_BUCKETS, _IntList(None, 1, 65536))
    max_wait_ms: float = _f(0.5, _Float(0, 1000))
    adaptive: bool = _f(False, _Bool())
    slo_p99_ms: float = _f(5.0, _Float(0, 60000, lo_open=True))
    serve_while_compiling: bool = _f(True, _Bool())


_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(processors.ModelConfig)}


def _size(name: str) -> Any:
    """A `[model]` size: default and bounds are those of `processors.ModelConfig`."""
    lo, hi = processors.MODEL_BOUNDS[name]
    return _f(_MODEL_DEFAULTS[name], _IntList(2, lo, hi) if name == "som_grid" else _Int(lo, hi))


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """`[model]`: model sizes (`processors.ModelConfig`'s), seed and weights file."""

    state_dim: int = _size("state_dim")
    proprio_dim: int = _size("proprio_dim")
    tactile_dim: int = _size("tactile_dim")
    motor_dim: int = _size("motor_dim")
    retention_depth: int = _size("retention_depth")
    protention_horizon: int = _size("protention_horizon")
    hidden_dim: int = _size("hidden_dim")
    som_grid: tuple[int, int] = _size("som_grid")
    attention_heads: int = _size("attention_heads")
    seed: int = _f(0, _Int(0, (1 << 32) - 1))
    params: str = _f("", _Str())


_MODEL_SIZES = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name in _MODEL_DEFAULTS)


@dataclasses.dataclass(frozen=True, slots=True)
class StateConfig:
    """`[state]`: checkpoint directory and cadence, stream-table size."""

    dir: str = _f("", _Str())
    checkpoint_interval_s: float = _f(5.0, _Float(0, 86400, lo_open=True))
    max_streams: int = _f(4096, _Int(1, 10_000_000))
    max_known_streams: int = _f(65536, _Int(1, 100_000_000))
    stream_ttl_s: float = _f(7 * 86400.0, _Float(0, 10 * 365 * 86400))
    reclaim_idle_s: float = _f(300.0, _Float(0, 10 * 365 * 86400))
    fallback_to_previous: bool = _f(False, _Bool())


@dataclasses.dataclass(frozen=True, slots=True)
class SyntheticConfig:
    """`[synthetic]`: the built-in synthetic sensor feed (0 streams = off)."""

    streams: int = _f(0, _Int(0, 1_000_000))
    rate_hz: float = _f(100.0, _Float(0, 100_000, lo_open=True))


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceConfig:
    """`[device]`: accelerators and the persistent compilation cache."""

    count: int = _f(1, _Int(1, 4096))
    compilation_cache_dir: str = _f("", _Str())
    cpu_threads: int = _f(0, _Int(0, 4096))
    pin_threads: bool = _f(True, _Bool())


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    """`[log]`: log level and format, and the live status line."""

    level: str = _f("info", _Str(LOG_LEVELS))
    format: str = _f("text", _Str(LOG_FORMATS))
    status_interval_s: float = _f(1.0, _Float(0, 3600))


@dataclasses.dataclass(frozen=True, slots=True)
class SecurityConfig:
    """`[security]`: TLS for the listeners, client identities and their permissions
    (checked and loaded at start by `stream.security.prepare`)."""

    tls_cert_file: str = _f("", _Str())
    tls_key_file: str = _f("", _Str())
    tls_client_ca_file: str = _f("", _Str())
    auth_file: str = _f("", _Str())
    insecure: bool = _f(False, _Bool())


@dataclasses.dataclass(frozen=True, slots=True)
class NatsConfig:
    """`[nats]`: NATS JetStream ingest and moments (docs/integrations.md; the `nats`
    extra). Off while `url` is empty."""

    url: str = _f("", _NatsUrl())
    subjects: str = _f("sensors.>", _Subject(wildcard=True))
    stream: str = _f("SENSORS", _Subject(wildcard=False))
    durable: str = _f("enactive", _Subject(wildcard=False))
    consume: bool = _f(True, _Bool())
    moments_stream: str = _f("MOMENTS", _Subject(wildcard=False))
    publish_moments: bool = _f(True, _Bool())
    credentials_file: str = _f("", _Str())
    nkey_seed_file: str = _f("", _Str())
    token: str = _f("", _Str())
    user: str = _f("", _Str())
    password: str = _f("", _Str())
    tls_ca_file: str = _f("", _Str())
    tls_cert_file: str = _f("", _Str())
    tls_key_file: str = _f("", _Str())
    connect_timeout_s: float = _f(30.0, _Float(0, 3600))
    fetch_batch: int = _f(0, _Int(0, 1 << 16))
    max_ack_pending: int = _f(65536, _Int(1, 1 << 24))
    ack_wait_s: float = _f(0.0, _Float(0, 86400))
    duplicate_window_s: float = _f(120.0, _Float(1, 7 * 86400))
    storage: str = _f("file", _Str(("file", "memory")))
    replicas: int = _f(1, _Int(1, 5))
    max_age_s: float = _f(86400.0, _Float(0, 10 * 365 * 86400))
    moments_buffer: int = _f(8192, _QUEUE)
    publish_in_flight: int = _f(4096, _Int(1, 1 << 20))

    def effective_ack_wait_s(self, checkpoint_interval_s: float) -> float:
        """`ack_wait_s`, or (0) 3 × the checkpoint interval + 30 s: a frame is
        acknowledged within one interval, the checkpoint's write and the moments'
        publication, so the server never redelivers one that is on its way."""
        return self.ack_wait_s or 3 * checkpoint_interval_s + 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class RecordConfig:
    """`[record]`: write every accepted frame to a recording file (docs/recording.md).
    Off while `path` is empty."""

    path: str = _f("", _Str())


@dataclasses.dataclass(frozen=True, slots=True)
class MqttConfig:
    """`[mqtt]`: MQTT ingest and moments (docs/integrations.md; the `mqtt` extra). Off
    while `url` is empty."""

    url: str = _f("", _MqttUrl())
    topics: str = _f("sensors/#", _Topic(wildcard=True))
    qos: int = _f(1, _Int(0, 2))
    consume: bool = _f(True, _Bool())
    publish_moments: bool = _f(True, _Bool())
    moments_topic: str = _f("moments", _Topic(wildcard=False))
    moments_qos: int = _f(1, _Int(0, 2))
    moments_buffer: int = _f(8192, _QUEUE)
    client_id: str = _f("enactive-stream", _Str())
    persistent_session: bool = _f(True, _Bool())
    session_expiry_s: int = _f(86400, _Int(0, (1 << 32) - 1))
    keepalive_s: int = _f(30, _Int(1, 65535))
    protocol: str = _f("5", _Str(("5", "3.1.1")))
    connect_timeout_s: float = _f(30.0, _Float(0, 3600))
    username: str = _f("", _Str())
    password: str = _f("", _Str())
    tls_ca_file: str = _f("", _Str())
    tls_cert_file: str = _f("", _Str())
    tls_key_file: str = _f("", _Str())
    freshness: str = _f("all", _Freshness())


_LSL_OUTLET = _Tables(
    keys=(
        ("name", _Str(), True),
        ("stream_id", _StreamId(), False),
        ("modalities", _Modalities(), False),
    ),
    example='[[lsl.outlets]] name = "imu-1", modalities = ["proprio"]',
)


@dataclasses.dataclass(frozen=True, slots=True)
class LslConfig:
    """`[lsl]`: Lab Streaming Layer inlets (docs/integrations.md; the `lsl` extra). Off
    while `predicate` is empty."""

    predicate: str = _f("", _Str())
    freshness: str = _f("latest", _Freshness())
    clock_sync: str = _f("processing", _Str(("processing", "time_correction", "none")))
    dejitter: bool = _f(True, _Bool())
    chunk_samples: int = _f(1024, _Int(1, 1 << 20))
    max_buflen_s: int = _f(360, _Int(1, 86400))
    resolve_interval_s: float = _f(1.0, _Float(0.05, 3600))
    outlets: tuple[dict[str, Any], ...] = _f((), _LSL_OUTLET)


_ALIGN_BODY = _Tables(
    keys=(
        ("id", _StreamId(), True),
        ("drive", _StreamId(), True),
        ("inputs", _StrList(_StreamId()), True),
        ("tolerance_ms", _Float(0, 60000), False),
        ("max_wait_ms", _Float(0, 60000), False),
    ),
    example='[[align.bodies]] id = "arm-1", drive = "imu-1", inputs = ["touch-1"]',
)


@dataclasses.dataclass(frozen=True, slots=True)
class AlignConfig:
    """`[align]`: bodies joined from several input streams by timestamp
    (`stream.alignment`, docs/integrations.md)."""

    tolerance_ms: float = _f(10.0, _Float(0, 60000))
    max_wait_ms: float = _f(100.0, _Float(0, 60000))
    bodies: tuple[dict[str, Any], ...] = _f((), _ALIGN_BODY)


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterConfig:
    """`[cluster]`: this daemon as one of `instances` sharing the NATS frames stream's
    partitions (docs/operations.md, "Scaling out"; needs `[nats]`). Off while
    `instances` is 0."""

    instances: int = _f(0, _Int(0, 1024))
    instance: int | str = _f("auto", _Instance())
    partitions: int = _f(0, _Int(0, 4096))
    state_bucket: str = _f("ENACTIVE_STATE", _Subject(wildcard=False))


_SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "output": OutputConfig,
    "metrics": MetricsConfig,
    "batching": BatchingConfig,
    "model": ModelConfig,
    "state": StateConfig,
    "synthetic": SyntheticConfig,
    "device": DeviceConfig,
    "log": LogConfig,
    "security": SecurityConfig,
    "nats": NatsConfig,
    "record": RecordConfig,
    "mqtt": MqttConfig,
    "lsl": LslConfig,
    "align": AlignConfig,
    "cluster": ClusterConfig,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration; build it with `load_config`."""

    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    state: StateConfig = dataclasses.field(default_factory=StateConfig)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    device: DeviceConfig = dataclasses.field(default_factory=DeviceConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    nats: NatsConfig = dataclasses.field(default_factory=NatsConfig)
    record: RecordConfig = dataclasses.field(default_factory=RecordConfig)
    mqtt: MqttConfig = dataclasses.field(default_factory=MqttConfig)
    lsl: LslConfig = dataclasses.field(default_factory=LslConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    @property
    def dims(self) -> Dims:
        """Input modality sizes: `Dims(state_dim, proprio_dim, tactile_dim, motor_dim)`."""
        m = self.model
        return Dims(m.state_dim, m.proprio_dim, m.tactile_dim, m.motor_dim)

    @property
    def model_config(self) -> processors.ModelConfig:
        """The `[model]` sizes as the model takes them (`load_config` has checked that
        they are accepted); `model.seed` and `model.params` are the caller's to use."""
        return processors.ModelConfig(**{k: getattr(self.model, k) for k in _MODEL_SIZES})

    def as_dict(self) -> dict[str, dict[str, object]]:
        """Returns `{section: {key: value}}`, tuples as lists (JSON- and TOML-ready)."""
        return {
            name: {
                f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v
                for f in dataclasses.fields(section)
            }
            for name in _SECTIONS
            for section in [getattr(self, name)]
        }

    def to_toml(self) -> str:
        """Returns the effective configuration as TOML; `load_config` reads it back equal."""
        blocks = []
        for name, values in self.as_dict().items():
            lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        out = []
        for c in v:
            if c in '"\\':
                out.append("\\" + c)
            elif ord(c) < 0x20 or ord(c) == 0x7F:
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
        return '"' + "".join(out) + '"'
    return repr(v)


# --- loading ----------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load, layer and validate the configuration.

    **Arguments:**

    - `path`: a TOML file; `None` reads the file named by `ENACTIVE_CONFIG` if set, else none.
    - `env`: the environment (default `os.environ`). Only `ENACTIVE_*` keys are read, plus
        `XDG_STATE_HOME` / `XDG_CACHE_HOME` for default directories. Values are parsed as
        TOML values where possible (`"[1, 8]"` is a list, `"true"` a bool), else taken as
        strings.
    - `overrides`: `{"section.key": value}`, applied last; string values for non-string
        keys are parsed like environment values.

    **Returns:**

    A frozen `Config`, with `state.dir` and `device.compilation_cache_dir` resolved.

    **Raises:**

    `ConfigError` on a missing or unparsable file, an unknown section or key, or a bad value.
    """
    env = os.environ if env is None else env
    raw: _Raw = {name: {} for name in _SECTIONS}
    if path is None and env.get(ENV_CONFIG_FILE):
        path = env[ENV_CONFIG_FILE]
    if path is not None:
        for section, table in _read_file(path).items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{os.fspath(path)}: top-level key {section!r} must be inside a [section]; "
                    f"valid sections: {', '.join(_SECTIONS)}"
                )
            for key, value in table.items():
                _set(raw, section, key, value, f"file {os.fspath(path)}")
    for var, text in env.items():
        if var.startswith(ENV_PREFIX) and var != ENV_CONFIG_FILE:
            section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
            _set(raw, section, key, _from_text(section, key, text), f"environment {var}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if isinstance(value, str):
            value = _from_text(section, key, value)
        _set(raw, section, key, value, f"override {dotted}")
    sections = {name: _build(name, cls, raw[name]) for name, cls in _SECTIONS.items()}
    cfg = Config(**sections)
    _check_cross(cfg, raw)
    return _resolve_dirs(cfg, env)


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: invalid TOML: {exc}") from None


def _field_rule(section: str, key: str) -> _Rule | None:
    cls = _SECTIONS.get(section)
    if cls is None:
        return None
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f.metadata["rule"]
    return None


_Raw = dict[str, dict[str, tuple[object, str]]]  # section -> key -> (value, origin)


def _set(raw: _Raw, section: str, key: str, value: object, origin: str) -> None:
    if section not in _SECTIONS:
        raise ConfigError(
            f"unknown section [{section}] (from {origin}); "
            f"valid sections: {', '.join(_SECTIONS)}{_did_you_mean(section, _SECTIONS)}"
        )
    names = [f.name for f in dataclasses.fields(_SECTIONS[section])]
    if key not in names:
        raise ConfigError(
            f"unknown key {section}.{key} (from {origin}); "
            f"valid keys in [{section}]: {', '.join(names)}{_did_you_mean(key, names)}"
        )
    raw[section][key] = (value, origin)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_text(section: str, key: str, text: str) -> object:
    """Parses an env/CLI string as a TOML value; plain text stays a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    rule = _field_rule(section, key)
    if isinstance(rule, _Str | _Address) and not isinstance(value, str):
        return text  # e.g. params = 123 means the file named "123"
    return value


def _build(name: str, cls: type, given: dict[str, tuple[object, str]]) -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            value, origin = given[f.name]
            try:
                values[f.name] = f.metadata["rule"].check(value)
            except _Bad as bad:
                raise ConfigError(
                    f"{name}.{f.name} = {_toml_value(value)}: {bad} (from {origin})"
                ) from None
    return cls(**values)


def _check_cross(cfg: Config, raw: _Raw) -> None:
    largest = max(cfg.batching.buckets)
    if cfg.state.max_streams < largest:
        origin = raw["state"].get("max_streams", (None, "default"))[1]
        raise ConfigError(
            f"state.max_streams = {cfg.state.max_streams}: must be at least the largest "
            f"batching bucket, {largest} (from {origin})"
        )
    if cfg.state.max_known_streams < cfg.state.max_streams:
        origin = raw["state"].get("max_known_streams", (None, "default"))[1]
        raise ConfigError(
            f"state.max_known_streams = {cfg.state.max_known_streams}: must be at least "
            f"state.max_streams = {cfg.state.max_streams} (from {origin})"
        )
    nats = cfg.nats
    if nats.url:
        ack_wait = nats.effective_ack_wait_s(cfg.state.checkpoint_interval_s)
        if nats.publish_moments and nats.duplicate_window_s < ack_wait:
            origin = raw["nats"].get("duplicate_window_s", (None, "default"))[1]
            raise ConfigError(
                f"nats.duplicate_window_s = {_num(nats.duplicate_window_s)}: must be at least "
                f"the acknowledgement wait, {_num(ack_wait)} s (nats.ack_wait_s, by default "
                f"3 × state.checkpoint_interval_s + 30), or moments re-emitted after a crash "
                f"could be stored twice (from {origin})"
            )
        if nats.tls_key_file and not nats.tls_cert_file:
            raise ConfigError("nats.tls_key_file is set without nats.tls_cert_file")
    mqtt = cfg.mqtt
    if mqtt.url:
        if mqtt.tls_key_file and not mqtt.tls_cert_file:
            raise ConfigError("mqtt.tls_key_file is set without mqtt.tls_cert_file")
        if mqtt.persistent_session and not mqtt.client_id:
            raise ConfigError(
                'mqtt.client_id = "": a persistent session needs a client id of its own '
                "(or set mqtt.persistent_session = false)"
            )
    _check_bodies(cfg.align, raw["align"].get("bodies", (None, "default"))[1])
    _check_cluster(cfg, raw["cluster"])
    try:
        _ = cfg.model_config  # what the model refuses, across fields too
    except processors.ModelConfigError as e:
        key = e.field.partition("[")[0]
        if key not in _MODEL_SIZES:  # a size the daemon does not expose: always the default
            raise ConfigError(f"[model]: {e}") from None
        origin = raw["model"].get(key, (None, "default"))[1]
        value = _toml_value(getattr(cfg.model, key))
        reason = e.reason.replace(f"{e.owner}.", "model.")
        raise ConfigError(f"model.{key} = {value}: {reason} (from {origin})") from None


def _check_cluster(cfg: Config, raw: dict[str, tuple[object, str]]) -> None:
    """A cluster instance consumes NATS, knows its number, and has partitions to share."""
    cluster = cfg.cluster

    def origin(key: str) -> str:
        return raw.get(key, (None, "default"))[1]

    if not cluster.instances:
        default = ClusterConfig()
        given = [k for k in raw if getattr(cluster, k) != getattr(default, k)]
        if given:
            raise ConfigError(
                f"cluster.{given[0]} is set but cluster.instances is not (from "
                f"{origin(given[0])}): set it to the number of instances"
            )
        return
    if not (cfg.nats.url and cfg.nats.consume):
        raise ConfigError(
            "[cluster] shares the NATS frames stream's partitions: set nats.url (and keep "
            f"nats.consume = true) (from {origin('instances')})"
        )
    if cluster.partitions < cluster.instances:
        raise ConfigError(
            f"cluster.partitions = {cluster.partitions}: must be at least cluster.instances "
            f"= {cluster.instances}, or some instance owns none (from {origin('partitions')})"
        )
    if isinstance(cluster.instance, int) and cluster.instance >= cluster.instances:
        raise ConfigError(
            f"cluster.instance = {cluster.instance}: instances are numbered 0 to "
            f"{cluster.instances - 1} (cluster.instances = {cluster.instances}) (from "
            f"{origin('instance')})"
        )
    if not cfg.nats.subjects.endswith(".>"):
        raise ConfigError(
            f"nats.subjects = {_toml_value(cfg.nats.subjects)}: with [cluster] the frames "
            'stream is partitioned on the stream id after its prefix, e.g. "sensors.>" '
            f"(from {origin('instances')})"
        )


def _check_bodies(align: AlignConfig, origin: str) -> None:
    """Each input stream feeds one body, and no body is itself an input."""
    fed: dict[str, str] = {}
    for body in align.bodies:
        inputs = (body["drive"], *body["inputs"])
        if body["drive"] in body["inputs"]:
            raise ConfigError(
                f"align.bodies: body {body['id']!r} lists its drive {body['drive']!r} among "
                f"its inputs too (from {origin})"
            )
        for stream_id in inputs:
            if stream_id in fed:
                raise ConfigError(
                    f"align.bodies: input {stream_id!r} feeds both {fed[stream_id]!r} and "
                    f"{body['id']!r}; an input stream feeds one body (from {origin})"
                )
            fed[stream_id] = body["id"]
    for body in align.bodies:
        if body["id"] in fed:
            raise ConfigError(
                f"align.bodies: body {body['id']!r} is also an input (of "
                f"{fed[body['id']]!r}); a body's frames are not aligned again (from {origin})"
            )


def _resolve_dirs(cfg: Config, env: Mapping[str, str]) -> Config:
    def base(var: str, fallback: str) -> Path:
        xdg = env.get(var, "")
        if xdg and os.path.isabs(xdg):
            return Path(xdg)
        return Path(env.get("HOME") or Path.home()) / fallback

    state, device = cfg.state, cfg.device
    if not state.dir:
        state_dir = base("XDG_STATE_HOME", ".local/state") / "enactive-stream"
        state = dataclasses.replace(state, dir=str(state_dir))
    if not device.compilation_cache_dir:
        cache_dir = base("XDG_CACHE_HOME", ".cache") / "enactive-stream" / "jax"
        device = dataclasses.replace(device, compilation_cache_dir=str(cache_dir))
    return dataclasses.replace(cfg, state=state, device=device)
