"""Connecting to NATS and setting up the JetStream streams the daemon uses (the optional
extra `nats`, client `nats-py`).

The NATS source (`stream.sources.nats`) and sink (`stream.sinks.nats`) each hold one
connection made here. nats-py reconnects by itself once connected (with an exponential
backoff per server, `_backoff`, without limit) and resubscribes; the first connection is
retried every `RECONNECT_WAIT_S` for up to `NatsSettings.connect_timeout_s`, so a daemon
started beside its broker waits for it, and one pointed at nothing (or refused its
credentials) stops with one line.

Both streams are created if absent, with the settings below, or used as they are when
their settings are compatible (`ensure_stream`):

| setting | frames stream (`nats.stream`) | moments stream (`nats.moments_stream`) |
|---|---|---|
| subjects | `nats.subjects` (`sensors.>`) | `moments.>` |
| storage, replicas | `nats.storage` (file), `nats.replicas` (1) | the same |
| retention, discard | limits, old | limits, old |
| max age | `nats.max_age_s` (24 h) | the same |
| duplicate window | `nats.duplicate_window_s` (120 s) | the same |

An existing stream is incompatible when its subjects do not cover the ones the daemon
needs, or the moments stream's duplicate window is shorter than `duplicate_window_s`
(moments re-emitted after a crash would then be stored twice).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

__all__ = [
    "MOMENT_SUBJECT_PREFIX",
    "NatsError",
    "NatsSettings",
    "connect",
    "ensure_stream",
    "require_nats",
    "subject_covers",
]

log = logging.getLogger(__name__)

MOMENT_SUBJECT_PREFIX = "moments."
"""Moments of stream `s` are published to `moments.<s>`."""
RECONNECT_WAIT_S = 0.5
"""nats-py's wait between attempts at the first connection."""
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0
"""Reconnecting: the wait before the n-th attempt at a server is `FIRST_BACKOFF_S` ·
2ⁿ⁻¹, at most `MAX_BACKOFF_S` (the first attempt at once); the server tried is the one
with the fewest failed attempts."""


def _backoff(servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
    """nats-py's `reconnect_to_server_handler`: which server to try next, and after how
    long (an exponential backoff per server)."""
    server = min(servers, key=lambda s: s.reconnects)
    n = server.reconnects
    return server, 0.0 if n == 0 else min(FIRST_BACKOFF_S * 2 ** (n - 1), MAX_BACKOFF_S)


class NatsError(Exception):
    """A NATS set-up failure the operator must fix (one line: no server, bad
    credentials, an incompatible existing stream, the extra not installed)."""


def require_nats() -> None:
    """Raise `NatsError` when the `nats` extra is not installed."""
    try:
        import nats  # noqa: F401
    except ImportError:
        raise NatsError(
            "the NATS source and sink need the nats extra: pip install 'enactive-stream[nats]'"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class NatsSettings:
    """What connecting and the streams are set up from (the `[nats]` section).

    - `url`: `nats://host:port` or `tls://host:port` (several, comma-separated, for a
        cluster).
    - `credentials_file`, `token`, `nkey_seed_file`, `user`, `password`: credentials
        ("" for none).
    - `tls_ca_file`, `tls_cert_file`, `tls_key_file`: TLS (a `tls://` URL, or a CA file,
        turns it on).
    - `connect_timeout_s`: how long the first connection is retried.
    """

    url: str = "nats://127.0.0.1:4222"
    credentials_file: str = ""
    token: str = ""
    nkey_seed_file: str = ""
    user: str = ""
    password: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    connect_timeout_s: float = 30.0
    storage: str = "file"
    replicas: int = 1
    max_age_s: float = 86400.0
    duplicate_window_s: float = 120.0

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def tls_context(self) -> ssl.SSLContext | None:
        if not (
            self.tls_ca_file
            or self.tls_cert_file
            or any(s.startswith("tls://") for s in self.servers)
        ):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file or None)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file or None)
        return context


async def connect(
    settings: NatsSettings,
    *,
    name: str,
    on_state: Callable[[bool], None] = lambda up: None,
) -> Client:
    """A connection, retried for up to `connect_timeout_s`; `on_state(up)` is called on
    every disconnection (False) and reconnection (True) afterwards.

    **Raises:** `NatsError` once the time is up (the last error in its one line)."""
    require_nats()
    import nats

    failure = ["no answer"]
    scope = anyio.CancelScope(deadline=anyio.current_time() + settings.connect_timeout_s)

    async def disconnected() -> None:
        on_state(False)

    async def reconnected() -> None:
        on_state(True)

    async def error(e: Exception) -> None:
        failure[0] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        log.debug("nats (%s): %s", name, failure[0])
        if _is_auth_error(e):
            scope.cancel()  # retrying will not help

    options: dict[str, Any] = {
        "servers": settings.servers,
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # also while connecting the first time
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "reconnect_to_server_handler": _backoff,
        "connect_timeout": 2,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
    }
    try:
        tls = settings.tls_context()
    except (OSError, ssl.SSLError) as e:
        raise NatsError(f"nats TLS files: {e}") from None
    if tls is not None:
        options["tls"] = tls
    if settings.credentials_file:
        options["user_credentials"] = settings.credentials_file
    if settings.nkey_seed_file:
        options["nkeys_seed"] = settings.nkey_seed_file
    if settings.token:
        options["token"] = settings.token
    if settings.user:
        options["user"], options["password"] = settings.user, settings.password
    with scope:
        nc = await nats.connect(**options)
        on_state(True)
        return nc
    raise NatsError(f"cannot connect to NATS at {settings.url}: {failure[0]}")


def _is_auth_error(e: Exception) -> bool:
    text = str(e).lower()
    return "authorization" in text or "authentication" in text


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether every subject matching `subject` (itself possibly with wildcards) also
    matches `pattern`: `sensors.>` covers `sensors.>` and `sensors.*`; `sensors.*` does
    not cover `sensors.>`."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if token == "*":
            if s[i] == ">":
                return False
            continue
        if token != s[i]:
            return False
    return len(p) == len(s)


async def ensure_stream(
    js: JetStreamContext,
    name: str,
    subjects: list[str],
    settings: NatsSettings,
    *,
    check_duplicate_window: bool,
    transform: tuple[str, str] | None = None,
) -> bool:
    """Create the stream `name` over `subjects` if it is absent (True), or check that the
    existing one is compatible (False). `transform`: the subject transform `(source,
    destination)` the stream applies to what it stores (the partitions of a scaled-out
    deployment, `stream.partitions`); an existing stream must have the same one (or
    none, without `transform`).

    **Raises:** `NatsError` for an incompatible existing stream, or a failure to create."""
    from nats.js import api
    from nats.js.errors import APIError, NotFoundError

    try:
        info = await js.stream_info(name)
    except NotFoundError:
        config = api.StreamConfig(
            name=name,
            subjects=subjects,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            storage=api.StorageType(settings.storage),
            num_replicas=settings.replicas,
            max_age=settings.max_age_s,
            duplicate_window=settings.duplicate_window_s,
            subject_transform=api.SubjectTransform(*transform) if transform else None,
        )
        try:
            await js.add_stream(config)
        except APIError as e:
            raise NatsError(f"cannot create JetStream stream {name}: {e.description}") from None
        return True
    have = info.config.subjects or []
    missing = [s for s in subjects if not any(subject_covers(h, s) for h in have)]
    if missing:
        raise NatsError(
            f"JetStream stream {name} exists with subjects {have}, which do not cover "
            f"{missing}: change nats.subjects or the stream"
        )
    mapped = info.config.subject_transform
    pair = (mapped.src, mapped.dest) if mapped is not None else None
    if pair != transform:
        if pair is not None and transform is None:
            raise NatsError(
                f"JetStream stream {name} partitions its subjects ({pair[0]} to {pair[1]}): "
                "consume it with [cluster] set, or choose another nats.stream"
            )
        raise NatsError(
            f"JetStream stream {name} exists with the subject transform {pair}, not "
            f"{transform}: each cluster.partitions needs a stream of its own (nats.stream)"
        )
    window = info.config.duplicate_window or 0.0
    if check_duplicate_window and window + 1e-9 < settings.duplicate_window_s:
        raise NatsError(
            f"JetStream stream {name} exists with a duplicate window of {window:g} s, shorter "
            f"than nats.duplicate_window_s = {settings.duplicate_window_s:g} s: moments "
            "re-emitted after a crash could be stored twice"
        )
    return False
