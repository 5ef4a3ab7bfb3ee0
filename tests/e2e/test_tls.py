"""TLS, identities and the exposure policy, through the real daemon process (loopback only).

One daemon serves the TLS tests: TLS with client certificates required (CA made here with
`cryptography`; optional on the metrics listener), an auth file, and `ingest.udp_allow`
that leaves out 127.0.0.1. Its `/metrics` is read over HTTPS with a bearer token.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream.protocol import MomentReader, ReplyReader, encode_frame, encode_json_frame

from .daemon import DaemonProcess, payload

pytestmark = [pytest.mark.timeout(300), pytest.mark.reliability]

TOKEN = "e2e-fleet-a-token-0123456789abcdef"
READER = "e2e-arm-reader-token-0123456789abcdef"
SCRAPER = "e2e-prometheus-token-0123456789abcdef"
AUTH = f"""\
[identities.fleet-a]
token = "{TOKEN}"
write = ["arm-"]

[identities.robot]
certificate_cn = "robot-7"
write = ["robot-7."]

[identities.arm-reader]
token = "{READER}"
read = ["arm-"]

[identities.prometheus]
token = "{SCRAPER}"
metrics = true
"""
REJECTED = "enactive_frames_rejected_total"
LIMITED = "enactive_connections_limited_total"


def make_pki(directory: Path) -> dict[str, Path]:
    """ca.pem; server.pem/.key for 127.0.0.1; client certificates robot-7.pem/.key and
    tester.pem/.key (a CN no identity names), PEM files signed by the CA."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e CA")])
    paths: dict[str, Path] = {}

    def issue(cn: str, key: ec.EllipticCurvePrivateKey, ca: bool = False) -> bytes:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(ca_name if ca else subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        else:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def save(name: str, data: bytes) -> None:
        paths[name] = directory / name
        paths[name].write_bytes(data)

    save("ca.pem", issue("e2e CA", ca_key, ca=True))
    for name in ("server", "robot-7", "tester"):
        key = ec.generate_private_key(ec.SECP256R1())
        save(f"{name}.pem", issue(name, key))
        save(
            f"{name}.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return paths


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, compilation_cache: str) -> Iterator[tuple]:
    tmp = tmp_path_factory.mktemp("tls")
    pki = make_pki(tmp)
    (tmp / "identities.toml").write_text(AUTH)
    extra = f"""
[security]
tls_cert_file = "{pki["server.pem"]}"
tls_key_file = "{pki["server.key"]}"
tls_client_ca_file = "{pki["ca.pem"]}"
auth_file = "{tmp / "identities.toml"}"
"""
    env = {"ENACTIVE_INGEST_UDP_ALLOW": '["10.0.0.0/8"]'}  # not 127.0.0.1, where tests send
    d = SecuredDaemon(tmp, compilation_cache, extra=extra, env=env)
    d.ca = pki["ca.pem"]
    d.start()
    yield d, pki
    d.kill()


class SecuredDaemon(DaemonProcess):
    """Reads `/metrics` over HTTPS, as Prometheus does: the CA, and a bearer token."""

    ca: Path

    def https(self, path: str, token: str | None = SCRAPER) -> tuple[int, dict, str]:
        context = ssl.create_default_context(cafile=str(self.ca))
        request = urllib.request.Request(f"https://127.0.0.1:{self.ports['metrics']}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as r:
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def http(self, path: str) -> tuple[int, str]:
        status, _, body = self.https(path)
        return status, body


def tls_connect(
    d: DaemonProcess, pki: dict[str, Path], cert: str | None, port: str = "tcp"
) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    if cert is not None:
        context.load_cert_chain(pki[f"{cert}.pem"], pki[f"{cert}.key"])
    raw = socket.create_connection(("127.0.0.1", d.ports[port]), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    d._sockets.append(sock)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except (ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def count(d: DaemonProcess, name: str, **labels: str) -> float:
    return d.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def test_plain_tcp_to_the_tls_port_fails_and_is_counted(secured: tuple) -> None:
    d, _ = secured
    before = count(d, LIMITED, listener="ingest.tcp", reason="tls_handshake")
    sock = d.connect()
    sock.sendall(encode_frame("arm-1", 1, 0.0, **payload(np.random.default_rng(0))))
    assert b"ESR1" not in read_until_closed(sock)
    labels = {"listener": "ingest.tcp", "reason": "tls_handshake"}
    assert d.wait_metric(LIMITED, labels, before + 1) == before + 1


def test_token_writes_its_prefix_and_other_streams_are_forbidden(secured: tuple) -> None:
    d, pki = secured
    rng = np.random.default_rng(1)
    processed = count(d, "enactive_frames_processed_total")
    forbidden = count(d, REJECTED, source="tcp", reason="forbidden")
    # Client certificates are required: this one's CN names no identity, the token does.
    sock = tls_connect(d, pki, "tester")
    frames = [
        encode_frame("arm-1", 1, 0.0, reply=True, start=True, **payload(rng)),
        encode_frame("leg-1", 1, 0.0, reply=True, start=True, **payload(rng)),
        encode_frame("arm-1", 2, 0.0, reply=True, **payload(rng)),
        encode_frame("robot-7.x", 1, 0.0, reply=True, start=True, **payload(rng)),
    ]
    sock.sendall(b"AUTH " + TOKEN.encode() + b"\n" + b"".join(frames))
    reader, replies = ReplyReader(), []
    deadline = time.monotonic() + 10
    while len(replies) < 2 and time.monotonic() < deadline:
        replies += reader.feed(sock.recv(1 << 16))
    assert [(r.reason, r.stream_id, r.seq) for r in replies] == [
        ("forbidden", "leg-1", 1),
        ("forbidden", "robot-7.x", 1),
    ]
    assert d.wait_metric("enactive_frames_processed_total", {}, processed + 2) == processed + 2
    assert count(d, REJECTED, source="tcp", reason="forbidden") == forbidden + 2
    # JSON lines after the AUTH line: answered with JSON error lines.
    js = tls_connect(d, pki, "tester")
    js.sendall(b"AUTH " + TOKEN.encode() + b"\r\n" + encode_json_frame("leg-2", 1, 0.0, start=True))
    line = js.recv(1 << 16)
    assert line.startswith(b'{"error":"forbidden"') and b'"stream":"leg-2"' in line


def test_bad_token_gets_err_unauthorized_and_is_counted(secured: tuple) -> None:
    d, pki = secured
    before = count(d, LIMITED, listener="ingest.tcp", reason="unauthorized")
    sock = tls_connect(d, pki, "tester")
    sock.sendall(b"AUTH not-the-token-0123456789abc\n" + encode_frame("arm-1", 9, 0.0))
    assert read_until_closed(sock) == b"ERR unauthorized\n"
    labels = {"listener": "ingest.tcp", "reason": "unauthorized"}
    assert d.wait_metric(LIMITED, labels, before + 1) == before + 1


def test_client_certificate_identity_writes_without_a_token(secured: tuple) -> None:
    d, pki = secured
    rng = np.random.default_rng(2)
    processed = count(d, "enactive_frames_processed_total")
    sock = tls_connect(d, pki, "robot-7")
    sock.sendall(
        encode_frame("robot-7.arm", 1, 0.0, reply=True, start=True, **payload(rng))
        + encode_frame("arm-9", 1, 0.0, reply=True, start=True, **payload(rng))
    )
    (reply,) = ReplyReader().feed(sock.recv(1 << 16))
    assert (reply.reason, reply.stream_id) == ("forbidden", "arm-9")
    assert d.wait_metric("enactive_frames_processed_total", {}, processed + 1) == processed + 1


def test_udp_from_outside_udp_allow_is_forbidden(secured: tuple) -> None:
    d, _ = secured
    before = count(d, REJECTED, source="udp", reason="forbidden")
    udp = d.udp()
    frame = encode_frame("arm-u", 1, 0.0, start=True, **payload(np.random.default_rng(3)))
    for _ in range(3):
        udp.sendto(frame, ("127.0.0.1", d.ports["udp"]))
    labels = {"source": "udp", "reason": "forbidden"}
    assert d.wait_metric(REJECTED, labels, before + 3) == before + 3


# --- the send command ----------------------------------------------------------------------------

SEND_DIMS = ["--state-dim", "8", "--proprio-dim", "6", "--tactile-dim", "4", "--motor-dim", "3"]


def send_cli(d: DaemonProcess, *flags: str) -> subprocess.CompletedProcess:
    """`enactive-stream send` to the daemon's TCP ingest, as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", "send", "--port", str(d.ports["tcp"]), *SEND_DIMS,
         *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def tls_flags(pki: dict[str, Path]) -> list[str]:
    """Trust the e2e CA; present the client certificate the daemon requires (its CN names
    no identity: the token decides)."""
    return ["--ca", str(pki["ca.pem"]), "--cert", str(pki["tester.pem"]),
            "--key", str(pki["tester.key"])]  # fmt: skip


def one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("transport", ["tcp", "json"])
def test_the_send_command_speaks_tls_and_authenticates(secured: tuple, transport: str) -> None:
    d, pki = secured
    processed = count(d, "enactive_frames_processed_total")
    r = send_cli(
        d, *tls_flags(pki), "--token", TOKEN, "--prefix", f"arm-send-{transport}",
        "--transport", transport, "--streams", "2", "--connections", "2", "--rate", "10",
        "--duration", "0.5", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["frames"], report["accepted"], report["rejected"]) == (10, 10, {})
    assert report["complete"] is True
    assert d.wait_metric("enactive_frames_processed_total", {}, processed + 10) >= processed + 10


@pytest.mark.parametrize("transport", ["tcp", "json"])
def test_the_send_command_reads_every_rejection_over_tls(secured: tuple, transport: str) -> None:
    d, pki = secured
    source = "tcp" if transport == "tcp" else "json"
    forbidden = count(d, REJECTED, source=source, reason="forbidden")
    # The token's identity may write "arm-" only: every "sim-" frame is rejected, and the
    # last replies come after the client's half-close (its TLS close_notify).
    r = send_cli(
        d, *tls_flags(pki), "--token", TOKEN, "--prefix", "sim", "--transport", transport,
        "--streams", "3", "--rate", "10", "--duration", "0.3", "--json",
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["frames"] == 9 and report["accepted"] == 0
    assert report["rejected"] == {"forbidden": 9}
    assert report["complete"] is True
    labels = {"source": source, "reason": "forbidden"}
    assert d.wait_metric(REJECTED, labels, forbidden + 9) == forbidden + 9


def test_the_send_command_with_a_wrong_token_says_so_in_one_line(secured: tuple) -> None:
    d, pki = secured
    labels = {"listener": "ingest.tcp", "reason": "unauthorized"}
    before = count(d, LIMITED, **labels)
    r = send_cli(d, *tls_flags(pki), "--token", "not-the-token-0123456789abc", "--duration", "0")
    assert r.returncode == 1
    assert one_line(r) == (
        "enactive-stream: error: the daemon refused the credentials: ERR unauthorized "
        "(check --token, --cert and --key)"
    )
    assert r.stdout == ""
    assert d.wait_metric(LIMITED, labels, before + 1) == before + 1


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        ([], "(does it require TLS? --tls, --ca)"),
        (["--ca", "CA", "--token", TOKEN], "(does it require a client certificate, --cert and"),
    ],
    ids=["plain", "no-client-certificate"],
)
def test_the_send_command_cut_off_by_the_tls_daemon_says_so_in_one_line(
    secured: tuple, flags: list[str], hint: str
) -> None:
    d, pki = secured
    labels = {"listener": "ingest.tcp", "reason": "tls_handshake"}
    before = count(d, LIMITED, **labels)
    flags = [str(pki["ca.pem"]) if f == "CA" else f for f in flags]
    # Ten ticks over 0.9 s: the daemon drops the connection at its first bytes, long
    # before the last tick.
    r = send_cli(d, *flags, "--prefix", "arm-cut", "--rate", "10", "--duration", "1")
    assert r.returncode == 1, r.stdout
    line = one_line(r)
    assert line.startswith(
        "enactive-stream: error: the daemon closed the connection before the last frame was sent"
    ), line
    assert hint in line
    assert d.wait_metric(LIMITED, labels, before + 1) == before + 1


def test_the_send_command_with_an_untrusted_daemon_certificate_fails_in_one_line(
    secured: tuple,
) -> None:
    d, _ = secured
    r = send_cli(d, "--tls", "--token", TOKEN, "--duration", "0")  # the system CAs only
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith(f"enactive-stream: error: TLS with 127.0.0.1:{d.ports['tcp']}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--transport", "udp", "--tls"], 2),
        (["--transport", "udp", "--token", TOKEN], 2),
        (["--transport", "udp", "--ca", "ca.pem"], 2),
        (["--ca", "/nonexistent/ca.pem"], 1),
        (["--tls", "--cert", "/nonexistent/client.pem"], 1),
    ],
)
def test_the_send_command_refuses_bad_tls_flags_in_one_line(
    flags: list[str], expected: int, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream.cli import main

    assert main(["send", "--port", "1", *flags]) == expected
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    if expected == 2:
        assert lines[0].startswith("enactive-stream: error: --transport udp carries no TLS")
    else:
        assert lines[0].startswith("enactive-stream: error: --")
        assert "/nonexistent/" in lines[0] and "No such file or directory" in lines[0]


# --- the subscriber and metrics listeners ------------------------------------------------------


def test_unauthenticated_subscriber_is_refused_and_counted(secured: tuple) -> None:
    d, pki = secured
    labels = {"listener": "output.tcp", "reason": "unauthorized"}
    before = count(d, LIMITED, **labels)
    sock = tls_connect(d, pki, "tester", port="output")  # a CN no identity names, no token
    sock.sendall(b"SUB binary *\n")
    assert read_until_closed(sock) == b"ERR unauthorized\n"
    assert d.wait_metric(LIMITED, labels, before + 1) == before + 1


def test_subscriber_reads_only_its_identitys_prefixes(secured: tuple) -> None:
    d, pki = secured
    rng = np.random.default_rng(4)
    subscribers = count(d, "enactive_subscribers")
    sub = tls_connect(d, pki, "tester", port="output")
    sub.sendall(b"AUTH " + READER.encode() + b"\nSUB binary *\n")
    assert d.wait_metric("enactive_subscribers", {}, subscribers + 1) == subscribers + 1
    processed = count(d, "enactive_frames_processed_total")
    robot = tls_connect(d, pki, "robot-7")
    robot.sendall(b"".join(
        encode_frame("robot-7.sub", i, 0.0, start=i == 1, **payload(rng)) for i in (1, 2, 3)
    ))  # fmt: skip
    assert d.wait_metric("enactive_frames_processed_total", {}, processed + 3) == processed + 3
    arm = tls_connect(d, pki, "tester")
    arm.sendall(b"AUTH " + TOKEN.encode() + b"\n" + b"".join(
        encode_frame("arm-sub", i, 0.0, start=i == 1, **payload(rng)) for i in (1, 2, 3)
    ))  # fmt: skip
    reader, got = MomentReader(), []
    deadline = time.monotonic() + 30
    while len(got) < 3 and time.monotonic() < deadline:
        got += reader.feed(sub.recv(1 << 16))
    assert [(m.stream_id, m.seq) for m in got] == [("arm-sub", 1), ("arm-sub", 2), ("arm-sub", 3)]


def test_the_subscribe_command_speaks_tls_and_authenticates(secured: tuple) -> None:
    d, pki = secured
    rng = np.random.default_rng(5)
    subscribers = count(d, "enactive_subscribers")
    cli = subprocess.Popen(
        [
            sys.executable, "-m", "stream.cli", "subscribe", "*",
            "--port", str(d.ports["output"]), "--count", "2", "--timeout", "30",
            "--ca", str(pki["ca.pem"]), "--cert", str(pki["tester.pem"]),
            "--key", str(pki["tester.key"]), "--token", READER,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert d.wait_metric("enactive_subscribers", {}, subscribers + 1) == subscribers + 1
        robot = tls_connect(d, pki, "robot-7")  # not readable for this identity
        robot.sendall(encode_frame("robot-7.cli", 1, 0.0, start=True, **payload(rng)))
        arm = tls_connect(d, pki, "tester")
        arm.sendall(b"AUTH " + TOKEN.encode() + b"\n" + b"".join(
            encode_frame("arm-cli", i, 0.0, start=i == 1, **payload(rng)) for i in (1, 2)
        ))  # fmt: skip
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(m["stream"], m["seq"]) for m in lines] == [("arm-cli", 1), ("arm-cli", 2)]


def test_the_subscribe_command_without_credentials_says_so_in_one_line(secured: tuple) -> None:
    d, pki = secured
    out = subprocess.run(
        [
            sys.executable, "-m", "stream.cli", "subscribe", "*",
            "--port", str(d.ports["output"]), "--timeout", "10",
            "--ca", str(pki["ca.pem"]), "--cert", str(pki["tester.pem"]),
            "--key", str(pki["tester.key"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip() == "enactive-stream: error: ERR unauthorized"


def test_metrics_over_https_need_a_token_and_probes_stay_open(secured: tuple) -> None:
    d, _ = secured
    unauthorized = {"listener": "metrics.listen", "reason": "unauthorized"}
    before = count(d, LIMITED, **unauthorized)
    for token in (None, READER):  # none, and an identity without metrics = true
        status, headers, _ = d.https("/metrics", token=token)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = d.https("/metrics")
    assert status == 200 and "enactive_ready 1.0" in body
    assert count(d, LIMITED, **unauthorized) == before + 2
    # The probes, with neither a token nor a client certificate.
    assert d.https("/healthz", token=None)[::2] == (200, "ok\n")
    assert d.https("/readyz", token=None)[::2] == (200, "ready\n")


def test_plain_http_to_the_https_port_fails_and_is_counted(secured: tuple) -> None:
    d, _ = secured
    labels = {"listener": "metrics.listen", "reason": "tls_handshake"}
    before = count(d, LIMITED, **labels)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{d.ports['metrics']}/healthz", timeout=5)
    assert d.wait_metric(LIMITED, labels, before + 1) == before + 1


# --- the exposure policy at start --------------------------------------------------------------

# "127.1" is a name the policy does not resolve, so it counts as beyond loopback, while the
# resolver maps it to 127.0.0.1: these tests never open a port beyond loopback.


def test_exposed_listener_without_tls_and_auth_refuses_to_start(
    tmp_path: Path, compilation_cache: str
) -> None:
    config = DaemonProcess(tmp_path, compilation_cache).config
    r = subprocess.run(
        [sys.executable, "-m", "stream.cli", "run", "--config", str(config),
         "--set", "ingest.tcp=127.1:0"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("enactive-stream: error: ingest.tcp = 127.1:0: bound beyond")
    assert "security.insecure = true" in lines[0]


def test_insecure_starts_and_warns_naming_the_listeners(
    tmp_path: Path, compilation_cache: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache, extra="\n[security]\ninsecure = true\n")
    d.config.write_text(d.config.read_text().replace('udp = "127.0.0.1:0"', 'udp = "127.1:0"'))
    d.start()
    try:
        warnings = [line for line in d.output().splitlines() if " WARNING " in line]
        assert any(
            "security.insecure = true: ingest.udp = 127.1:0 accepts anyone" in w for w in warnings
        ), d.output()
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.mark.parametrize("key", ["output.tcp", "metrics.listen"])
def test_check_config_applies_the_policy_of_run(
    tmp_path: Path, compilation_cache: str, key: str
) -> None:
    d = DaemonProcess(tmp_path, compilation_cache)
    section, name = key.split(".")
    text = d.config.read_text()
    old = f'[{section}]\n{name} = "127.0.0.1:0"'
    assert old in text
    d.config.write_text(text.replace(old, f'[{section}]\n{name} = "127.1:0"'))
    lines = []
    for command in (["check-config", str(d.config)], ["run", "--config", str(d.config)]):
        r = subprocess.run(
            [sys.executable, "-m", "stream.cli", *command],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
        lines.append(r.stderr.strip())
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"enactive-stream: error: {key} = 127.1:0: bound beyond loopback")
