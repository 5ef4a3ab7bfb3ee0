"""The MQTT connection settings, topic levels and backoff, without a broker."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from stream.failures import startup_cause
from stream.mqtt import MqttError, MqttSettings, backoff, topic_prefix


@pytest.mark.parametrize(
    ("url", "address", "tls"),
    [
        ("mqtt://broker.local:1884", ("broker.local", 1884), False),
        ("mqtt://10.0.0.5", ("10.0.0.5", 1883), False),
        ("mqtts://broker.local", ("broker.local", 8883), True),
        ("mqtts://[::1]:8884", ("::1", 8884), True),
        ("mqtt://[fe80::1]", ("fe80::1", 1883), False),
    ],
)
def test_the_url_gives_host_port_and_tls(url: str, address: tuple[str, int], tls: bool) -> None:
    s = MqttSettings(url=url)
    assert s.address == address
    assert s.uses_tls is tls
    assert (s.tls_context() is not None) is tls


def test_a_ca_file_turns_tls_on_and_an_unreadable_one_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    s = MqttSettings(url="mqtt://127.0.0.1:1883", tls_ca_file=str(missing))
    assert s.uses_tls
    with pytest.raises(MqttError) as e:
        s.tls_context()
    assert str(e.value).startswith("mqtt TLS files: ")
    assert "\n" not in str(e.value)


def test_protocol_is_5_or_311() -> None:
    assert MqttSettings(protocol="3.1.1").protocol == "3.1.1"
    with pytest.raises(ValueError, match="protocol='4'"):
        MqttSettings(protocol="4")


@pytest.mark.parametrize(
    ("topics", "prefix"),
    [("sensors/#", "sensors/"), ("sensors/+", "sensors/"), ("site/a/robots/#", "site/a/robots/")],
)
def test_the_stream_id_is_the_topic_after_the_literal_levels(topics: str, prefix: str) -> None:
    assert topic_prefix(topics) == prefix


def test_backoff_at_once_then_50_ms_doubling_to_5_s() -> None:
    waits = list(itertools.islice(backoff(), 11))
    assert waits == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_an_mqtt_error_is_a_one_line_start_up_failure() -> None:
    cause = startup_cause(MqttError("cannot connect to MQTT at mqtt://x:1883: Connection refused"))
    assert cause == "cannot connect to MQTT at mqtt://x:1883: Connection refused"
    group = ExceptionGroup("start", [MqttError("a"), MqttError("a")])
    assert startup_cause(group) == "a"  # the source's and the sink's, said once


def test_without_paho_the_extra_is_named() -> None:
    code = (
        "import sys; sys.modules['paho'] = None\n"
        "import stream.mqtt\n"
        "try:\n"
        "    stream.mqtt.require_mqtt()\n"
        "except stream.mqtt.MqttError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == (
        "the MQTT source and sink need the mqtt extra: pip install 'enactive-stream[mqtt]'"
    )
