"""Saving and loading model parameters (`eqx.tree_serialise_leaves`)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, BinaryIO, TypeVar

import equinox as eqx
import jax
import numpy as np

__all__ = ["ParamsMismatchError", "load_params", "save_params"]

M = TypeVar("M", bound=eqx.Module)


class ParamsMismatchError(ValueError):
    """A parameter file does not fit the model it is loaded into."""


def save_params(model: eqx.Module, path: str | os.PathLike[str]) -> None:
    """Write `model`'s arrays to `path` atomically (temporary file, then rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".params-")
    try:
        with os.fdopen(fd, "wb") as f:
            eqx.tree_serialise_leaves(f, model)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_params(like: M, path: str | os.PathLike[str]) -> M:
    """Read parameters saved by `save_params` into a model shaped like `like` (a model, or
    its structure with `jax.ShapeDtypeStruct` leaves: `processors.abstract_model`).

    **Raises:** `ParamsMismatchError` naming the first array whose shape or dtype differs
    (for example a file saved with another `state_dim`), or when the file has too few or
    too many arrays; `FileNotFoundError` when there is no file.
    """
    path = os.fspath(path)

    def check(f: BinaryIO, leaf: Any) -> Any:
        value = eqx.default_deserialise_filter_spec(f, leaf)
        if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) and (
            value.shape != leaf.shape or value.dtype != leaf.dtype
        ):
            raise ParamsMismatchError(
                f"{path}: array of shape {value.shape} {value.dtype} where the model has "
                f"{leaf.shape} {leaf.dtype} — saved from a model with other dimensions?"
            )
        return value

    with open(path, "rb") as f:
        try:
            loaded = eqx.tree_deserialise_leaves(f, like, filter_spec=check)
        except Exception as e:
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, ParamsMismatchError):
                cause = cause.__cause__
            why = cause if cause is not None else f"{path}: does not fit this model"
            raise ParamsMismatchError(f"{why} ({e})") from e
        if f.read(1):
            raise ParamsMismatchError(f"{path}: has more arrays than the model")
    return loaded
