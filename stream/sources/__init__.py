"""Network sources: the TCP and UDP listeners that feed an `Ingest`.

- `serve_tcp`: binary frames or JSON lines per connection, overload policy `block`.
- `serve_udp`: one frame per datagram, overload policy `drop_oldest`.
"""

from .tcp import serve_tcp
from .udp import serve_udp

__all__ = ["serve_tcp", "serve_udp"]
