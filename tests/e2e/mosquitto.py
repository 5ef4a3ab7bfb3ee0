"""A real mosquitto broker started by the tests (on a free loopback port, with a generated
configuration and a persistence directory), and a small synchronous MQTT client for them
(paho-mqtt's own network thread)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .daemon import free_ports, need


def need_mosquitto() -> str:
    """The `mosquitto` binary and paho-mqtt (the mqtt extra), or skip (fail in CI, which
    installs both)."""
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        binary = None
    need("mosquitto (apt install mosquitto) and paho-mqtt (the mqtt extra)", binary is not None)
    assert binary is not None
    return binary


class Mosquitto:
    """mosquitto on loopback, persisting to `store`; restartable on the same port and store
    (`restart`). `anonymous`: whether clients without credentials may connect; `tls`: the
    `ca.pem`, `server.pem`, `server.key` of a second listener (`tls_port`) that requires a
    client certificate; `extra` lines go into its configuration file."""

    def __init__(
        self,
        store: Path,
        extra: str = "",
        *,
        anonymous: bool = True,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.binary = need_mosquitto()
        self.store = store
        store.mkdir(parents=True, exist_ok=True)
        self.port, tls_port = free_ports(2)
        self.tls_port = tls_port if tls else 0
        self.config = store / "mosquitto.conf"
        tls_listener = (
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {tls['ca.pem']}\ncertfile {tls['server.pem']}\nkeyfile {tls['server.key']}\n"
            "require_certificate true\n"
            if tls
            else ""
        )
        self.config.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {store}/\n"
            "max_queued_messages 1000000\n"  # a persistent session keeps what comes
            f"log_dest file {store}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            # Started as root, mosquitto switches to the user `mosquitto`, who could not
            # write the store: keep the user it was started as.
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra
            + tls_listener
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.store / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 20.0) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not self._answers():  # ready once it answers a CONNECT with a CONNACK
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {err}{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto not answering on {self.port}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                # CONNECT, MQTT 3.1.1, clean session, keepalive 5 s, client id "ready"
                s.sendall(b"\x10\x11\x00\x04MQTT\x04\x02\x00\x05\x00\x05ready")
                return s.recv(4)[:1] == b"\x20"
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: it saves its persistence file first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()


class Client:
    """A paho-mqtt client on its own network thread: publish and wait for the broker's
    acknowledgements, or subscribe and collect what arrives."""

    def __init__(self, port: int, client_id: str = "", *, v5: bool = True) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[Any] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_message = self._arrived
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("no CONNACK")

    def _arrived(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(message)

    def subscribe(self, topic: str, qos: int = 1) -> Client:
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        if not self._subscribed.wait(10):
            raise TimeoutError("no SUBACK")
        return self

    def received(self) -> list[Any]:
        with self._lock:
            return list(self.messages)

    def publish_many(self, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
        """Publish in order and wait until the broker has them all."""
        infos = [self.client.publish(topic, payload, qos) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(30)
            if not info.is_published():
                raise TimeoutError("a publication was not acknowledged")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
