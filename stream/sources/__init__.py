"""Sources of frames, behind one contract (`Source`, see `base.py` and docs/extending.md).

- `TcpSource` (`serve_tcp`): binary frames or JSON lines per connection, policy `block`.
- `UdpSource` (`serve_udp`): one frame per datagram, policy `drop_oldest`.
- `SyntheticSource` (`run_synthetic`): the built-in synthetic bodies, policy `block`.
- `stream.sources.nats.NatsSource`: a NATS JetStream durable consumer, policy `block`
  (imported on its own: it needs the `nats` extra).
- `stream.sources.mqtt.MqttSource`: an MQTT subscription, policy `block` (the `mqtt`
  extra).
- `stream.sources.lsl.LslSource`: Lab Streaming Layer inlets, policy `drop_oldest` (the
  `lsl` extra).
"""

from .base import OpenedSource, Source
from .synthetic import SyntheticSource, run_synthetic
from .tcp import TcpSource, serve_tcp
from .udp import UdpSource, serve_udp

__all__ = [
    "OpenedSource",
    "Source",
    "SyntheticSource",
    "TcpSource",
    "UdpSource",
    "run_synthetic",
    "serve_tcp",
    "serve_udp",
]
