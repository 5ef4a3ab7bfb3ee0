"""Wire protocol v1: sensor frames in, integrated moments out.

The byte layout is documented in `docs/protocol.md`. All integers and floats are
little-endian. Decoding a frame never raises anything but `FrameRejected` (and its subclass
`FramingLost`), whatever the input bytes. Everything here is pure: no I/O, no clocks.

* `decode_frame` / `decode_json` / `decode_message`: one datagram or broker message.
* `FrameReader` / `LineReader`: incremental splitters for a TCP byte stream.
* `encode_frame` / `encode_json_frame`: the client side (the `send` CLI, tests).
* `encode_moment` / `moment_to_json` / `decode_moment` / `MomentReader`: records out.
* `MomentBatch`: a device batch of moments as columns, encoded in one numpy pass.
"""

from ._types import (
    ALL_PRESENT,
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_ABSENT,
    FLAG_EAGER,
    FLAG_RESTORED,
    FLAG_SESSION_START,
    FRAME_HEADER_BYTES,
    FRAME_REPLY,
    FRAME_START,
    MAGIC_FRAME,
    MAGIC_MOMENT,
    MAX_STREAM_ID_BYTES,
    MOMENT_HEADER_BYTES,
    MOTOR,
    PROPRIO,
    REASONS,
    SCALAR_NAMES,
    SENSORY,
    SESSION_START,
    TACTILE,
    VERSION,
    Buffer,
    Dims,
    Frame,
    FrameRejected,
    FrameRun,
    FramingLost,
    Moment,
    MomentSizes,
)
from .batches import MomentBatch
from .encoders import encode_frame, encode_json_frame
from .frames import check_stream_id, decode_frame, decode_json, decode_message
from .moments import MomentReader, decode_moment, encode_moment, moment_fields, moment_to_json
from .readers import FrameReader, LineReader
from .replies import (
    MAGIC_REPLY,
    Reply,
    ReplyReader,
    encode_error_line,
    encode_reply,
    reason_code,
)

__all__ = [
    "ALL_PRESENT",
    "DEFAULT_MAX_FRAME_BYTES",
    "FLAG_ABSENT",
    "FLAG_EAGER",
    "FLAG_RESTORED",
    "FLAG_SESSION_START",
    "FRAME_HEADER_BYTES",
    "FRAME_REPLY",
    "FRAME_START",
    "MAGIC_FRAME",
    "MAGIC_MOMENT",
    "MAGIC_REPLY",
    "MAX_STREAM_ID_BYTES",
    "MOMENT_HEADER_BYTES",
    "MOTOR",
    "PROPRIO",
    "REASONS",
    "SCALAR_NAMES",
    "SENSORY",
    "SESSION_START",
    "TACTILE",
    "VERSION",
    "Buffer",
    "Dims",
    "Frame",
    "FrameReader",
    "FrameRejected",
    "FrameRun",
    "FramingLost",
    "LineReader",
    "Moment",
    "MomentBatch",
    "MomentReader",
    "MomentSizes",
    "Reply",
    "ReplyReader",
    "check_stream_id",
    "decode_frame",
    "decode_json",
    "decode_message",
    "decode_moment",
    "encode_error_line",
    "encode_frame",
    "encode_json_frame",
    "encode_moment",
    "encode_reply",
    "moment_fields",
    "moment_to_json",
    "reason_code",
]
