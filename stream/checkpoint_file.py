"""One checkpoint file read back and checked whole (`read_checkpoint_file`).

The checks, so that a damaged or crafted file can neither crash the daemon nor make two
streams share one state: an intact zip (every entry's CRC is checked) of `.npy` arrays,
never unpickled; a `meta` of JSON with the known keys, a known `format`, the daemon's
`fingerprint`, `slots` an object of distinct stream ids → distinct slots in `[0,
capacity)`, `evicted` a list of distinct stream ids not in `slots`, `seq` an object of
stream id → integer in `[0, 2**64)` with an entry for every stream of the other two; no
array but `meta`, `slab_<i>` and `evicted_<i>`; each array of the fresh slab's dtype and
of the expected shape, read from its header before its data is; and finite states.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import IO, Any, NamedTuple

import jax
import numpy as np

from .protocol import FrameRejected, check_stream_id

__all__ = ["FORMAT", "Contents", "Unusable", "read_checkpoint_file"]

FORMAT = 2  # format 1 (every slot's row) is still read
_MAX_SEQ = 2**64


class Unusable(Exception):
    """A checkpoint file cannot be used; `at(path)` says which and why, in one line."""

    def __init__(self, what: str, *, sep: str = ": ") -> None:
        super().__init__(what)
        self.what, self.sep = what, sep

    def at(self, path: Path | str) -> str:
        return f"{path}{self.sep}{self.what}"


class Contents(NamedTuple):
    """A checked file: its format, slot map (least recently used first), evicted stream
    ids, processed seqs, and per slab leaf the saved rows and the stacked evicted states."""

    format: int
    slots: dict[str, int]
    evicted: list[str]
    seq: dict[str, int]
    slab: list[np.ndarray]  # per leaf: the saved rows
    stacked: list[np.ndarray]  # per leaf: the evicted states, stacked (empty: none)


def read_checkpoint_file(
    path: Path | IO[bytes], like_slab: Any, capacity: int, fingerprint: dict[str, Any]
) -> Contents:
    """Read `path` (a file, or the bytes of one) and check all of it; nothing is used
    before everything passed.

    **Arguments:** `like_slab`, a fresh host slab: each leaf's dtype and row shape are
    what the file's arrays must have; `capacity`, the slab's rows; `fingerprint`, what the
    file must have been written for.

    **Raises:** `Unusable` when the file cannot be read, or breaks the format.
    """
    try:
        with zipfile.ZipFile(path) as z:
            return _check(z, like_slab, capacity, fingerprint)
    except Unusable:
        raise
    except OSError as e:
        raise Unusable(f"cannot be read: {e.strerror or type(e).__name__}") from None
    except Exception as e:  # anything else these bytes made zipfile, zlib or numpy raise
        # Never numpy's own words: they suggest `allow_pickle`, which must stay off.
        detail = " ".join(str(e).split())[:120] if isinstance(e, zipfile.BadZipFile) else ""
        raise Unusable(
            "cannot be read: not a complete .npz archive (damaged, truncated or not a "
            f"checkpoint{': ' + detail if detail else ''})"
        ) from None


def _check(
    z: zipfile.ZipFile, like_slab: Any, capacity: int, fingerprint: dict[str, Any]
) -> Contents:
    names = [info.filename for info in z.infolist()]
    for name in names:
        if names.count(name) > 1 or not name.endswith(".npy"):
            what = "twice" if names.count(name) > 1 else "(not an array)"
            raise Unusable(f"cannot be read: holds an entry {_show(name)} {what}")
    arrays = {name.removesuffix(".npy") for name in names}
    if "meta" not in arrays:
        raise Unusable("cannot be read: has no `meta` (not a checkpoint)")
    meta = _meta(_array(z, "meta", np.dtype(np.uint8), None))
    fmt = meta["format"]
    if type(fmt) is not int or fmt not in (1, FORMAT):
        raise Unusable(f"has format {_show(fmt)}, this daemon reads 1 and {FORMAT}", sep=" ")
    if meta["fingerprint"] != fingerprint:
        raise Unusable(
            f"was written for {_show(meta['fingerprint'], 400)}, this daemon runs {fingerprint}",
            sep=" ",
        )
    slots = _slots(meta["slots"], capacity)
    evicted = _evicted(meta["evicted"], slots)
    seq = _seq(meta["seq"], [*slots, *evicted])

    leaves = jax.tree.leaves(like_slab)
    slab_names = [f"slab_{i}" for i in range(len(leaves))]
    stacked_names = [f"evicted_{i}" for i in range(len(leaves))]
    has_stacked = bool(evicted) or any(n in arrays for n in stacked_names)
    extra = sorted(arrays - {"meta", *slab_names, *(stacked_names if has_stacked else [])})
    if extra:
        raise Unusable(f"holds an unexpected array {_show(extra[0])}")
    rows_of = list(range(capacity)) if fmt == 1 else list(slots.values())
    owner = {slot: stream_id for stream_id, slot in slots.items()}
    slab, stacked = [], []
    for i, leaf in enumerate(leaves):
        shape = (len(rows_of), *leaf.shape[1:])
        got = _array(z, slab_names[i], leaf.dtype, shape, rows="occupied slot")
        _finite(slab_names[i], got, [owner.get(r, f"unused slot {r}") for r in rows_of])
        slab.append(got)
        if has_stacked:
            shape = (len(evicted), *leaf.shape[1:])
            got = _array(z, stacked_names[i], leaf.dtype, shape, rows="stream in `evicted`")
            _finite(stacked_names[i], got, evicted)
            stacked.append(got)
    return Contents(fmt, slots, evicted, seq, slab, stacked)


def _array(
    z: zipfile.ZipFile,
    name: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...] | None,
    *,
    rows: str = "",
) -> np.ndarray:
    """Array `name`, its dtype and shape (`None`: any 1-d) checked from its header first."""
    if f"{name}.npy" not in z.namelist():
        raise Unusable(f"has no array `{name}`")
    with z.open(f"{name}.npy") as f:
        got_shape, got_dtype = _header(f, name)
        if got_dtype != dtype:
            raise Unusable(f"array `{name}` has dtype {str(got_dtype)[:60]}, expected {dtype}")
        if len(got_shape) != 1 if shape is None else got_shape != shape:
            want = "one dimension" if shape is None else str(shape)
            per_row = f" (one row per {rows})" if rows else ""
            raise Unusable(f"array `{name}` has shape {got_shape}, expected {want}{per_row}")
    with z.open(f"{name}.npy") as f:
        try:
            array = np.lib.format.read_array(f, allow_pickle=False)
        except ValueError:
            raise Unusable(f"array `{name}` is truncated or damaged") from None
        if f.read(1):  # reading to the end also checks the entry's CRC
            raise Unusable(f"array `{name}` has bytes past its data")
    return array


def _header(f: IO[bytes], name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise Unusable(f"array `{name}` has .npy version {version}, expected (1, 0) or (2, 0)")
    except ValueError:
        raise Unusable(f"array `{name}` has a damaged header") from None
    return tuple(shape), dtype


def _finite(name: str, array: np.ndarray, row_names: list[str]) -> None:
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    ok = np.isfinite(array).reshape(len(array), -1).all(axis=1)
    if not ok.all():
        who = row_names[int(np.flatnonzero(~ok)[0])]
        raise Unusable(
            f"array `{name}` holds NaN or Inf in the state of {_show(who)} (it would poison "
            "that stream for good)"
        )


def _meta(raw: np.ndarray) -> dict[str, Any]:
    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:
            raise Unusable(f"`meta` repeats the key {_show(repeated)}")
        return dict(pairs)

    def no_constant(token: str) -> Any:
        raise Unusable(f"`meta` holds {token}, which is not JSON")

    try:
        meta = json.loads(
            raw.tobytes().decode("utf-8"), object_pairs_hook=no_repeats, parse_constant=no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Unusable("`meta` is not valid UTF-8 JSON") from None
    if not isinstance(meta, dict):
        raise Unusable(f"`meta` is {_kind(meta)}, expected a JSON object")
    for key in ("format", "fingerprint", "slots", "evicted", "seq"):
        if key not in meta:
            raise Unusable(f"`meta` has no `{key}`")
    return meta


def _slots(value: Any, capacity: int) -> dict[str, int]:
    if not isinstance(value, dict):
        raise Unusable(f"`slots` is {_kind(value)}, expected a JSON object stream id → slot")
    owner: dict[int, str] = {}
    for stream_id, slot in value.items():
        _stream_id(stream_id, "slots")
        if type(slot) is not int or not 0 <= slot < capacity:
            raise Unusable(
                f"`slots` gives {_show(stream_id)} slot {_show(slot)}, expected an integer "
                f"in [0, {capacity})"
            )
        if slot in owner:
            raise Unusable(
                f"`slots` gives slot {slot} to both {_show(owner[slot])} and {_show(stream_id)} "
                "(two streams cannot share one state)"
            )
        owner[slot] = stream_id
    return value


def _evicted(value: Any, slots: dict[str, int]) -> list[str]:
    if not isinstance(value, list):
        raise Unusable(f"`evicted` is {_kind(value)}, expected a JSON list of stream ids")
    seen: set[str] = set()
    for stream_id in value:
        _stream_id(stream_id, "evicted")
        if stream_id in seen:
            raise Unusable(f"`evicted` lists {_show(stream_id)} twice")
        if stream_id in slots:
            raise Unusable(
                f"{_show(stream_id)} is both in `slots` and in `evicted` (one stream cannot "
                "have two states)"
            )
        seen.add(stream_id)
    return value


def _seq(value: Any, streams: list[str]) -> dict[str, int]:
    if not isinstance(value, dict):
        raise Unusable(f"`seq` is {_kind(value)}, expected a JSON object stream id → seq")
    for stream_id, n in value.items():
        _stream_id(stream_id, "seq")
        if type(n) is not int or not 0 <= n < _MAX_SEQ:
            raise Unusable(
                f"`seq` of {_show(stream_id)} is {_show(n)}, expected an integer in [0, 2**64)"
            )
    missing = next((s for s in streams if s not in value), None)
    if missing is not None:
        raise Unusable(f"{_show(missing)} has no `seq`")
    return value


def _stream_id(value: Any, where: str) -> None:
    try:
        if not isinstance(value, str):
            raise FrameRejected("bad_stream_id")
        check_stream_id(value)
    except (FrameRejected, UnicodeError):
        raise Unusable(f"`{where}` holds an invalid stream id {_show(value)}") from None


def _kind(value: Any) -> str:
    for kind, name in ((bool, "true/false"), (dict, "an object"), (list, "a list")):
        if isinstance(value, kind):
            return name
    if value is None:
        return "null"
    return "a string" if isinstance(value, str) else "a number"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
