"""CPU affinity: the split of the process's CPUs and pinning the calling thread."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from stream.affinity import CpuSplit, cpu_split, pinned

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity")


@pytest.mark.parametrize(
    ("allowed", "expect"),
    [
        (set(), None),
        ({3}, None),  # one CPU: nothing to separate
        ({0, 1}, CpuSplit(0, frozenset({1}))),
        ({7, 2, 5}, CpuSplit(2, frozenset({5, 7}))),  # the lowest, not the first listed
    ],
)
def test_cpu_split(allowed: set[int], expect: CpuSplit | None) -> None:
    assert cpu_split(allowed) == expect


@linux
def test_cpu_split_defaults_to_the_process_affinity() -> None:
    allowed = os.sched_getaffinity(0)
    split = cpu_split()
    if len(allowed) < 2:
        assert split is None
    else:
        assert split is not None
        assert {split.loop} | split.compute == allowed
        assert split.loop not in split.compute


@linux
def test_pinned_narrows_the_calling_thread_and_its_new_threads_then_restores() -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    seen: list[set[int]] = []
    with pinned({cpu}) as applied:
        assert applied
        assert os.sched_getaffinity(0) == {cpu}
        t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        t.start()
        t.join()
    assert seen == [{cpu}]  # what the daemon relies on for XLA's threads
    assert os.sched_getaffinity(0) == before


@linux
def test_pinned_none_changes_nothing() -> None:
    before = os.sched_getaffinity(0)
    with pinned(None) as applied:
        assert not applied
        assert os.sched_getaffinity(0) == before


@linux
def test_a_refused_set_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    before = os.sched_getaffinity(0)
    impossible = {max(before) + 4096}  # no such CPU: the kernel answers EINVAL
    with caplog.at_level(logging.WARNING, "enactive.affinity"), pinned(impossible) as applied:
        assert not applied
        assert os.sched_getaffinity(0) == before
    assert "not applied" in caplog.text
