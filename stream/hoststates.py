"""The states of streams evicted from the device slab, kept on the host as rows.

One growable numpy array per leaf of the state tree, a row per evicted stream, and a
list of free rows: evicting a batch's streams is one slice assignment per leaf, however
many streams it evicts; a checkpoint takes every evicted state with one gather per leaf;
and a stream on the host costs its state's bytes and one row number — not a tree of small
arrays of its own, which costs several times its state in object headers and would have
to be stacked again, stream by stream, for every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["HostStates"]

INITIAL_ROWS = 256
"""Rows allocated by the first eviction; the arrays double whenever they are full."""


class HostStates:
    """Rows of evicted states. `put` stores rows and returns their numbers, `get` and
    `gather` copy them out, `free` gives a row back. Every state stored must have the
    tree structure, shapes and dtypes of the first one."""

    def __init__(self) -> None:
        self._leaves: list[np.ndarray] = []
        self._treedef: Any = None
        self._free: list[int] = []
        self._used = 0  # rows ever handed out (the high-water mark)

    def __len__(self) -> int:
        """Rows holding a state."""
        return self._used - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for rows (used or free)."""
        return sum(leaf.nbytes for leaf in self._leaves)

    def put(self, rows: Any) -> list[int]:
        """Store the states of `rows`, a state tree whose leaves have a leading axis of
        one row per state; returns their row numbers, in order."""
        leaves, treedef = jax.tree.flatten(rows)
        n = len(leaves[0]) if leaves else 0
        if not n:
            return []
        if self._treedef is None:
            self._treedef = treedef
            self._leaves = [
                np.empty((INITIAL_ROWS, *np.shape(leaf)[1:]), np.asarray(leaf).dtype)
                for leaf in leaves
            ]
        elif treedef != self._treedef:
            raise ValueError(f"a state of structure {treedef}, expected {self._treedef}")
        taken = self._free[-n:][::-1] if n <= len(self._free) else None
        if taken is not None:
            del self._free[-n:]
            index: slice | list[int] = taken
        else:
            self._grow(self._used + n)
            taken = list(range(self._used, self._used + n))
            index = slice(self._used, self._used + n)
            self._used += n
        for mine, leaf in zip(self._leaves, leaves, strict=True):
            mine[index] = leaf
        return taken

    def get(self, row: int) -> Any:
        """A copy of the state in `row`."""
        return jax.tree.unflatten(self._treedef, [leaf[row].copy() for leaf in self._leaves])

    def gather(self, rows: Sequence[int]) -> Any:
        """Copies of the states in `rows`, stacked (leading axis: `rows`' order)."""
        index = np.asarray(rows, np.intp)
        return jax.tree.unflatten(self._treedef, [leaf[index] for leaf in self._leaves])

    def free(self, row: int) -> None:
        """`row` holds nothing any more."""
        self._free.append(row)

    def _grow(self, rows: int) -> None:
        size = len(self._leaves[0])
        if rows <= size:
            return
        while size < rows:
            size *= 2
        grown = []
        for leaf in self._leaves:
            bigger = np.empty((size, *leaf.shape[1:]), leaf.dtype)
            bigger[: self._used] = leaf[: self._used]
            grown.append(bigger)
        self._leaves = grown
