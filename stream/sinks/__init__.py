"""Sinks: where integrated moments go.

- `SubscriberServer`: TCP subscribers, binary records or JSON lines, filtered by a glob.
- `JsonlSink`: JSON lines appended to a file.
- `StdoutSink`: JSON lines on standard output.
- `stream.sinks.nats.NatsMomentSink`: NATS JetStream, exactly once (a `ReliableSink`;
  imported on its own: it needs the `nats` extra).
- `stream.sinks.mqtt.MqttMomentSink`: an MQTT broker, one moment per message (imported on
  its own: it needs the `mqtt` extra).

Every sink has a `name`, a non-blocking `offer(batch)`, an `async run()` and the moments it
holds (`queued`, `buffers`); it reports through `PipelineEvents`. See `Sink` for the contract.
Sinks given one `EncodingCache` encode each moment once per format between them.
"""

from .base import (
    DISCONNECTED,
    SLOW_SINK,
    SLOW_SUBSCRIBER,
    WRITE_ERROR,
    Chunk,
    EncodingCache,
    Format,
    ReliableSink,
    Sink,
)
from .files import JsonlSink, StdoutSink
from .subscribers import SubscriberServer

__all__ = [
    "DISCONNECTED",
    "SLOW_SINK",
    "SLOW_SUBSCRIBER",
    "WRITE_ERROR",
    "Chunk",
    "EncodingCache",
    "Format",
    "JsonlSink",
    "ReliableSink",
    "Sink",
    "StdoutSink",
    "SubscriberServer",
]
