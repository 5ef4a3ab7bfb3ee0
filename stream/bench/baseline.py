"""The baseline: the per-frame jitted asyncio service a user would write by hand.

```
python -m stream.bench.baseline --ready-file FILE [--model JSON] [--cache-dir DIR]
```

One asyncio process, no batching: a TCP server reads binary frames with the project's own
codec (`FrameReader`), keeps each stream's state in a dict, calls a `jax.jit`-compiled
per-frame step of the same `EnactiveModel` for every frame (parameters closed over, the
payload passed as one array — the cheapest call a user would write), and writes each
binary moment (`encode_moment`) to every subscriber. Subscribers connect to the output
port and send `SUB binary *`, as with the daemon; a minimal `/metrics` reports
`enactive_subscribers` and frame counters so the benchmark client and runner treat both
services alike. The ready file (JSON ports and pid, written atomically) appears once the
step is compiled; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from stream.protocol import (
    ALL_PRESENT,
    FLAG_ABSENT,
    Dims,
    Frame,
    FrameReader,
    FrameRejected,
    FramingLost,
    Moment,
    MomentSizes,
    encode_moment,
)

__all__ = ["BaselineService", "main"]

READ_BYTES = 1 << 16


class BaselineService:
    """Per-frame jitted processing with per-stream state in a dict.

    **Arguments:**

    - `model_kwargs`: `processors.ModelConfig` keyword arguments (default: its defaults).
    - `seed`: parameter seed (`jax.random.PRNGKey(seed)`).
    """

    def __init__(self, model_kwargs: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        import jax
        import jax.numpy as jnp

        from processors import EnactiveModel, ModelConfig, pack_record

        config = ModelConfig(**(model_kwargs or {}))
        model = EnactiveModel(config, key=jax.random.PRNGKey(seed))
        self.dims = Dims(config.state_dim, config.proprio_dim, config.tactile_dim, config.motor_dim)
        assert config.moment_dim is not None
        self.sizes = MomentSizes(
            config.moment_dim, config.state_dim, config.proprio_dim, config.motor_dim
        )
        cuts = np.cumsum(self.dims)[:-1].tolist()

        @jax.jit
        def step(state: Any, payload: Any, present: Any) -> tuple[Any, Any]:
            sensory, proprio, tactile, motor = jnp.split(payload, cuts)
            state, out = model(state, sensory, proprio, tactile, motor, present)
            return state, pack_record(out)

        self._step = step
        self._init = model.init_state()
        self._present = [np.array([bool(m >> i & 1) for i in range(4)]) for m in range(16)]
        self.states: dict[str, Any] = {}
        self.processed = 0
        self.rejected = 0

    def warm(self) -> None:
        """Compile the step (twice: a fresh state and a stepped one may differ in type)."""
        payload = np.zeros(self.dims.total, np.float32)
        state, record = self._step(self._init, payload, self._present[ALL_PRESENT])
        state, record = self._step(state, payload, self._present[ALL_PRESENT])
        np.asarray(record)

    def process(self, frame: Frame) -> bytes:
        """Step one frame and return its binary moment record."""
        state = self.states.get(frame.stream_id, self._init)
        state, record = self._step(state, frame.payload, self._present[frame.present])
        self.states[frame.stream_id] = state
        values = np.asarray(record)
        self.processed += 1
        return encode_moment(
            Moment(
                frame.stream_id,
                frame.seq,
                frame.timestamp,
                time.monotonic_ns() - frame.received_ns,
                0 if frame.present == ALL_PRESENT else FLAG_ABSENT,
                self.sizes,
                values,
            )
        )


class _Server:
    def __init__(self, service: BaselineService) -> None:
        self.service = service
        self.subscribers: set[asyncio.StreamWriter] = set()
        self.received = 0

    async def ingest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader(self.service.dims)
        try:
            while data := await reader.read(READ_BYTES):
                records = []
                for item in frames.feed(data, time.monotonic_ns()):
                    self.received += 1
                    if isinstance(item, FrameRejected):
                        self.service.rejected += 1
                    else:  # a reader without `runs` hands out no `FrameRun`
                        records.append(self.service.process(cast(Frame, item)))
                if records:
                    await self.publish(b"".join(records))
        except (FramingLost, ConnectionError):
            pass
        finally:
            writer.close()

    async def publish(self, data: bytes) -> None:
        for sub in list(self.subscribers):
            sub.write(data)
        for sub in list(self.subscribers):
            try:
                await sub.drain()
            except ConnectionError:
                self.subscribers.discard(sub)

    async def subscribe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line.split()[:2] != [b"SUB", b"binary"]:
            writer.write(b"ERR expected 'SUB binary <glob>'\n")
            writer.close()
            return
        self.subscribers.add(writer)
        try:
            while await reader.read(READ_BYTES):
                pass
        except ConnectionError:
            pass
        finally:
            self.subscribers.discard(writer)
            writer.close()

    async def metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while (await reader.readline()).strip():
                pass
            body = (
                f"enactive_subscribers {len(self.subscribers)}\n"
                f"enactive_frames_received_total {self.received}\n"
                f"enactive_frames_processed_total {self.service.processed}\n"
                f"enactive_frames_rejected_total {self.service.rejected}\n"
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()


async def serve(service: BaselineService, ready_file: str | os.PathLike[str]) -> None:
    """Serve on ephemeral loopback ports until SIGTERM/SIGINT; write the ready file."""
    server = _Server(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = [
        await asyncio.start_server(handler, "127.0.0.1", 0)
        for handler in (server.ingest, server.subscribe, server.metrics)
    ]
    ports = {
        name: s.sockets[0].getsockname()[1]
        for name, s in zip(("tcp", "output", "metrics"), servers, strict=True)
    }
    path = Path(ready_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    os.replace(tmp, path)
    await stop.wait()
    for s in servers:
        s.close()
    for sub in list(server.subscribers):
        sub.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stream.bench.baseline --ready-file FILE [--model JSON] [--cache-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m stream.bench.baseline")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--model", default="{}", help="ModelConfig keyword arguments (JSON)")
    parser.add_argument("--cache-dir", default="", help="JAX persistent compilation cache")
    args = parser.parse_args(argv)
    if args.cache_dir:
        import processors

        processors.enable_compilation_cache(args.cache_dir)
    model = json.loads(args.model)
    if "som_grid" in model:
        model["som_grid"] = tuple(model["som_grid"])
    service = BaselineService(model)
    service.warm()
    asyncio.run(serve(service, args.ready_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
