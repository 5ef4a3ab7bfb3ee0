"""A flood of distinct stream ids over UDP beside a 100 Hz control stream, in a real daemon
process (`stream.bench.flood`): the control stream gets every moment and is not starved,
the table counts exactly the streams admitted, and a full table makes room again.

Loopback only; the daemon, the control client and the flooder each run in a process of
their own. `pytest -s` prints the figures (docs/operations.md, "Limits and guarantees")."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from stream.bench.flood import SMALL_DIMS, SMALL_MODEL, FloodSettings, format_table, run_flood

from .daemon import DIMS, MODEL

pytestmark = [pytest.mark.timeout(240), pytest.mark.reliability]

P99_BOUND_MS = 2000.0
"""Control p99 during the flood: far below starvation (the old bug: p50 6 s, p99 13.8 s).
It is not the 500 ms one would want: on a 2-core host a 20,000-id flood measured a p99
of 90–515 ms beside the default table and 0.14–1.23 s beside a table of 2,000 that fills,
because while a flood of new streams evicts others from the device slab each batch takes
10–20 ms instead of 1–2, the batch rate falls to ~100/s, and a stream gets one frame into
each batch: a 100 Hz stream queues until the flood has been taken in (docs/operations.md,
"A flood of a million ids, measured end to end")."""


def settings(cache: str, **kw: Any) -> FloodSettings:
    """The e2e daemon's shape (`tests/e2e/daemon.py`: its model, buckets and slab, so the
    compilation cache is shared), short phases, 20,000 ids."""
    base: dict[str, Any] = dict(
        ids=20_000,
        baseline_s=2.0,
        after_s=1.0,
        max_streams=512,
        buckets=(1, 8, 64),
        max_wait_ms=2.0,
        checkpoint_interval_s=60.0,
        cache_dir=cache,
        settle_timeout_s=60.0,
        drain_s=15.0,
    )
    return FloodSettings(**{**base, **kw})


def check_control(result: dict[str, Any]) -> None:
    """Every control frame got its moment, none was rejected, and the flood did not starve
    it."""
    control = result["control"]
    for phase in ("baseline", "flood", "after"):
        assert control[phase]["sent"] > 0, phase
        assert control[phase]["lost"] == 0, (phase, control[phase])
    assert control["rejected"] == {}
    assert control["flood"]["p99_ms"] < P99_BOUND_MS, control["flood"]


def test_the_small_model_is_the_e2e_one() -> None:
    assert tomllib.loads(MODEL)["model"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in SMALL_MODEL.items()
    }
    assert SMALL_DIMS == DIMS


def test_a_flood_of_new_ids_beside_a_control_stream(tmp_path: Path, compilation_cache: str) -> None:
    result = run_flood(settings(compilation_cache), tmp_path, log=sys.stdout)
    print(format_table(result))
    check_control(result)
    flood, memory = result["flood"], result["memory"]
    assert flood["sent"] + flood["send_errors"] == 20_000
    assert flood["received"] + flood["uncounted"] == flood["sent"]
    assert flood["admitted"] > 0 and flood["rejected"] == 0 and flood["reclaimed"] == 0
    # The table knows exactly the streams admitted, and each one was processed.
    assert memory["known_after"] - memory["known_before"] == flood["admitted"]
    assert abs(flood["processed"] - flood["admitted"]) <= 1  # ± a control frame in flight
    assert result["probe"]["admitted"]
    per = memory["bytes_per_known_stream"]
    print(f"host memory per known stream: {per:,.0f} bytes ({flood['admitted']:,} streams)")


def test_a_full_table_makes_room_again_after_the_reclaim_delay(
    tmp_path: Path, compilation_cache: str
) -> None:
    # 20,000 ids into a table of 2,000 (the control stream among them) that reclaims
    # streams idle 3 s: it fills and rejects the rest of the flood; a new stream right
    # after it may be rejected too, but is admitted once the oldest flood stream has been
    # idle 3 s (the probe polls).
    s = settings(
        compilation_cache, max_known=2_000, reclaim_idle_s=3.0, after_s=0.5, probe_wait_s=10.0
    )
    result = run_flood(s, tmp_path, log=sys.stdout)
    print(format_table(result))
    check_control(result)
    flood, memory, probe = result["flood"], result["memory"], result["probe"]
    assert memory["known_after"] == 2_000  # full
    assert flood["rejected_by_reason"].get("too_many_streams", 0) > 0
    assert memory["known_after"] - memory["known_before"] == flood["admitted"] - flood["reclaimed"]
    assert probe["admitted"], probe
    assert probe["waited_s"] < s.reclaim_idle_s + 10.0
    print(
        f"new stream after the flood: first try {probe['first_try']}, admitted after "
        f"{probe['tries']} tries, {probe['waited_s']:.2f} s"
    )
