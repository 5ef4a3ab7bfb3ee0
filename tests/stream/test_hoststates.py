"""Evicted states on the host: rows of growable arrays."""

from __future__ import annotations

import numpy as np
import pytest

from stream.hoststates import INITIAL_ROWS, HostStates


def states(n: int, start: int = 0) -> dict[str, np.ndarray]:
    k = np.arange(start, start + n, dtype=np.float32)
    return {"h": k[:, None] * np.ones((n, 3), np.float32), "n": k.astype(np.int32)}


def test_rows_come_back_as_stored_across_growth_and_reuse() -> None:
    host = HostStates()
    n = INITIAL_ROWS * 2 + 5  # grows twice
    rows = host.put(states(n))
    assert rows == list(range(n)) and len(host) == n
    for i in (0, INITIAL_ROWS, n - 1):
        got = host.get(rows[i])
        np.testing.assert_array_equal(got["h"], np.full(3, i, np.float32))
        assert got["n"] == i
    for row in rows[10:20]:
        host.free(row)
    assert len(host) == n - 10
    again = host.put(states(4, start=1000))  # free rows are used again, none allocated
    assert set(again) <= set(rows[10:20]) and len(host) == n - 6
    stacked = host.gather([again[2], rows[3]])
    np.testing.assert_array_equal(stacked["n"], [1002, 3])
    copy = host.get(rows[3])
    copy["h"][:] = -1  # a copy: the row is untouched
    np.testing.assert_array_equal(host.get(rows[3])["h"], np.full(3, 3, np.float32))


def test_a_state_of_another_structure_is_refused() -> None:
    host = HostStates()
    host.put(states(2))
    with pytest.raises(ValueError, match="structure"):
        host.put({"other": np.zeros((1, 3), np.float32)})


def test_memory_is_the_states_bytes() -> None:
    host = HostStates()
    host.put(states(INITIAL_ROWS))
    assert host.nbytes == INITIAL_ROWS * (3 * 4 + 4)
