"""Which subscribers want which moments: subscribers grouped by glob, matched once per id.

`SubscriberServer` keeps one `Glob` per distinct (glob, read prefixes), holding its
subscriber groups (one per format). The read prefixes are those of the subscriber's
identity (`stream.security`; None: it may read everything): a `Glob` matches the stream
ids that match the glob *and* start with one of them, in the one regular expression, so
the permission costs nothing per row. Per batch, `Router.route` finds the rows each
distinct `Glob` wants in one pass over the batch's stream ids, so the server encodes each
distinct (format, glob, read prefixes) selection once, whatever the number of subscribers.

The pass costs a few C-level operations per row, whatever the number of globs: a memo
shared by every glob maps each stream id seen to the globs it matches, so a glob that
matches nothing of a batch costs nothing there. The memo is kept complete: an id seen for
the first time is tested against every glob once; a glob added is tested against every
id of the memo once (so subscribing with a new glob costs up to `MEMO_LIMIT` matches).
The memo holds at most `MEMO_LIMIT` ids and is cleared when full. A glob nobody uses any
more stays (matched, and ignored) so that it costs nothing to subscribe to it again, until
such globs outnumber the used ones and `DEAD_SLACK`: then they are forgotten. `*` without read
prefixes matches everything and is never looked up.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from typing import Generic, TypeVar

__all__ = ["DEAD_SLACK", "EVERYTHING", "MEMO_LIMIT", "Glob", "Read", "Router"]

T = TypeVar("T")

EVERYTHING = "*"
"""The glob that matches every stream id."""
MEMO_LIMIT = 1 << 14
"""Stream ids remembered at most (one entry each, shared by all subscribers)."""
DEAD_SLACK = 64
"""Unused globs kept beyond as many as are in use, before they are forgotten."""


Read = tuple[str, ...] | None
"""Stream-id prefixes a subscriber may read, sorted and distinct; None: every id."""


class Glob(Generic[T]):
    """One distinct (glob, read prefixes): its matcher, its `users` (subscribers) and their
    `groups` (kept by the owner: one per format)."""

    __slots__ = ("groups", "match", "pattern", "read", "users")

    def __init__(self, pattern: str, read: Read = None) -> None:
        self.pattern = pattern
        self.read = read
        regex = fnmatch.translate(pattern)
        if read is not None:  # a look-ahead: the id starts with one of the prefixes
            regex = f"(?={'|'.join(map(re.escape, read))})" + regex if read else "(?!)"
        self.match = re.compile(regex).match
        self.users = 0
        self.groups: list[T] = []


class Router(Generic[T]):
    """The distinct globs and the shared memo of which ids each matches.

    **Arguments:**

    - `memo_limit`: stream ids remembered at most, >= 1.
    """

    def __init__(self, memo_limit: int = MEMO_LIMIT) -> None:
        if memo_limit < 1:
            raise ValueError(f"memo_limit={memo_limit}, expected >= 1")
        self._limit = memo_limit
        self.everything = Glob[T](EVERYTHING)
        self._globs: dict[tuple[str, Read], Glob[T]] = {}  # but `*`; used or not
        self._memo: dict[str, tuple[Glob[T], ...]] = {}  # id -> the globs it matches
        self._used = 0  # globs with users

    @property
    def remembered(self) -> int:
        """Stream ids in the memo now."""
        return len(self._memo)

    @property
    def globs(self) -> int:
        """Distinct globs known now (used or not), `*` aside."""
        return len(self._globs)

    def use(self, pattern: str, read: Read = None) -> Glob[T]:
        """The `Glob` of `pattern` limited to the ids starting with one of `read` (None:
        no limit; normalised here: sorted, distinct), with one more user."""
        if read is not None:
            read = tuple(sorted(set(read)))
        if pattern == EVERYTHING and read is None:
            glob = self.everything
        else:
            glob = self._globs.get((pattern, read)) or self._add(pattern, read)
            self._used += glob.users == 0
        glob.users += 1
        return glob

    def release(self, glob: Glob[T]) -> None:
        """`glob` has one user fewer (one `use()` each)."""
        glob.users -= 1
        if glob is self.everything or glob.users:
            return
        self._used -= 1
        if len(self._globs) - self._used > self._used + DEAD_SLACK:
            self._globs = {p: g for p, g in self._globs.items() if g.users}
            for stream_id, globs in self._memo.items():
                if globs:
                    self._memo[stream_id] = tuple(g for g in globs if g.users)

    def _add(self, pattern: str, read: Read) -> Glob[T]:
        glob = self._globs[pattern, read] = Glob[T](pattern, read)
        match = glob.match
        for stream_id, globs in self._memo.items():
            if match(stream_id):
                self._memo[stream_id] = (*globs, glob)
        return glob

    def route(self, stream_ids: list[str]) -> dict[Glob[T], list[int]]:
        """For each glob in use but `*` that matches some of `stream_ids`: the indices it
        matches, ascending."""
        if not self._used:
            return {}
        try:
            entries = list(map(self._memo.__getitem__, stream_ids))
        except KeyError:
            entries = [self._memo.get(s) or self._learn(s) for s in stream_ids]
        hits: dict[Glob[T], list[int]] = {}
        if not any(entries):
            return hits
        for i in itertools.compress(range(len(entries)), entries):
            for glob in entries[i]:
                rows = hits.get(glob)
                if rows is not None:
                    rows.append(i)
                elif glob.users:
                    hits[glob] = [i]
        return hits

    def _learn(self, stream_id: str) -> tuple[Glob[T], ...]:
        if stream_id in self._memo:
            return ()  # known, and matches nothing
        if len(self._memo) >= self._limit:
            self._memo.clear()
        globs = self._memo[stream_id] = tuple(g for g in self._globs.values() if g.match(stream_id))
        return globs
