"""Sinks: where integrated moments go.

- `SubscriberServer`: TCP subscribers, binary records or JSON lines, filtered by a glob.
- `JsonlSink`: JSON lines appended to a file.
- `StdoutSink`: JSON lines on standard output.

Every sink has a `name`, a non-blocking `offer(moment)` and an `async run()`; see `Sink`.
Sinks given one `EncodingCache` encode each moment once per format between them.
"""

from .base import (
    DISCONNECTED,
    SLOW_SINK,
    SLOW_SUBSCRIBER,
    WRITE_ERROR,
    EncodingCache,
    Format,
    OnDropped,
    OnEmitted,
    Sink,
)
from .files import JsonlSink, StdoutSink
from .subscribers import SubscriberServer

__all__ = [
    "DISCONNECTED",
    "SLOW_SINK",
    "SLOW_SUBSCRIBER",
    "WRITE_ERROR",
    "EncodingCache",
    "Format",
    "JsonlSink",
    "OnDropped",
    "OnEmitted",
    "Sink",
    "StdoutSink",
    "SubscriberServer",
]
