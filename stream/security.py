"""Who may connect, and what they may do: TLS contexts, identities, per-prefix permissions.

- **TLS**: `server_context` builds the listeners' `ssl.SSLContext` from `[security]`
  (TLS ≥ 1.2; with `tls_client_ca_file`, a client certificate signed by that CA is
  required — optional, but verified when presented, on the metrics listener, whose
  probes present none); `accept_tls` runs the server side of a handshake on one accepted
  connection.
- **Identities**: `load_identities` reads `security.auth_file`, a TOML file of
  `[identities.<name>]` tables, each with a `token` and/or a `certificate_cn`, the
  stream-id prefixes it may `write` and `read` (`"*"`: all), and `metrics = true` if it
  may scrape `/metrics`. A connection authenticates by its client certificate's subject
  CN, or by a first line `AUTH <token>\\n` (`AuthLine`, sans I/O), an HTTP request by
  `Authorization: Bearer <token>`; tokens are compared in constant time.
- **Policy**: `check_policy(config)` refuses (`ConfigError`, one line) a listener bound
  beyond loopback without its protection — TLS and an auth file for the TCP listeners
  (`ingest.tcp`, `output.tcp`, `metrics.listen`), `ingest.udp_allow` for UDP
  (`AddressFilter`) — unless `security.insecure`; `prepare(config)`, at start, checks it,
  logs a WARNING at every start when `security.insecure` lets a listener through, and
  builds what the listeners enforce (`Security`).

The sensor ingest (`stream.sources.tcp`, `stream.sources.udp`), the subscriber listener
(`stream.sinks.subscribers`) and the metrics listener (`stream.http`) enforce all of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSAttribute, TLSStream

from .config import Config, ConfigError, parse_address

__all__ = [
    "AUTH_PREFIX",
    "AUTH_TIMEOUT_S",
    "HANDSHAKE_TIMEOUT_S",
    "UNAUTHORIZED_REPLY",
    "AddressFilter",
    "AuthLine",
    "Identities",
    "Identity",
    "Security",
    "accept_tls",
    "bearer_token",
    "certificate_cn",
    "check_policy",
    "exposed",
    "is_loopback",
    "load_identities",
    "peer_identity",
    "prepare",
    "server_context",
    "unprotected",
]

log = logging.getLogger(__name__)

AUTH_PREFIX = b"AUTH "
"""A connection's optional first line: `AUTH <token>\\n` (`\\r\\n` too)."""
MAX_AUTH_LINE = 1024
"""The longest `AUTH` line read, in bytes; a longer one is refused."""
UNAUTHORIZED_REPLY = b"ERR unauthorized\n"
"""What a connection that fails to authenticate is told before it is closed."""
AUTH_TIMEOUT_S = 10.0
"""How long an accepted (TLS) connection has to authenticate."""
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a client has to complete the TLS handshake."""
MIN_TOKEN_CHARS = 16
"""Tokens shorter than this are refused at load (`secrets.token_urlsafe(32)` gives 43)."""
_ALL = "*"
_IDENTITY_KEYS = ("token", "certificate_cn", "write", "read", "metrics")
_LOOPBACK_NAMES = ("localhost", "localhost.")
_MAX_CACHED_ADDRESSES = 65536


# --- identities ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """One client identity from the auth file: its `name`, the stream-id prefixes it may
    `write` (send frames to) and `read` (subscribe to; `"*"` in either means all), and
    whether it may scrape `/metrics` (`metrics`)."""

    name: str
    write: tuple[str, ...]
    read: tuple[str, ...]
    metrics: bool = False

    @property
    def writes_all(self) -> bool:
        return _ALL in self.write

    @property
    def reads(self) -> tuple[str, ...] | None:
        """The prefixes of the stream ids it may read, sorted; None: all of them."""
        return None if _ALL in self.read else tuple(sorted(set(self.read)))

    def may_write(self, stream_id: str) -> bool:
        """Whether frames of `stream_id` from this identity are accepted."""
        return _ALL in self.write or stream_id.startswith(self.write)

    def may_read(self, stream_id: str) -> bool:
        """Whether moments of `stream_id` may be sent to this identity."""
        return _ALL in self.read or stream_id.startswith(self.read)


class Identities:
    """The identities of an auth file, looked up by token or by certificate CN."""

    def __init__(self, by_token: Mapping[bytes, Identity], by_cn: Mapping[str, Identity]):
        # Tokens are kept only as SHA-256 digests: equal lengths, compared in constant time.
        self._digests = tuple(by_token.items())
        self._by_cn = dict(by_cn)

    def __len__(self) -> int:
        return len({i.name for _, i in self._digests} | {i.name for i in self._by_cn.values()})

    @property
    def certificate_cns(self) -> tuple[str, ...]:
        return tuple(self._by_cn)

    def by_token(self, token: bytes) -> Identity | None:
        """The identity whose token is `token`, or None. Every identity's digest is
        compared (`hmac.compare_digest`), so the time taken says nothing about which
        one, if any, nearly matched."""
        digest = hashlib.sha256(token).digest()
        found = None
        for known, identity in self._digests:
            if hmac.compare_digest(digest, known):
                found = identity
        return found

    def by_certificate(self, certificate: Mapping[str, Any] | None) -> Identity | None:
        """The identity named by a verified client certificate's subject CN, or None."""
        cn = certificate_cn(certificate)
        return None if cn is None else self._by_cn.get(cn)


def certificate_cn(certificate: Mapping[str, Any] | None) -> str | None:
    """The subject commonName of a certificate as `ssl.SSLObject.getpeercert()` gives it
    (`{"subject": ((("commonName", "robot-7"),), ...)}`), or None."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def load_identities(path: str, key: str = "security.auth_file") -> Identities:
    """Read and validate an auth file.

    **Raises:** `ConfigError`, one line naming `key`, the file and the bad entry (never
    a token's value), when the file cannot be read or parsed, or an entry is invalid.
    """
    where = f"{key} = {path}"
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    extra = sorted(set(data) - {"identities"})
    if extra:
        raise ConfigError(f"{where}: unknown key {extra[0]!r}; expected [identities.<name>]")
    tables = data.get("identities", {})
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{where}: no [identities.<name>] table; nobody could connect")
    by_token: dict[bytes, Identity] = {}
    by_cn: dict[str, Identity] = {}
    for name, table in tables.items():
        at = f"{where}: identities.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{at}: must be a table [identities.{name}]")
        unknown = sorted(set(table) - set(_IDENTITY_KEYS))
        if unknown:
            raise ConfigError(
                f"{at}.{unknown[0]}: unknown key; valid keys: {', '.join(_IDENTITY_KEYS)}"
            )
        metrics = table.get("metrics", False)
        if not isinstance(metrics, bool):
            raise ConfigError(
                f"{at}.metrics = {metrics!r}: must be true (may scrape /metrics) or false"
            )
        identity = Identity(
            name, _prefixes(table, "write", at), _prefixes(table, "read", at), metrics
        )
        token, cn = table.get("token"), table.get("certificate_cn")
        if token is None and cn is None:
            raise ConfigError(f"{at}: needs a token or a certificate_cn (or both)")
        if token is not None:
            digest = hashlib.sha256(_token_bytes(token, f"{at}.token")).digest()
            if digest in by_token:
                raise ConfigError(f"{at}.token: the same as identities.{by_token[digest].name}")
            by_token[digest] = identity
        if cn is not None:
            if not isinstance(cn, str) or not cn or cn != cn.strip():
                raise ConfigError(f"{at}.certificate_cn = {cn!r}: must be a non-empty string")
            if cn in by_cn:
                other = by_cn[cn].name
                raise ConfigError(f"{at}.certificate_cn = {cn!r}: also identities.{other}'s")
            by_cn[cn] = identity
    return Identities(by_token, by_cn)


def _token_bytes(token: object, at: str) -> bytes:
    how = 'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
    if not isinstance(token, str):
        raise ConfigError(f"{at}: must be a string ({how})")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{at}: must be printable ASCII without spaces ({how})")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{at}: {len(token)} characters, must be at least {MIN_TOKEN_CHARS} ({how})"
        )
    return token.encode("ascii")


def _prefixes(table: Mapping[str, object], key: str, at: str) -> tuple[str, ...]:
    value = table.get(key, [])
    what = f'must be a list of stream-id prefixes, e.g. ["arm-", "fleet-a."], or ["{_ALL}"]'
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{at}.{key} = {value!r}: {what}")
    for p in value:
        if p != _ALL and (_ALL in p or any(c.isspace() for c in p)):
            raise ConfigError(f"{at}.{key}: prefix {p!r}: {what} (no '*' inside a prefix)")
    return tuple(value)


class AuthLine:
    """Sans I/O: reads what a connection sends before its first frame or command.

    `feed(data)` returns None while it needs more bytes, then `(identity, rest)`: the
    identity of the `AUTH <token>` line when the connection began with one (None: a bad
    token, or a line longer than `MAX_AUTH_LINE`), else `certified` (the identity of its
    client certificate, None without one) and every byte fed; `rest` is what follows the
    line, the start of the connection's frames or commands.
    """

    def __init__(self, identities: Identities, certified: Identity | None = None) -> None:
        self.identities = identities
        self.certified = certified
        self._buf = b""

    def feed(self, data: bytes) -> tuple[Identity | None, bytes] | None:
        buf = self._buf = self._buf + data
        if buf[: len(AUTH_PREFIX)] != AUTH_PREFIX[: len(buf)]:
            return self.certified, buf  # no AUTH line: the certificate decides
        line, newline, rest = buf.partition(b"\n")
        if not newline:
            return (None, b"") if len(buf) > MAX_AUTH_LINE else None
        if len(line) > MAX_AUTH_LINE:
            return None, b""
        token = line[len(AUTH_PREFIX) :].removesuffix(b"\r")
        return self.identities.by_token(token), rest


# --- TLS -----------------------------------------------------------------------------------


def server_context(
    cert_file: str,
    key_file: str = "",
    client_ca_file: str = "",
    *,
    client_certificate_required: bool = True,
) -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2 or later, the certificate chain of `cert_file`
    with the private key of `key_file` (`""`: in `cert_file`), and, with
    `client_ca_file`, client certificates signed by that CA required (or, with
    `client_certificate_required=False`, verified when presented).

    **Raises:** `ConfigError` naming the `security.*` key of a file that cannot be read or
    is not what it should be.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # (a TLS write then never has to read)
    for key, path in (
        ("security.tls_cert_file", cert_file),
        ("security.tls_key_file", key_file),
        ("security.tls_client_ca_file", client_ca_file),
    ):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{key} = {path}: no such file")
    try:
        context.load_cert_chain(cert_file, key_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"security.tls_cert_file = {cert_file}, security.tls_key_file = "
            f"{key_file or '(in the certificate file)'}: not a PEM certificate chain and its "
            f"private key ({_ssl_reason(e)})"
        ) from None
    if client_ca_file:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(
                f"security.tls_client_ca_file = {client_ca_file}: not a PEM CA certificate "
                f"({_ssl_reason(e)})"
            ) from None
        context.verify_mode = (
            ssl.CERT_REQUIRED if client_certificate_required else ssl.CERT_OPTIONAL
        )
    return context


def _ssl_reason(e: BaseException) -> str:
    """`KEY_VALUES_MISMATCH`, `[SSL] PEM lib (_ssl.c:3926)` → `key values mismatch`, `pem lib`."""
    text = str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e)
    return re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text).replace("_", " ").lower()


async def accept_tls(stream: ByteStream, context: ssl.SSLContext) -> TLSStream | None:
    """The server side of a TLS handshake on an accepted connection: the TLS stream, or
    None when the client did not complete it within `HANDSHAKE_TIMEOUT_S` (not TLS, a bad or missing
    client certificate, gone); the caller closes `stream` then. The stream does not insist
    on a closing handshake (a sensor may just close its socket)."""
    with anyio.move_on_after(HANDSHAKE_TIMEOUT_S):
        try:
            return await TLSStream.wrap(
                _SerialSend(stream),
                server_side=True,
                ssl_context=context,
                standard_compatible=False,
            )
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as e:
            log.debug("TLS handshake failed: %s", e)
    return None


class _SerialSend(ByteStream):
    """`stream` with its sends taken one at a time, in the order they were called: under
    TLS a connection's reader may flush records (TLS 1.3 post-handshake messages) while
    its reply writer sends, and a socket stream refuses two concurrent sends."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._lock = anyio.Lock()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        async with self._lock:
            await self.stream.send(item)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.stream.extra_attributes


def peer_identity(stream: ByteStream, identities: Identities) -> Identity | None:
    """The identity of a TLS connection's verified client certificate, or None."""
    return identities.by_certificate(stream.extra(TLSAttribute.peer_certificate, None))


def bearer_token(head: bytes) -> bytes | None:
    """The token of an HTTP request head's `Authorization: Bearer <token>` header (the
    scheme's case is ignored), `b""` for another or a malformed `Authorization` header,
    None without one."""
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return None


# --- addresses -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether a listener's host binds loopback only: `localhost`, `127.0.0.0/8`, `::1`.
    Any other name counts as beyond loopback (nothing is resolved)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class AddressFilter:
    """Whether a source address is inside one of `networks` (CIDR), e.g. `10.0.0.0/8`.
    Decisions are cached per address, so a datagram costs one dictionary look-up."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(n) for n in networks)
        self._seen: dict[str, bool] = {}

    def __call__(self, host: str) -> bool:
        allowed = self._seen.get(host)
        if allowed is None:
            allowed = self._check(host)
            if len(self._seen) >= _MAX_CACHED_ADDRESSES:
                self._seen.clear()  # (spoofed sources cannot grow it without bound)
            self._seen[host] = allowed
        return allowed

    def _check(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 sender on a dual-stack socket
        return any(ip.version == n.version and ip in n for n in self.networks)


# --- the policy, at start ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Security:
    """What the listeners enforce: the TLS context (None: plain TCP), the identities (None:
    no authentication) and the UDP source filter (None: every source). `metrics_tls` is
    the metrics listener's context: `tls`, but with client certificates optional (Kubernetes
    probes and health checks present none); `/metrics` itself still needs an identity."""

    tls: ssl.SSLContext | None = None
    identities: Identities | None = None
    udp_allow: AddressFilter | None = None
    metrics_tls: ssl.SSLContext | None = None


def _listeners(config: Config) -> list[tuple[str, str]]:
    return [
        (key, address)
        for key, address in (
            ("ingest.tcp", config.ingest.tcp),
            ("ingest.udp", config.ingest.udp),
            ("output.tcp", config.output.tcp),
            ("metrics.listen", config.metrics.listen),
        )
        if address
    ]


def exposed(config: Config) -> list[tuple[str, str]]:
    """The `(key, address)` of every listener bound beyond loopback."""
    return [(k, a) for k, a in _listeners(config) if not is_loopback(parse_address(a)[0])]


def unprotected(config: Config) -> list[tuple[str, str]]:
    """The `(key, address)` of every listener bound beyond loopback without its
    protection: TLS and an auth file for TCP (`security.tls_cert_file`,
    `security.auth_file`), an allow-list for UDP (`ingest.udp_allow`)."""
    tls_and_auth = bool(config.security.tls_cert_file and config.security.auth_file)
    return [
        (k, a)
        for k, a in exposed(config)
        if not (config.ingest.udp_allow if k == "ingest.udp" else tls_and_auth)
    ]


def check_policy(config: Config) -> list[tuple[str, str]]:
    """The exposure policy, without reading any file (what `check-config` checks, and
    `run` before it reads them): the listeners `security.insecure` lets through
    (`unprotected`), empty when none.

    **Raises:** `ConfigError` (one line) when a listener is bound beyond loopback without
    its protection — TLS (`security.tls_cert_file`) and `security.auth_file` for a TCP
    listener, `ingest.udp_allow` for UDP — and `security.insecure` is false; or when
    `security.tls_key_file` or `tls_client_ca_file` is set without `tls_cert_file`.
    """
    sec = config.security
    for key, value in (
        ("tls_key_file", sec.tls_key_file),
        ("tls_client_ca_file", sec.tls_client_ca_file),
    ):
        if value and not sec.tls_cert_file:
            raise ConfigError(f"security.{key} = {value}: needs security.tls_cert_file")
    open_ = unprotected(config)
    if open_ and not sec.insecure:
        raise ConfigError(_refusal(open_))
    return open_


def prepare(config: Config) -> Security:
    """Check the security policy (`check_policy`) and build what the listeners enforce
    (at start).

    **Raises:** `ConfigError` (one line) as `check_policy` does, or when a file cannot be
    read or is invalid.
    """
    sec = config.security
    open_ = check_policy(config)
    identities = load_identities(sec.auth_file) if sec.auth_file else None
    if identities is not None and identities.certificate_cns and not sec.tls_client_ca_file:
        raise ConfigError(
            f"security.auth_file = {sec.auth_file}: identities with a certificate_cn need "
            "security.tls_client_ca_file (client certificates are not verified without it)"
        )
    tls = metrics_tls = None
    if sec.tls_cert_file:
        tls = server_context(sec.tls_cert_file, sec.tls_key_file, sec.tls_client_ca_file)
        metrics_tls = tls
        if sec.tls_client_ca_file:
            metrics_tls = server_context(
                sec.tls_cert_file,
                sec.tls_key_file,
                sec.tls_client_ca_file,
                client_certificate_required=False,
            )
    allow = AddressFilter(config.ingest.udp_allow) if config.ingest.udp_allow else None
    if open_:
        log.warning(
            "security.insecure = true: %s accept%s anyone who can reach %s, without %s "
            "(docs/operations.md, TLS and authentication)",
            _named(open_),
            "s" if len(open_) == 1 else "",
            "it" if len(open_) == 1 else "them",
            "TLS or authentication" if any(k != "ingest.udp" for k, _ in open_) else "a filter",
        )
    return Security(tls, identities, allow, metrics_tls)


def _named(listeners: list[tuple[str, str]]) -> str:
    return ", ".join(f"{key} = {address}" for key, address in listeners)


def _refusal(open_: list[tuple[str, str]]) -> str:
    tcp = [(k, a) for k, a in open_ if k != "ingest.udp"]
    udp = [(k, a) for k, a in open_ if k == "ingest.udp"]
    why = []
    if tcp:
        why.append(
            f"{_named(tcp)}: bound beyond loopback without TLS and authentication; set "
            "security.tls_cert_file, security.tls_key_file and security.auth_file "
            "(docs/operations.md, TLS and authentication)"
        )
    if udp:
        why.append(
            f"{_named(udp)}: bound beyond loopback without ingest.udp_allow; list the "
            'sensors\' networks, e.g. ["10.20.0.0/16"]'
        )
    return "; ".join(why) + (
        "; or bind to 127.0.0.1, or set security.insecure = true to accept the risk"
    )
