"""One weighted, bounded FIFO buffer for every queue in the daemon.

Items carry a weight — the frames of a run, the moments of an encoded batch, the bytes
of a write — and the buffer is bounded in total weight, not in items. What happens when
it is full is its *overflow policy*:

- `block`: `put()` waits for room (the sender is slowed down: TCP, synthetic);
  `put_nowait()` returns False and takes nothing.
- `drop_oldest`: `put_nowait()` always succeeds, dropping the oldest items to make room
  and reporting each to `on_drop(item, weight)` (UDP: a sender that cannot wait).
- `drop_newest`: `put_nowait()` returns False and reports the item to `on_drop` (a slow
  subscriber or file sink loses the new moments, never stalls the pipeline).

An item heavier than the whole limit is taken only into an empty buffer, so it never
waits forever. `close()` ends the buffer: what it holds can still be taken, then
`get()` raises `anyio.EndOfStream`. `statistics()` is what the queue-depth metric reads
at scrape time.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import anyio

__all__ = ["BufferStatistics", "Overflow", "WeightedBuffer"]

T = TypeVar("T")
Overflow = Literal["block", "drop_oldest", "drop_newest"]


@dataclasses.dataclass(frozen=True, slots=True)
class BufferStatistics:
    """A buffer's state: `items` and their total `weight`, its `limit`, the weight
    `dropped` so far and whether it is `closed`."""

    items: int
    weight: int
    limit: int
    dropped: int
    closed: bool


class WeightedBuffer(Generic[T]):
    """**Arguments:**

    - `limit`: total weight held at most, >= 1.
    - `overflow`: `"block"`, `"drop_oldest"` or `"drop_newest"` (see the module).
    - `on_drop(item, weight)`: told of every item a drop policy discards.
    """

    def __init__(
        self,
        limit: int,
        *,
        overflow: Overflow = "block",
        on_drop: Callable[[T, int], None] = lambda item, weight: None,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit={limit}, expected >= 1")
        if overflow not in ("block", "drop_oldest", "drop_newest"):
            raise ValueError(
                f"overflow={overflow!r}, expected 'block', 'drop_oldest' or 'drop_newest'"
            )
        self.limit = limit
        self.overflow: Overflow = overflow
        self._on_drop = on_drop
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self.weight = 0
        self.dropped = 0
        self.closed = False
        self._readable = anyio.Event()
        self._room = anyio.Event()

    def __len__(self) -> int:
        """Items held."""
        return len(self._items)

    def statistics(self) -> BufferStatistics:
        """What the buffer holds now (read by the queue-depth metric at scrape time)."""
        return BufferStatistics(
            len(self._items), self.weight, self.limit, self.dropped, self.closed
        )

    def fits(self, weight: int) -> bool:
        """Whether an item of `weight` would be taken now without dropping anything."""
        return self.weight + weight <= self.limit or not self._items

    # -- putting ---------------------------------------------------------------------------

    def put_nowait(self, item: T, weight: int = 1) -> bool:
        """Take `item` if the policy allows it now; True if it was taken.

        **Raises:** `anyio.ClosedResourceError` once the buffer is closed."""
        if self.closed:
            raise anyio.ClosedResourceError
        if weight < 0:
            raise ValueError(f"weight={weight}, expected >= 0")
        if not self.fits(weight):
            if self.overflow == "block":
                return False
            if self.overflow == "drop_newest":
                self._drop(item, weight)
                return False
            while not self.fits(weight):
                old, old_weight = self._items.popleft()
                self.weight -= old_weight
                self._drop(old, old_weight)
        self._items.append((item, weight))
        self.weight += weight
        self._readable.set()
        return True

    async def put(self, item: T, weight: int = 1) -> None:
        """Take `item`, waiting for room first under `block` (the other policies never
        wait)."""
        while not self.put_nowait(item, weight):
            if self.overflow != "block":
                return
            await self.wait_room()

    async def wait_room(self) -> None:
        """Return once something was taken out (or the buffer closed: then raise
        `anyio.ClosedResourceError`)."""
        if self._room.is_set():
            self._room = anyio.Event()
        await self._room.wait()
        if self.closed:
            raise anyio.ClosedResourceError

    def push(self, item: T, weight: int = 1) -> None:
        """Take `item` whatever the bound: for a caller that checked `fits` for a larger
        weight first (a run split into its frames)."""
        if self.closed:
            raise anyio.ClosedResourceError
        self._items.append((item, weight))
        self.weight += weight
        self._readable.set()

    def _drop(self, item: T, weight: int) -> None:
        self.dropped += weight
        self._on_drop(item, weight)

    # -- taking ----------------------------------------------------------------------------

    def get_nowait(self) -> T:
        """The oldest item. **Raises:** `anyio.WouldBlock` when empty, `anyio.EndOfStream`
        when empty and closed."""
        if not self._items:
            raise anyio.EndOfStream if self.closed else anyio.WouldBlock
        item, weight = self._items.popleft()
        self.weight -= weight
        self._room.set()
        return item

    async def get(self) -> T:
        """The oldest item, waiting for one. **Raises:** `anyio.EndOfStream` once closed
        and empty."""
        while True:
            try:
                return self.get_nowait()
            except anyio.WouldBlock:
                if self._readable.is_set():
                    self._readable = anyio.Event()
                await self._readable.wait()

    def get_all_nowait(self) -> list[tuple[T, int]]:
        """Everything held, oldest first, as `(item, weight)`; empty if nothing is."""
        items = list(self._items)
        self._items.clear()
        self.weight = 0
        self._room.set()
        return items

    def peek_all(self) -> list[tuple[T, int]]:
        """Everything held, oldest first, without taking it."""
        return list(self._items)

    def take(self, count: int) -> None:
        """Remove the `count` oldest items (after `peek_all`, once they are dealt with)."""
        if not 0 <= count <= len(self._items):
            raise ValueError(f"count={count}, expected 0..{len(self._items)}")
        for _ in range(count):
            _, weight = self._items.popleft()
            self.weight -= weight
        self._room.set()

    async def wait_readable(self) -> None:
        """Return once an item is held or the buffer is closed."""
        while not self._items and not self.closed:
            if self._readable.is_set():
                self._readable = anyio.Event()
            await self._readable.wait()

    def close(self) -> None:
        """No more items will be put; waiting getters and putters wake up."""
        self.closed = True
        self._readable.set()
        self._room.set()
