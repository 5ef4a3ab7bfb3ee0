"""Connecting to an MQTT broker (the optional extra `mqtt`, client paho-mqtt).

The MQTT source (`stream.sources.mqtt`) and moments sink (`stream.sinks.mqtt`) each hold
one connection made here, under client ids of their own (`client_id` and
`client_id-moments`, so they never take each other's session over).

```
 paho.Client ──on_socket_close, on_socket_(un)register_write──► Connection ──add_reader──► loop
      ▲                                                                        add_writer      │
      └─────────────────── loop_read / loop_write / loop_misc (every second) ◄────────────────┘
```

**Why paho, driven here, and not aiomqtt.** aiomqtt 2.5 does not expose paho's manual
acknowledgements (empicano/aiomqtt#345, #346 unmerged), cannot stop reading while the
daemon is full, and awaits every publication with a task of its own; paho has a
documented interface for an event loop of one's own (`on_socket_*`, `loop_read`,
`loop_write`, `loop_misc`), which `Connection` implements on the asyncio loop. The socket
is registered with the loop while paho holds it and unregistered, synchronously, before
paho closes it (a file descriptor is never left registered for a later socket to inherit).

**Protocol.** MQTT 5 by default: the source connects with Clean Start = not
`persistent_session`, Session Expiry Interval = `session_expiry_s` (0 without a
persistent session) and a Receive Maximum of `RECEIVE_MAXIMUM` (the broker sends at most
that many QoS 1 messages the daemon has not acknowledged); the sink always starts clean
(it has nothing to resume). A broker that refuses MQTT 5 (CONNACK "unsupported protocol
version", or an MQTT 3.1.1 refusal) is spoken to in MQTT 3.1.1 from then on
(Clean Session = not `persistent_session`).

**Connecting.** The first connection is retried with `backoff()` for up to
`connect_timeout_s` (a daemon started beside its broker waits for it); then, or at once
when the broker refuses the credentials or the client id, `MqttError` names the URL and the
last error in one line. A connection lost later is made again by the source and sink
themselves, with the same backoff and without limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    import paho.mqtt.client as paho

__all__ = [
    "Connection",
    "Link",
    "LinkLost",
    "MqttError",
    "MqttSettings",
    "backoff",
    "require_mqtt",
    "topic_prefix",
]

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0
"""Reconnecting: the first attempt at once, then after `FIRST_BACKOFF_S`, doubling up to
`MAX_BACKOFF_S`."""
CONNACK_TIMEOUT_S = 10.0
"""How long one attempt waits for the broker's CONNACK (and a SUBACK)."""
TCP_CONNECT_TIMEOUT_S = 5.0
"""How long one attempt waits for the TCP connection (and the TLS handshake)."""
V311_IN_FLIGHT = 64
"""QoS 1 publications awaiting the broker's PUBACK at once under MQTT 3.1.1 (which has no
Receive Maximum to say how many the broker takes)."""
MISC_INTERVAL_S = 1.0
"""How often paho's `loop_misc` runs (keepalive pings, and their timeouts)."""
READS_PER_WAKEUP = 64
"""Packets read per readable event at most before the loop runs other callbacks."""
_FATAL_CONNACK = {0x85, 0x86, 0x87, 0x8A, 0x8C}
"""CONNACK refusals that retrying does not cure: client id not valid, bad user name or
password, not authorized, banned, bad authentication method."""
_UNSUPPORTED_PROTOCOL = 0x84
_LOG_ERR = 8
"""paho's `LogLevel.MQTT_LOG_ERR`."""


class MqttError(Exception):
    """An MQTT set-up failure the operator must fix (one line: no broker, refused
    credentials, a refused subscription, unreadable TLS files, the extra not installed)."""


def require_mqtt() -> None:
    """Raise `MqttError` when the `mqtt` extra is not installed."""
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        raise MqttError(
            "the MQTT source and sink need the mqtt extra: pip install 'enactive-stream[mqtt]'"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class MqttSettings:
    """What connecting is made from (the `[mqtt]` section).

    - `url`: `mqtt://host:port` or `mqtts://host:port` (TLS); the port defaults to 1883 /
        8883.
    - `client_id`: the source's client id (the sink's is `client_id + "-moments"`).
    - `persistent_session`, `session_expiry_s`: whether the broker keeps the source's
        session (its subscription, and the QoS 1 messages that arrive while the daemon is
        away) and for how long after a disconnection.
    - `keepalive_s`: the MQTT keepalive.
    - `username`, `password`: credentials ("" for none).
    - `tls_ca_file`, `tls_cert_file`, `tls_key_file`: TLS (an `mqtts://` URL, or a CA file,
        turns it on).
    - `connect_timeout_s`: how long the first connection is retried.
    - `protocol`: `"5"` (MQTT 5, falling back to 3.1.1 for a broker that refuses it) or
        `"3.1.1"` (no session expiry, no Receive Maximum: the broker's own limits; paho
        reads a 3.1.1 PUBLISH without building MQTT 5 properties, about 3× cheaper).
    """

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = "enactive-stream"
    persistent_session: bool = True
    session_expiry_s: int = 86400
    keepalive_s: int = 30
    username: str = ""
    password: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    connect_timeout_s: float = 30.0
    protocol: str = "5"

    def __post_init__(self) -> None:
        if self.protocol not in ("5", "3.1.1"):
            raise ValueError(f'protocol={self.protocol!r}, expected "5" or "3.1.1"')

    @property
    def address(self) -> tuple[str, int]:
        """`(host, port)` from the URL."""
        scheme, _, rest = self.url.partition("://")
        host, port = rest, ""
        if rest.startswith("["):  # [v6 address]:port
            host, _, after = rest[1:].partition("]")
            port = after.removeprefix(":")
        elif ":" in rest:
            host, _, port = rest.rpartition(":")
        default = 8883 if scheme == "mqtts" else 1883
        return host or "127.0.0.1", int(port) if port else default

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("mqtts://") or bool(self.tls_ca_file or self.tls_cert_file)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context, or None without TLS.

        **Raises:** `MqttError` when a TLS file cannot be read."""
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca_file or None)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file or None)
        except (OSError, ssl.SSLError) as e:
            raise MqttError(f"mqtt TLS files: {e}") from None
        return context


def topic_prefix(topics: str) -> str:
    """The literal levels of a topic filter before its last (wildcard) level, with their
    slash: `sensors/` for `sensors/#`, `site/a/` for `site/a/+`."""
    return topics.rpartition("/")[0] + "/"


def backoff() -> Iterator[float]:
    """Waits before successive attempts: 0, then `FIRST_BACKOFF_S` doubling up to
    `MAX_BACKOFF_S`."""
    yield 0.0
    wait = FIRST_BACKOFF_S
    while True:
        yield wait
        wait = min(wait * 2, MAX_BACKOFF_S)


class _Refused(Exception):
    """The broker refused the connection for a reason retrying does not cure
    (`args`: the message, the CONNACK reason code)."""


class LinkLost(Exception):
    """One attempt at a connection or subscription failed, or the connection was lost
    (the message says why)."""


class Connection:
    """One connection to the broker: a paho client driven on the asyncio event loop.

    **Arguments:** `client`, a paho client that has just connected (its CONNECT sent);
    `url`, the broker's (for messages); `on_change`, called on the event loop once the
    connection is lost.

    - `lost` is set once the connection is gone; `cause` says why.
    - `session_present`, `receive_maximum` (the broker's: how many QoS 1/2 publications
      it takes unconfirmed) are known once `connected` is set.
    - `pause_reading()` / `resume_reading()`: stop and restart reading the socket, so the
      broker (through TCP) holds what the daemon cannot take yet.
    """

    def __init__(self, client: paho.Client, url: str, *, on_change: Callable[[], None]) -> None:
        self.client = client
        self.url = url
        self.on_change = on_change
        self.loop = asyncio.get_running_loop()
        self.connected = anyio.Event()
        self.lost = anyio.Event()
        self.cause = ""
        self.refusal: Any = None  # a negative CONNACK's reason code
        self.error = ""  # the last error paho logged while connecting
        self.session_present = False
        self.receive_maximum = 65535
        self.progress = 0  # packets handled that reached a callback (see `_readable`)
        self._subscribed: dict[int, Any] = {}
        self._suback = anyio.Event()
        self._fd = -1
        self._reading = False
        self._paused = False
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None

    # -- paho's external-loop interface ---------------------------------------------------------

    def attach(self) -> None:
        """Take over the socket paho has just opened (its CONNECT written or queued)."""
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        for name in ("on_message", "on_publish"):  # what `_readable` counts as progress
            callback = getattr(c, name)
            if callback is not None:
                setattr(c, name, self._counted(callback))
        sock = c.socket()
        if sock is None:
            raise LinkLost("the connection closed at once")
        self._fd = sock.fileno()
        self._start_reading()
        if c.want_write():
            self._on_register_write(c, None, sock)
        self._timer = self.loop.call_later(MISC_INTERVAL_S, self._misc)

    def _counted(self, callback: Callable[..., None]) -> Callable[..., None]:
        def counted(*args: Any) -> None:
            self.progress += 1
            callback(*args)

        return counted

    def _start_reading(self) -> None:
        if not self._reading and not self._paused and self._fd >= 0:
            self.loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def pause_reading(self) -> None:
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        self._paused = False
        self._start_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    def _readable(self) -> None:
        # paho reads one packet per `loop_read` (more only while its own publications
        # are in flight): read on while packets keep coming, up to `READS_PER_WAKEUP`,
        # rather than wait for the loop's next turn for each. A packet that reaches no
        # callback (a PINGRESP) ends the round early; the loop calls again if more wait.
        c = self.client
        try:
            for _ in range(READS_PER_WAKEUP):
                before = self.progress
                if c.loop_read() or self._paused:
                    break
                if self.progress == before:
                    sock = c.socket()
                    if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                        break
        except Exception as e:  # paho failed on what it read: the connection is unusable
            self._fail(f"{type(e).__name__}: {e}")

    def _writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")

    def _misc(self) -> None:
        self._timer = None
        try:
            self.client.loop_misc()
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")
        if not self.lost.is_set():
            self._timer = self.loop.call_later(MISC_INTERVAL_S, self._misc)

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if not self._writing and self._fd >= 0:
            self.loop.add_writer(self._fd, self._writable)
            self._writing = True

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # Called by paho just before it closes the socket: unregister it now.
        self._on_unregister_write(client, userdata, sock)
        self._stop_reading()
        self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, cause: str) -> None:
        """Give the connection up (paho raised): close the socket, report the loss."""
        if not self.cause:
            self.cause = cause
        sock = self.client.socket()
        if sock is not None:
            self._on_socket_close(self.client, None, sock)
            try:
                sock.close()
            except OSError:
                pass
        self._lose()

    def _lose(self) -> None:
        if not self.lost.is_set():
            self.lost.set()
            self._suback.set()
            self.on_change()

    # -- paho's callbacks ---------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.refusal = reason
            self.cause = f"refused: {reason}"
            return  # paho closes the connection (and calls `_on_disconnect`)
        self.session_present = bool(flags.session_present)
        maximum = getattr(props, "ReceiveMaximum", None)
        if client.protocol == 5:
            self.receive_maximum = int(maximum) if maximum else 65535
        else:
            self.receive_maximum = V311_IN_FLIGHT
        self.connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not self.cause:
            by = "the broker disconnected: " if flags.is_disconnect_packet_from_server else ""
            self.cause = f"{by}{reason}"
            if not by and int(getattr(reason, "value", 0)) == 0x80:
                # paho's "Unspecified error": the socket failed (what paho logged says
                # how) or the broker closed it
                self.cause = self.error or "the broker closed the connection"
        self._lose()

    def _on_log(self, client: Any, userdata: Any, level: int, message: str) -> None:
        if level == _LOG_ERR:
            self.error = message

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._subscribed[mid] = codes
        self._suback.set()

    # -- what users of the connection call ------------------------------------------------

    async def subscribe(self, topics: str, qos: int) -> None:
        """Subscribe to `topics` at `qos` (MQTT 5: retained messages only for a new
        subscription, so a resubscription after a reconnection repeats none).

        **Raises:** `MqttError` when the broker refuses; `LinkLost` when the connection is
        lost or the SUBACK does not come within `CONNACK_TIMEOUT_S`."""
        from paho.mqtt.subscribeoptions import SubscribeOptions

        c = self.client
        if c.protocol == 5:
            options = SubscribeOptions(
                qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            rc, mid = c.subscribe(topics, options=options)
        else:
            rc, mid = c.subscribe(topics, qos)
        if rc or mid is None:
            raise LinkLost(f"subscribe: {rc}")
        with anyio.move_on_after(CONNACK_TIMEOUT_S):
            while mid not in self._subscribed and not self.lost.is_set():
                self._suback = anyio.Event()
                await self._suback.wait()
        codes = self._subscribed.pop(mid, None)
        if codes is None:
            raise LinkLost(self.cause or "no SUBACK")
        code = codes[0]
        if getattr(code, "is_failure", False):
            raise MqttError(f"the MQTT broker at {self.url} refused the subscription to "
                            f"{topics!r}: {code}")  # fmt: skip

    async def close(self, wait_s: float = 2.0) -> None:
        """Disconnect cleanly (a DISCONNECT, which keeps a persistent session) within
        `wait_s` seconds, else drop the socket."""
        if self.lost.is_set():
            return
        with anyio.move_on_after(wait_s, shield=True):
            self.client.disconnect()
            await self.lost.wait()
        if not self.lost.is_set():
            self._fail("closed")


class Link:
    """One client identity's connection to the broker, made (`first`) and made again
    after a loss (`again`).

    **Arguments:**

    - `settings`: the broker and credentials.
    - `client_id`; `clean_start`, `session_expiry_s`: its session;
        `receive_maximum`: QoS 1/2 messages the broker may send it unacknowledged (None:
        the protocol's 65535); `manual_ack`: PUBACKs are sent by the user (`ack`), not by
        paho as each message arrives.
    - `on_change`: called on the event loop when a connection is lost.
    - `prepare(connection)`: sets callbacks (`on_message`, `on_publish`) on each new
        connection's paho client (`connection.client`) before it connects.
    - `subscribe`: `(topic filter, qos)` to subscribe to on every connection, or None.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        clean_start: bool,
        session_expiry_s: int,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        on_change: Callable[[], None] = lambda: None,
        prepare: Callable[[Connection], None] = lambda connection: None,
        subscribe: tuple[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s if not clean_start else 0
        self.receive_maximum = receive_maximum
        self.manual_ack = manual_ack
        self.on_change = on_change
        self.prepare = prepare
        self.subscription = subscribe
        self.v5 = settings.protocol == "5"  # until the broker refuses MQTT 5

    async def first(self) -> Connection:
        """The first connection (and subscription), retried with `backoff()` for up to
        `settings.connect_timeout_s`.

        **Raises:** `MqttError` naming the URL and the last error, once the time is up,
        or at once for a refusal retrying does not cure (credentials, client id, the
        subscription)."""
        require_mqtt()
        s = self.settings
        s.tls_context()  # unreadable TLS files: at once
        deadline = anyio.current_time() + s.connect_timeout_s
        last = "no answer"
        for wait in backoff():
            if wait and anyio.current_time() + wait > deadline:
                break
            await anyio.sleep(wait)
            try:
                return await self._connect_and_subscribe()
            except _Refused as e:
                raise MqttError(f"cannot connect to MQTT at {s.url}: {e.args[0]}") from None
            except LinkLost as e:
                last = str(e)
                log.debug("mqtt (%s): %s", self.client_id, last)
        raise MqttError(f"cannot connect to MQTT at {s.url}: {last}")

    async def again(self) -> Connection:
        """A connection made again after one was lost: attempts with `backoff()` until
        one succeeds and its subscription is granted, however long it takes (cancel to
        give up). A refusal is logged once and retried: credentials or an ACL may be
        fixed while the daemon waits."""
        warned = False
        for wait in backoff():
            await anyio.sleep(wait)
            try:
                return await self._connect_and_subscribe()
            except (_Refused, MqttError, LinkLost) as e:
                if not isinstance(e, LinkLost) and not warned:
                    log.warning("mqtt (%s): %s; retrying", self.client_id, e.args[0])
                    warned = True
                log.debug("mqtt (%s) reconnecting: %s", self.client_id, e.args[0])
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect_and_subscribe(self) -> Connection:
        connection = await self._connect()
        if self.subscription is not None:
            try:
                await connection.subscribe(*self.subscription)
            except BaseException:
                await connection.close()
                raise
        return connection

    async def _connect(self) -> Connection:
        """One attempt (MQTT 5; MQTT 3.1.1 from the broker's first refusal of 5 on).

        **Raises:** `_Refused` (credentials, client id), `LinkLost` (anything else)."""
        while True:
            try:
                return await self._attempt()
            except _Refused as e:
                if self.v5 and e.args[1] == _UNSUPPORTED_PROTOCOL:
                    log.info(
                        "mqtt: the broker at %s refused MQTT 5; using MQTT 3.1.1",
                        self.settings.url,
                    )
                    self.v5 = False
                    continue
                raise

    async def _attempt(self) -> Connection:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.settings
        tls = s.tls_context()
        host, port = s.address
        v5 = self.v5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else self.clean_start,
            reconnect_on_failure=False,
            manual_ack=self.manual_ack,
        )
        client.max_inflight_messages_set(0)  # the sink keeps its own window (paho's is O(n))
        client.connect_timeout = TCP_CONNECT_TIMEOUT_S
        client.suppress_exceptions = False
        if s.username:
            client.username_pw_set(s.username, s.password or None)
        if tls is not None:
            client.tls_set_context(tls)
        connection = Connection(client, s.url, on_change=self.on_change)
        self.prepare(connection)
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry_s
            if self.receive_maximum:
                properties.ReceiveMaximum = self.receive_maximum
        clean_start = self.clean_start if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY

        def blocking_connect() -> None:
            # DNS, TCP and the TLS handshake block: in a worker thread. paho writes the
            # CONNECT itself (no socket callbacks are set yet).
            client.connect(
                host, port, s.keepalive_s, clean_start=clean_start, properties=properties
            )

        # paho's error lines while connecting (a TLS alert) say more than its reason
        # codes; only then: with `on_log` set, paho formats a line for every packet.
        client.on_log = connection._on_log
        try:
            await anyio.to_thread.run_sync(blocking_connect, abandon_on_cancel=True)
        except (OSError, ValueError, ssl.SSLError) as e:
            _close_sockets_in(e)
            raise LinkLost(_describe(e)) from None
        try:
            connection.attach()
            with anyio.move_on_after(CONNACK_TIMEOUT_S):
                while not connection.connected.is_set() and not connection.lost.is_set():
                    await _first_of(connection.connected, connection.lost)
        except BaseException:
            connection._fail("cancelled")
            raise
        client.on_log = None
        if connection.connected.is_set() and not connection.lost.is_set():
            return connection
        if not connection.lost.is_set():
            connection._fail("no CONNACK")
        refusal = connection.refusal
        if refusal is not None:
            code = int(refusal.value)
            if code in _FATAL_CONNACK or code == _UNSUPPORTED_PROTOCOL:
                raise _Refused(f"the broker refused the connection: {refusal}", code)
        raise LinkLost(connection.cause or "no CONNACK")


async def _first_of(*events: anyio.Event) -> None:
    """Return once one of `events` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


def _close_sockets_in(e: BaseException) -> None:
    """Close the sockets the frames of a failed `connect` hold: paho leaves the socket of
    a failed TLS handshake open, to the garbage collector."""
    for frame, _ in traceback.walk_tb(e.__traceback__):
        for value in frame.f_locals.values():
            if isinstance(value, socket.socket):
                value.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
