"""`stream.security`: identities, the AUTH line, address filters, the exposure policy, and
the TCP/UDP ingest enforcing them over real loopback sockets (TLS with a throwaway CA made
here with `cryptography`)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import anyio
import numpy as np
import pytest
from anyio.abc import ByteStream
from prometheus_client import CollectorRegistry

from stream.buffers import WeightedBuffer
from stream.config import ConfigError, load_config
from stream.events import Listener
from stream.http import serve_http
from stream.ingest import Ingest, Item
from stream.metrics import Metrics
from stream.protocol import (
    Dims,
    Frame,
    FrameRun,
    Moment,
    MomentBatch,
    MomentSizes,
    ReplyReader,
    encode_frame,
    encode_json_frame,
    reason_code,
)
from stream.security import (
    UNAUTHORIZED_REPLY,
    AddressFilter,
    AuthLine,
    Identities,
    bearer_token,
    check_policy,
    is_loopback,
    load_identities,
    prepare,
    server_context,
    unprotected,
)
from stream.sinks import SubscriberServer
from stream.sources import serve_tcp, serve_udp

DIMS = Dims(4, 3, 2, 2)
HOST = "127.0.0.1"
TOKEN = "fleet-a-token-0123456789abcdef"
OTHER_TOKEN = "fleet-b-token-0123456789abcdef"
AUTH_FILE = f"""\
[identities.fleet-a]
token = "{TOKEN}"
write = ["arm-", "fleet-a."]
read = ["*"]

[identities.robot]
certificate_cn = "robot-7"
write = ["robot-7."]
read = ["robot-7.", "arm-"]
metrics = true

[identities.admin]
token = "{OTHER_TOKEN}"
write = ["*"]
"""
HOME = {"HOME": "/nonexistent-home"}


# --- a throwaway PKI -------------------------------------------------------------------------


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate (CN
    robot-7) signed by the CA, and one (CN robot-7) signed by another CA; PEM files."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Path] = {}

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        out[name] = path
        return path

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def issue(
        cn: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        usage: x509.ObjectIdentifier | None = None,
        san: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        )
        if issuer is None:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    cas = {}
    for ca in ("ca", "rogue-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = issue(f"test {ca}", ca_key, None)
        cas[ca] = (ca_cert.subject, ca_key)
        write(f"{ca}.pem", pem(ca_cert))
    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = issue("localhost", server_key, cas["ca"], ExtendedKeyUsageOID.SERVER_AUTH, san)
    write("server.pem", pem(server))
    write("server.key", key_pem(server_key))
    for name, ca in (("client", "ca"), ("rogue", "rogue-ca")):
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = issue("robot-7", client_key, cas[ca], ExtendedKeyUsageOID.CLIENT_AUTH)
        write(f"{name}.pem", pem(client))
        write(f"{name}.key", key_pem(client_key))
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: dict[str, Path], cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}.pem"], pki[f"{cert}.key"])
    return context


# --- identities ------------------------------------------------------------------------------


def identities(tmp_path: Path, text: str = AUTH_FILE) -> Identities:
    path = tmp_path / "identities.toml"
    path.write_text(text)
    return load_identities(str(path))


def test_identities_by_token_and_certificate(tmp_path: Path) -> None:
    ids = identities(tmp_path)
    assert len(ids) == 3
    fleet = ids.by_token(TOKEN.encode())
    assert fleet is not None and fleet.name == "fleet-a"
    assert ids.by_token(OTHER_TOKEN.encode()).name == "admin"  # type: ignore[union-attr]
    assert ids.by_token(TOKEN.encode() + b"x") is None
    assert ids.by_token(b"") is None
    cert = {"subject": ((("countryName", "NL"),), (("commonName", "robot-7"),))}
    assert ids.by_certificate(cert).name == "robot"  # type: ignore[union-attr]
    assert ids.by_certificate({"subject": ((("commonName", "robot-8"),),)}) is None
    assert ids.by_certificate(None) is None
    assert ids.certificate_cns == ("robot-7",)


def test_identity_permissions_are_prefixes(tmp_path: Path) -> None:
    ids = identities(tmp_path)
    fleet = ids.by_token(TOKEN.encode())
    assert fleet is not None
    assert fleet.may_write("arm-1") and fleet.may_write("fleet-a.x")
    assert not fleet.may_write("fleet-b.x") and not fleet.may_write("ar")
    assert fleet.may_read("anything") and not fleet.writes_all
    admin = ids.by_token(OTHER_TOKEN.encode())
    assert admin is not None and admin.writes_all and admin.may_write("x")
    assert not admin.may_read("x")  # read defaults to nothing
    assert fleet.reads is None and admin.reads == () and not admin.metrics and not fleet.metrics
    robot = ids.by_certificate({"subject": ((("commonName", "robot-7"),),)})
    assert robot is not None and robot.metrics and robot.reads == ("arm-", "robot-7.")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[identities.a]\nwrite = []\n", "identities.a: needs a token or a certificate_cn"),
        ('[identities.a]\ntoken = "short"\n', "identities.a.token: 5 characters"),
        ("[identities.a]\ntoken = 7\n", "identities.a.token: must be a string"),
        (f'[identities.a]\ntoken = "{TOKEN} x"\n', "identities.a.token: must be printable"),
        (f'[identities.a]\ntoken = "{TOKEN}"\ncolour = 1\n', "identities.a.colour: unknown key"),
        (f'[identities.a]\ntoken = "{TOKEN}"\nwrite = "arm-"\n', "identities.a.write = 'arm-'"),
        (f'[identities.a]\ntoken = "{TOKEN}"\nread = ["a*"]\n', "identities.a.read: prefix 'a*'"),
        (f'[identities.a]\ntoken = "{TOKEN}"\nmetrics = "yes"\n', "identities.a.metrics = 'yes'"),
        (
            f'[identities.a]\ntoken = "{TOKEN}"\n[identities.b]\ntoken = "{TOKEN}"\n',
            "identities.b.token: the same as identities.a",
        ),
        (
            '[identities.a]\ncertificate_cn = "x"\n[identities.b]\ncertificate_cn = "x"\n',
            "identities.b.certificate_cn = 'x': also identities.a's",
        ),
        ("", "no [identities.<name>] table"),
        ('token = "x"\n', "unknown key 'token'"),
        ("[identities.a\n", "invalid TOML"),
    ],
)
def test_bad_auth_files_are_refused_naming_the_entry(tmp_path: Path, text: str, names: str):
    with pytest.raises(ConfigError) as e:
        identities(tmp_path, text)
    message = str(e.value)
    assert message.startswith(f"security.auth_file = {tmp_path / 'identities.toml'}: ")
    assert names in message, message
    assert TOKEN not in message and "\n" not in message


def test_missing_auth_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"security.auth_file = .*nope.toml: cannot read"):
        load_identities(str(tmp_path / "nope.toml"))


# --- the AUTH line ---------------------------------------------------------------------------


def test_auth_line_in_pieces_with_frames_after_it(tmp_path: Path) -> None:
    ids = identities(tmp_path)
    line = AuthLine(ids)
    data = b"AUTH " + TOKEN.encode() + b"\r\nESF1..."
    for i in range(len(data) - 8):
        assert line.feed(data[i : i + 1]) is None
    identity, rest = line.feed(data[len(data) - 8 :])  # type: ignore[misc]
    assert identity is not None and identity.name == "fleet-a"
    assert rest == b"ESF1..."


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"AUTH wrong-token-0123456789\n{", (None, b"{")),
        (b"AUTH \n", (None, b"")),
        (b"ESF1", ("cert", b"ESF1")),  # no AUTH line: the certificate decides
        (b'{"stream"', ("cert", b'{"stream"')),
        (b"AUX", ("cert", b"AUX")),
        (b"AUTH " + b"x" * 2000, (None, b"")),  # too long, no newline yet
    ],
)
def test_auth_line_outcomes(tmp_path: Path, data: bytes, expect: tuple) -> None:
    ids = identities(tmp_path)
    certified = ids.by_certificate({"subject": ((("commonName", "robot-7"),),)})
    identity, rest = AuthLine(ids, certified).feed(data)  # type: ignore[misc]
    assert (None if identity is None else "cert", rest) == expect
    if expect[0] is None:
        assert AuthLine(ids).feed(data) == (None, expect[1])


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("sensors.example.net", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_address_filter() -> None:
    allow = AddressFilter(["10.20.0.0/16", "192.168.1.7", "fd00::/8"])
    assert allow("10.20.3.4") and allow("192.168.1.7") and allow("fd12::1")
    assert allow("::ffff:10.20.0.1")  # an IPv4 sender on a dual-stack socket
    assert not allow("10.21.0.1") and not allow("127.0.0.1") and not allow("::1")
    assert not allow("not an address") and not allow("")
    assert allow("10.20.3.4")  # cached, same answer


# --- configuration and the policy ------------------------------------------------------------


def test_udp_allow_is_validated() -> None:
    cfg = load_config(env=HOME, overrides={"ingest.udp_allow": '["10.0.0.0/8", "fd00::/8"]'})
    assert cfg.ingest.udp_allow == ("10.0.0.0/8", "fd00::/8")
    assert load_config(env=HOME).ingest.udp_allow == ()
    with pytest.raises(ConfigError, match=r"ingest.udp_allow = .*did you mean '10.0.0.0/8'"):
        load_config(env=HOME, overrides={"ingest.udp_allow": '["10.1.2.3/8"]'})
    with pytest.raises(ConfigError, match=r"must be a list of networks in CIDR notation"):
        load_config(env={**HOME, "ENACTIVE_INGEST_UDP_ALLOW": "10.0.0.0/8"})


def test_loopback_defaults_need_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        security = prepare(load_config(env=HOME))
    assert (security.tls, security.identities, security.udp_allow) == (None, None, None)
    assert not caplog.records


def test_exposed_listeners_without_protection_refuse_the_start() -> None:
    cfg = load_config(
        env=HOME,
        overrides={"ingest.tcp": "0.0.0.0:7400", "ingest.udp": "[::]:7400", "metrics.listen": ""},
    )
    assert unprotected(cfg) == [("ingest.tcp", "0.0.0.0:7400"), ("ingest.udp", "[::]:7400")]
    with pytest.raises(ConfigError) as e:
        prepare(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert "ingest.tcp = 0.0.0.0:7400: bound beyond loopback without TLS" in message
    assert "ingest.udp = [::]:7400: bound beyond loopback without ingest.udp_allow" in message
    assert "security.insecure = true" in message


def test_insecure_starts_with_a_warning_naming_the_listeners(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = load_config(
        env=HOME,
        overrides={
            "ingest.tcp": "0.0.0.0:7400",
            "output.tcp": "10.1.2.3:7401",
            "security.insecure": "true",
        },
    )
    with caplog.at_level(logging.WARNING, logger="stream.security"):
        security = prepare(cfg)
    assert security.tls is None and security.identities is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "security.insecure = true" in record.getMessage()
    assert "ingest.tcp = 0.0.0.0:7400, output.tcp = 10.1.2.3:7401" in record.getMessage()


def test_tls_auth_and_udp_allow_protect_every_exposed_listener(
    tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    auth = tmp_path / "identities.toml"
    auth.write_text(AUTH_FILE)
    cfg = load_config(
        env=HOME,
        overrides={
            "ingest.tcp": "0.0.0.0:7400",
            "ingest.udp": "0.0.0.0:7400",
            "ingest.udp_allow": '["10.0.0.0/8"]',
            "metrics.listen": "0.0.0.0:9400",
            "security.tls_cert_file": str(pki["server.pem"]),
            "security.tls_key_file": str(pki["server.key"]),
            "security.tls_client_ca_file": str(pki["ca.pem"]),
            "security.auth_file": str(auth),
        },
    )
    assert unprotected(cfg) == []
    with caplog.at_level(logging.WARNING, logger="stream.security"):
        security = prepare(cfg)
    assert security.tls is not None and security.tls.verify_mode == ssl.CERT_REQUIRED
    assert security.tls.minimum_version == ssl.TLSVersion.TLSv1_2
    assert security.identities is not None and len(security.identities) == 3
    assert security.udp_allow is not None and security.udp_allow("10.9.9.9")
    # Every listener uses it: nothing to warn about. The metrics listener's probes present
    # no client certificate: optional there, verified when presented.
    assert not caplog.records
    assert security.metrics_tls is not None
    assert security.metrics_tls.verify_mode == ssl.CERT_OPTIONAL


def test_check_policy_reads_no_file_and_refuses_like_prepare(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    protected = {
        "output.tcp": "0.0.0.0:7401",
        "metrics.listen": "0.0.0.0:9400",
        "security.tls_cert_file": missing,
        "security.auth_file": missing,
    }
    assert check_policy(load_config(env=HOME, overrides=protected)) == []
    for key in ("output.tcp", "metrics.listen"):  # neither is let through without TLS now
        cfg = load_config(env=HOME, overrides={key: "0.0.0.0:7401"})
        with pytest.raises(ConfigError, match=rf"^{key} = 0.0.0.0:7401: bound beyond") as e:
            check_policy(cfg)
        with pytest.raises(ConfigError) as again:
            prepare(cfg)
        assert str(again.value) == str(e.value)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"security.tls_key_file": "KEY"}, "security.tls_key_file = KEY: needs security.tls_cert"),
        ({"security.tls_cert_file": "NOPE"}, "security.tls_cert_file = NOPE: no such file"),
        ({"security.tls_cert_file": "CA"}, "security.tls_cert_file = CA, security.tls_key_file"),
        ({"security.auth_file": "AUTH"}, "identities with a certificate_cn need security.tls_cl"),
        (
            {
                "security.tls_cert_file": "CERT",
                "security.tls_key_file": "KEY",
                "security.tls_client_ca_file": "KEY",
            },
            "security.tls_client_ca_file = KEY: not a PEM CA certificate",
        ),
    ],
)
def test_bad_security_settings_are_one_line_naming_the_key(
    tmp_path: Path, pki: dict[str, Path], changes: dict[str, str], names: str
) -> None:
    auth = tmp_path / "identities.toml"
    auth.write_text(AUTH_FILE)
    paths = {
        "KEY": str(pki["server.key"]),
        "CERT": str(pki["server.pem"]),
        "CA": str(pki["ca.pem"]),
        "AUTH": str(auth),
        "NOPE": str(tmp_path / "nope.pem"),
    }
    overrides = {k: paths[v] for k, v in changes.items()}
    with pytest.raises(ConfigError) as e:
        prepare(load_config(env=HOME, overrides=overrides))
    message = str(e.value)
    for alias, path in paths.items():
        message = message.replace(path, alias)
    assert names in message and "\n" not in message, message


# --- the TCP ingest enforcing it -------------------------------------------------------------


class Recorder(Listener):
    """What the sources report, and the frames they hand over."""

    def __init__(self) -> None:
        self.buffer: WeightedBuffer[Item] = WeightedBuffer(10_000)
        self.reasons: list[tuple[str, str]] = []
        self.limits: list[tuple[str, str]] = []
        self._changed = anyio.Event()
        self.ingest = Ingest(self.buffer, dims=DIMS, max_frame_bytes=4096, events=self)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def rejected(self, source: str, reason: str) -> None:
        self.reasons.append((source, reason))
        self._touch()

    def limited(self, listener: str, reason: str) -> None:
        self.limits.append((listener, reason))
        self._touch()

    async def frames(self, n: int) -> list[Frame]:
        out: list[Frame] = []
        with anyio.fail_after(5):
            while len(out) < n:
                item = await self.buffer.get()
                out += item.frames() if isinstance(item, FrameRun) else [item]
        return out

    async def until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not predicate():
                await self._changed.wait()


def frame(stream_id: str, seq: int, *, reply: bool = True) -> bytes:
    values = np.arange(DIMS.total, dtype=np.float32)
    parts = np.split(values, np.cumsum(DIMS)[:-1])
    return encode_frame(
        stream_id,
        seq,
        0.0,
        reply=reply,
        **dict(zip(("sensory", "proprio", "tactile", "motor"), parts, strict=True)),
    )


def json_frame(stream_id: str, seq: int) -> bytes:
    values = np.arange(DIMS.total, dtype=np.float32)
    parts = np.split(values, np.cumsum(DIMS)[:-1])
    return encode_json_frame(
        stream_id,
        seq,
        0.0,
        **dict(zip(("sensory", "proprio", "tactile", "motor"), parts, strict=True)),
    )


@contextlib.asynccontextmanager
async def ingest_server(
    tmp_path: Path, tls: ssl.SSLContext | None, auth: bool = True
) -> AsyncIterator[tuple[Recorder, int]]:
    rec = Recorder()
    ids = identities(tmp_path) if auth else None
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_tcp(
                rec.ingest, (HOST, 0), tls=tls, identities=ids, task_status=task_status
            )
        )
        yield rec, port
        tg.cancel_scope.cancel()
    rec.buffer.close()


async def read_until(stream: ByteStream, done: Callable[[bytes], bool]) -> tuple[bytes, bool]:
    """What the peer sends until `done(data)` or it closes; and whether it closed."""
    data = b""
    with anyio.fail_after(5):
        while not done(data):
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data, True
    return data, False


async def test_plain_tcp_client_to_a_tls_port_is_closed_and_counted(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    tls = server_context(str(pki["server.pem"]), str(pki["server.key"]))
    async with ingest_server(tmp_path, tls) as (rec, port):
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(b"AUTH " + TOKEN.encode() + b"\n" + frame("arm-1", 1))
            data, closed = await read_until(link, lambda d: False)
        assert closed and b"ESR1" not in data
        await rec.until(lambda: bool(rec.limits))
    assert rec.limits == [("ingest.tcp", "tls_handshake")]
    assert len(rec.buffer) == 0


async def test_tls_token_writes_its_prefixes_and_gets_forbidden_for_others(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    tls = server_context(str(pki["server.pem"]), str(pki["server.key"]))
    async with ingest_server(tmp_path, tls) as (rec, port):
        link = await anyio.connect_tcp(
            HOST, port, ssl_context=client_context(pki), tls_standard_compatible=False
        )
        async with link:
            # The AUTH line and frames in one write; one read holds a run of mixed streams.
            blob = b"AUTH " + TOKEN.encode() + b"\n"
            blob += frame("arm-1", 1) + frame("fleet-b.x", 1) + frame("fleet-a.y", 1)
            blob += frame("arm-1", 2)
            await link.send(blob)
            reader = ReplyReader()
            replies = []
            with anyio.fail_after(5):
                while not replies:
                    replies += reader.feed(await link.receive())
            assert [(r.reason, r.stream_id, r.seq) for r in replies] == [
                ("forbidden", "fleet-b.x", 1)
            ]
            got = await rec.frames(3)
            assert [(f.stream_id, f.seq) for f in got] == [
                ("arm-1", 1),
                ("fleet-a.y", 1),
                ("arm-1", 2),
            ]
    assert rec.reasons == [("tcp", "forbidden")]
    assert rec.limits == []
    assert reason_code("forbidden") == 13


async def test_json_after_auth_line_and_forbidden_error_lines(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    async with ingest_server(tmp_path, tls=None) as (rec, port):  # auth without TLS, loopback
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(b"AUTH " + TOKEN.encode() + b"\r\n")
            await link.send(json_frame("arm-7", 1) + json_frame("other", 1))
            line, _ = await read_until(link, lambda d: d.endswith(b"\n"))
        reply = json.loads(line)
        assert (reply["error"], reply["stream"], reply["seq"]) == ("forbidden", "other", 1)
        assert [f.stream_id for f in await rec.frames(1)] == ["arm-7"]
    assert rec.reasons == [("json", "forbidden")]


@pytest.mark.parametrize(
    "first", [b"AUTH not-the-token-0123456789\n", b"AUTH \n", b"", b'{"stream": "arm-1"}\n']
)
async def test_bad_or_missing_token_gets_err_unauthorized_and_is_counted(
    tmp_path: Path, pki: dict[str, Path], first: bytes
) -> None:
    tls = server_context(str(pki["server.pem"]), str(pki["server.key"]))
    async with ingest_server(tmp_path, tls) as (rec, port):
        link = await anyio.connect_tcp(
            HOST, port, ssl_context=client_context(pki), tls_standard_compatible=False
        )
        async with link:
            await link.send(first + frame("arm-1", 1))
            data, closed = await read_until(link, lambda d: False)
        assert (data, closed) == (UNAUTHORIZED_REPLY, True)
        await rec.until(lambda: bool(rec.limits))
    assert rec.limits == [("ingest.tcp", "unauthorized")]
    assert len(rec.buffer) == 0 and rec.reasons == []


async def test_client_certificate_names_the_identity(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = server_context(str(pki["server.pem"]), str(pki["server.key"]), str(pki["ca.pem"]))
    async with ingest_server(tmp_path, tls) as (rec, port):
        link = await anyio.connect_tcp(
            HOST, port, ssl_context=client_context(pki, "client"), tls_standard_compatible=False
        )
        async with link:  # no AUTH line: the certificate's CN robot-7 is the identity
            await link.send(frame("robot-7.arm", 1) + frame("arm-1", 1))
            replies, _ = await read_until(link, lambda d: len(d) >= 24)
            (reply,) = ReplyReader().feed(replies)
            assert (reply.reason, reply.stream_id) == ("forbidden", "arm-1")
            assert [f.stream_id for f in await rec.frames(1)] == ["robot-7.arm"]
        # A certificate from another CA, or none, does not get past the handshake.
        for cert in ("rogue", None):
            with contextlib.suppress(ssl.SSLError, anyio.BrokenResourceError, OSError):
                link = await anyio.connect_tcp(
                    HOST, port, ssl_context=client_context(pki, cert), tls_standard_compatible=False
                )
                async with link:
                    await link.send(frame("robot-7.arm", 2))
                    await read_until(link, lambda d: False)
        await rec.until(lambda: len(rec.limits) == 2)
    assert rec.limits == [("ingest.tcp", "tls_handshake")] * 2
    assert len(rec.buffer) == 0


async def test_without_identities_anything_goes_as_before(tmp_path: Path) -> None:
    async with ingest_server(tmp_path, tls=None, auth=False) as (rec, port):
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(frame("anything", 1, reply=False))
            assert [f.stream_id for f in await rec.frames(1)] == ["anything"]
    assert rec.reasons == [] and rec.limits == []


# --- UDP -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "allowed"), [(["10.0.0.0/8"], False), (["127.0.0.0/8"], True)]
)
async def test_udp_from_outside_the_allow_list_is_forbidden(
    networks: list[str], allowed: bool
) -> None:
    rec = Recorder()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda **kw: serve_udp(
                rec.ingest, (HOST, 0), buffer=16, allow=AddressFilter(networks), **kw
            )
        )
        async with await anyio.create_connected_udp_socket(HOST, port) as sock:
            await sock.send(frame("u", 1, reply=False))
            if allowed:
                assert [f.stream_id for f in await rec.frames(1)] == ["u"]
            else:
                await rec.until(lambda: bool(rec.reasons))
        tg.cancel_scope.cancel()
    assert rec.reasons == ([] if allowed else [("udp", "forbidden")])


# --- the subscriber listener enforcing it ----------------------------------------------------


def test_bearer_token() -> None:
    assert bearer_token(b"GET / HTTP/1.1\r\nAuthorization: Bearer abc \r\nHost: x") == b"abc"
    assert bearer_token(b"GET / HTTP/1.1\nauthorization:bearer  abc") == b"abc"
    assert bearer_token(b"GET / HTTP/1.1\r\nAuthorization: Basic abc") == b""
    assert bearer_token(b"GET / HTTP/1.1\r\nAuthorization: Bearer") == b""
    assert bearer_token(b"GET /Authorization: Bearer abc HTTP/1.1\r\nHost: x") is None


def moments(*stream_ids: str) -> MomentBatch:
    sizes = MomentSizes(4, 3, 2, 2)
    values = np.zeros(sizes.total, dtype=np.float32)
    return MomentBatch.of([Moment(s, 1, 0.0, 0, 0, sizes, values) for s in stream_ids])


@contextlib.asynccontextmanager
async def subscriber_server(
    tmp_path: Path, tls: ssl.SSLContext
) -> AsyncIterator[tuple[Recorder, SubscriberServer, int, list[int]]]:
    rec, counts = Recorder(), [0]

    def on_subscribers(n: int) -> None:
        counts[0] = n
        rec._touch()

    sink = SubscriberServer(
        (HOST, 0),
        buffer=16,
        events=rec,  # type: ignore[arg-type]
        on_subscribers=on_subscribers,
        tls=tls,
        identities=identities(tmp_path),
    )
    async with anyio.create_task_group() as tg:
        port = await tg.start(sink.run)
        yield rec, sink, port, counts
        tg.cancel_scope.cancel()


async def test_subscribers_over_tls_authenticate_and_read_their_prefixes_only(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    tls = server_context(str(pki["server.pem"]), str(pki["server.key"]), str(pki["ca.pem"]))
    async with subscriber_server(tmp_path, tls) as (rec, sink, port, subscribed):
        # Plain TCP to the TLS port: closed, counted.
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(b"SUB binary *\n")
            data, closed = await read_until(link, lambda d: False)
        assert closed and not data.startswith(b"ERR")
        await rec.until(lambda: rec.limits == [("output.tcp", "tls_handshake")])
        # A bad token decides even with a good certificate: refused, counted.
        link = await anyio.connect_tcp(
            HOST, port, ssl_context=client_context(pki, "client"), tls_standard_compatible=False
        )
        async with link:
            await link.send(b"AUTH not-the-token-0123456789\nSUB binary *\n")
            assert await read_until(link, lambda d: False) == (UNAUTHORIZED_REPLY, True)
        await rec.until(lambda: len(rec.limits) == 2)
        assert rec.limits[1] == ("output.tcp", "unauthorized")
        # The certificate's identity (robot: read robot-7., arm-) subscribing to everything.
        link = await anyio.connect_tcp(
            HOST, port, ssl_context=client_context(pki, "client"), tls_standard_compatible=False
        )
        async with link:
            await link.send(b"SUB json *\n")
            await rec.until(lambda: subscribed[0] == 1)
            sink.offer(moments("arm-1", "leg-1", "robot-7.x", "robot-8.x", "xarm-1"))
            data, _ = await read_until(link, lambda d: d.count(b"\n") >= 2)
        assert [json.loads(line)["stream"] for line in data.splitlines()] == ["arm-1", "robot-7.x"]
    assert len(rec.limits) == 2


# --- the metrics listener enforcing it -------------------------------------------------------


async def https(
    port: int, path: str, pki: dict[str, Path], *, cert: str | None = None, headers: str = ""
) -> tuple[int, bytes]:
    link = await anyio.connect_tcp(
        HOST, port, ssl_context=client_context(pki, cert), tls_standard_compatible=False
    )
    async with link:
        await link.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        data, _ = await read_until(link, lambda d: False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), data
    if head.startswith(b"HTTP/1.1 401 "):
        assert b"\r\nWWW-Authenticate: Bearer" in head
    return int(head.split(b" ")[1]), body


async def test_metrics_over_https_need_an_identity_and_probes_stay_open(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    tls = server_context(
        str(pki["server.pem"]),
        str(pki["server.key"]),
        str(pki["ca.pem"]),
        client_certificate_required=False,
    )
    m = Metrics(CollectorRegistry(), buckets=(1, 8))

    def limited(reason: str) -> float:
        labels = {"listener": "metrics.listen", "reason": reason}
        return m.registry.get_sample_value("enactive_connections_limited_total", labels) or 0.0

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            partial(
                serve_http,
                metrics=m,
                readiness=lambda: True,
                tls=tls,
                identities=identities(tmp_path),
                header_timeout=0.5,
            ),
            (HOST, 0),
        )
        # Plain HTTP to the HTTPS port: no answer, counted.
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(b"GET /healthz HTTP/1.1\r\n\r\n")
            data, closed = await read_until(link, lambda d: False)
        assert closed and b"HTTP/1.1" not in data
        assert limited("tls_handshake") == 1
        # The probes: open, without a client certificate.
        assert await https(port, "/healthz", pki) == (200, b"ok\n")
        assert await https(port, "/readyz", pki) == (200, b"ready\n")
        # /metrics: an identity with metrics = true, by certificate (robot) or token.
        assert (await https(port, "/metrics", pki))[0] == 401
        bearer = f"Authorization: Bearer {OTHER_TOKEN}\r\n"  # admin: no metrics = true
        assert (await https(port, "/metrics", pki, cert="client", headers=bearer))[0] == 401
        assert limited("unauthorized") == 2
        status, body = await https(port, "/metrics", pki, cert="client")
        assert status == 200 and b"enactive_ready" in body
        # A certificate from another CA is refused in the handshake.
        with contextlib.suppress(ssl.SSLError, anyio.BrokenResourceError, OSError):
            link = await anyio.connect_tcp(
                HOST, port, ssl_context=client_context(pki, "rogue"), tls_standard_compatible=False
            )
            async with link:  # (TLS 1.3: the client learns it when it reads)
                await link.send(b"GET /healthz HTTP/1.1\r\n\r\n")
                assert (await read_until(link, lambda d: False))[0] == b""
        assert limited("tls_handshake") == 2
        # A handshake that never completes falls under the header deadline.
        async with await anyio.connect_tcp(HOST, port) as link:
            await link.send(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            started = anyio.current_time()
            _, closed = await read_until(link, lambda d: False)
        assert closed and anyio.current_time() - started < 2.0
        assert limited("header_timeout") == 1
        tg.cancel_scope.cancel()
