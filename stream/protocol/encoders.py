"""Frame encoding, the client side (the `send` CLI, tests): one binary or JSON frame."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt

from ._types import (
    _F32,
    _FRAME_HEADER,
    _MAX_U64,
    _MODALITIES,
    _PADS,
    FRAME_REPLY,
    FRAME_START,
    MAGIC_FRAME,
    VERSION,
    _encoded_id,
    _pad,
)


def _as_f32(values: npt.ArrayLike | None) -> np.ndarray:
    if values is None:
        return np.zeros(0, _F32)
    array = np.ascontiguousarray(values, dtype=_F32).reshape(-1)
    if array.size > 0xFFFF:
        raise ValueError(f"{array.size} values in one modality, expected at most 65535")
    return array


def encode_frame(
    stream_id: str,
    seq: int,
    timestamp: float,
    *,
    sensory: npt.ArrayLike | None = None,
    proprio: npt.ArrayLike | None = None,
    tactile: npt.ArrayLike | None = None,
    motor: npt.ArrayLike | None = None,
    start: bool = False,
    reply: bool = False,
) -> bytes:
    """Encode one binary frame (the client side).

    Only what is needed to produce bytes is validated: the daemon rejects the rest.

    **Arguments:**

    - `stream_id`: 1..255 bytes of UTF-8.
    - `seq`: 0..2**64-1.
    - `timestamp`: seconds on the sensor's clock.
    - `sensory`, `proprio`, `tactile`, `motor`: float32 array-likes of any shape
        (flattened), or `None` / empty for an absent modality.
    - `start`: set `FRAME_START`: this frame starts a new session of its stream.
    - `reply`: set `FRAME_REPLY`: the sender reads replies on its connection.

    **Returns:**

    The frame's bytes.

    **Raises:**

    `ValueError` for a stream id of the wrong length, `seq` out of range, or a modality of
    more than 65535 values.
    """
    raw = _encoded_id(stream_id)
    if not 0 <= seq <= _MAX_U64:
        raise ValueError(f"seq={seq}, expected 0..2**64-1")
    parts = [_as_f32(v) for v in (sensory, proprio, tactile, motor)]
    counts = [p.size for p in parts]
    pad = _pad(len(raw))
    length = 32 + len(raw) + pad + 4 * sum(counts)
    flags = (FRAME_START if start else 0) | (FRAME_REPLY if reply else 0)
    header = _FRAME_HEADER.pack(
        MAGIC_FRAME, length, VERSION, flags, len(raw), *counts, 0, seq, timestamp
    )
    return b"".join((header, raw, _PADS[pad], *(p.tobytes() for p in parts)))


def encode_json_frame(
    stream_id: str,
    seq: int,
    timestamp: float,
    *,
    sensory: npt.ArrayLike | None = None,
    proprio: npt.ArrayLike | None = None,
    tactile: npt.ArrayLike | None = None,
    motor: npt.ArrayLike | None = None,
    start: bool = False,
) -> bytes:
    """Encode one JSON frame as one line ending in `\\n` (the client side).

    Arguments as for `encode_frame` (`start` adds `"start": true`); an absent modality's
    key is left out. Non-finite values
    are written as `NaN` / `Infinity`, which the daemon rejects (`non_finite`).

    **Returns:**

    The line's UTF-8 bytes.
    """
    _encoded_id(stream_id)
    obj: dict[str, Any] = {"stream": stream_id, "seq": seq, "t": float(timestamp)}
    for name, values in zip(_MODALITIES, (sensory, proprio, tactile, motor), strict=True):
        array = _as_f32(values)
        if array.size:
            obj[name] = array.tolist()
    if start:
        obj["start"] = True
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
