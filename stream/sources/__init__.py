"""Sources of frames, behind one contract (`Source`, see `base.py` and docs/extending.md).

- `TcpSource` (`serve_tcp`): binary frames or JSON lines per connection, policy `block`.
- `UdpSource` (`serve_udp`): one frame per datagram, policy `drop_oldest`.
- `SyntheticSource` (`run_synthetic`): the built-in synthetic bodies, policy `block`.
"""

from .base import Source
from .synthetic import SyntheticSource, run_synthetic
from .tcp import TcpSource, serve_tcp
from .udp import UdpSource, serve_udp

__all__ = [
    "Source",
    "SyntheticSource",
    "TcpSource",
    "UdpSource",
    "run_synthetic",
    "serve_tcp",
    "serve_udp",
]
