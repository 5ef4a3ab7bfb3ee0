"""Summary statistics for the benchmark: percentiles, a compact CDF, growth, medians."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["CDF_PROBABILITIES", "cdf", "growth_pct", "late_growth_pct", "median", "percentiles"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)

CDF_PROBABILITIES = np.unique(
    np.concatenate([np.linspace(0.0, 0.99, 100), 1.0 - np.logspace(-2, -4, 9), [1.0]])
)
"""Where `cdf` samples the distribution: every percent up to 99 %, then the tail to 1."""


def percentiles(
    samples: npt.ArrayLike, qs: Sequence[float] = PERCENTILES, *, scale: float = 1.0
) -> dict[str, float]:
    """Percentiles and the extremes of a sample.

    **Arguments:**

    - `samples`: float array-like of any shape (flattened), at least one value.
    - `qs`: percentiles in [0, 100].
    - `scale`: multiplies every figure (e.g. 1e3 for seconds → ms).

    **Returns:** `{"p50": …, "p90": …, "p99": …, "p99.9": …, "min": …, "max": …,
    "mean": …}` — `"p"` + the percentile written as `format(q, "g")`; linear interpolation
    between order statistics (numpy's default), so `p50 <= p90 <= p99 <= max`.

    **Raises:** `ValueError` for an empty sample.
    """
    x = np.asarray(samples, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("percentiles of an empty sample")
    values = np.percentile(x, list(qs)) * scale
    out = {f"p{q:g}": float(v) for q, v in zip(qs, values, strict=True)}
    out["min"] = float(x.min() * scale)
    out["max"] = float(x.max() * scale)
    out["mean"] = float(x.mean() * scale)
    return out


def cdf(
    samples: npt.ArrayLike,
    probabilities: npt.ArrayLike = CDF_PROBABILITIES,
    *,
    scale: float = 1.0,
) -> dict[str, list[float]]:
    """The empirical CDF at fixed probabilities (small enough for JSON, tail kept).

    **Arguments:**

    - `samples`: float array-like, at least one value.
    - `probabilities`: increasing values in [0, 1].
    - `scale`: multiplies every value.

    **Returns:** `{"x": quantiles (non-decreasing), "p": probabilities}`, lists of equal
    length: a fraction `p[i]` of the samples is at most `x[i]`.
    """
    x = np.asarray(samples, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("CDF of an empty sample")
    p = np.asarray(probabilities, np.float64)
    return {"x": (np.quantile(x, p) * scale).tolist(), "p": p.tolist()}


def growth_pct(before: float, after: float) -> float:
    """`100 · (after − before) / before`; `before` must be > 0."""
    if before <= 0:
        raise ValueError(f"before = {before}, expected > 0")
    return 100.0 * (after - before) / before


def late_growth_pct(samples: Sequence[float]) -> float | None:
    """How much a series sampled over a phase still grew late in it: the peak of its
    second half against the peak of its first half, in % (≤ 0: it had levelled off).
    None with fewer than 2 samples."""
    if len(samples) < 2:
        return None
    half = len(samples) // 2
    return growth_pct(max(samples[:half]), max(samples[half:]))


def median(values: Sequence[float]) -> float:
    """The median of at least one value."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))
