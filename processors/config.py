"""Model configuration: sizes and constants, validated once at construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "MAX_DIM",
    "MODEL_BOUNDS",
    "BodySchemaConfig",
    "ModelConfig",
    "ModelConfigError",
    "TemporalConfig",
]

MAX_DIM = 4096
"""The largest size of any one model dimension."""

MODEL_BOUNDS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "state_dim": (1, MAX_DIM),
        "proprio_dim": (1, MAX_DIM),
        "tactile_dim": (1, MAX_DIM),
        "motor_dim": (1, MAX_DIM),
        "retention_depth": (1, 1024),
        "protention_horizon": (1, 256),
        "hidden_dim": (1, MAX_DIM),
        "attention_heads": (1, MAX_DIM),  # and it must divide `state_dim`
        "moment_dim": (1, MAX_DIM),
        "som_grid": (1, 128),  # each side
    }
)
"""`(lo, hi)`, both inclusive, of every integer field of the model configurations (for
`som_grid`, of each side). The one copy of these numbers: the configs below check against
it, and the daemon's `[model]` section derives its rules from it."""


class ModelConfigError(ValueError):
    """A model configuration value is outside its allowed range.

    **Attributes:** `owner` (the config class's name), `field` (e.g. `"som_grid[0]"`),
    `value` (as given) and `reason` (what is allowed, e.g. `"must be an integer in
    [1, 1024]"`; other fields it names are written `<owner>.<field>`).
    """

    def __init__(self, owner: str, field: str, value: Any, reason: str) -> None:
        super().__init__(f"{owner}.{field} = {value!r}: {reason}")
        self.owner, self.field, self.value, self.reason = owner, field, value, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.owner, self.field, self.value, self.reason)


def _int_in(cls: str, name: str, value: Any, bounds: str | None = None) -> None:
    lo, hi = MODEL_BOUNDS[bounds or name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ModelConfigError(cls, name, value, f"must be an integer in [{lo}, {hi}]")


def _float_in(
    cls: str,
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if open_lo else value >= lo) and (value < hi if open_hi else value <= hi)
    if not ok:
        left, right = "(" if open_lo else "[", ")" if open_hi else "]"
        raise ModelConfigError(cls, name, value, f"must be a number in {left}{lo}, {hi}{right}")


@dataclasses.dataclass(frozen=True)
class TemporalConfig:
    """Sizes and constants of the temporal processor.

    **Arguments:**

    - `state_dim`: D, the size of a sensory frame and of every temporal vector.
    - `retention_depth`: R, how many past primal impressions the retention buffer holds.
    - `protention_horizon`: H, how many chained anticipation steps protention takes.
    - `attention_heads`: heads of the attention over [retained, present, protentional];
        must divide `state_dim`.
    - `hidden_dim`: width of the synthesis MLP.
    - `retention_decay`: weight ratio between consecutive retained impressions, in (0, 1).
    - `context_gain`: how strongly retention steers each protention step (0.1 in the
        original framework).
    """

    state_dim: int = 32
    retention_depth: int = 10
    protention_horizon: int = 5
    attention_heads: int = 2
    hidden_dim: int = 64
    retention_decay: float = 0.8
    context_gain: float = 0.1

    def __post_init__(self) -> None:
        n = type(self).__name__
        _int_in(n, "state_dim", self.state_dim)
        _int_in(n, "retention_depth", self.retention_depth)
        _int_in(n, "protention_horizon", self.protention_horizon)
        _int_in(n, "attention_heads", self.attention_heads)
        if self.state_dim % self.attention_heads:
            dim = self.state_dim
            divisors = ", ".join(str(d) for d in range(1, dim + 1) if dim % d == 0)
            raise ModelConfigError(
                n,
                "attention_heads",
                self.attention_heads,
                f"must divide {n}.state_dim = {dim}; choose one of {divisors}",
            )
        _int_in(n, "hidden_dim", self.hidden_dim)
        _float_in(n, "retention_decay", self.retention_decay, 0.0, 1.0, open_lo=True, open_hi=True)
        _float_in(n, "context_gain", self.context_gain, 0.0, 10.0)


@dataclasses.dataclass(frozen=True)
class BodySchemaConfig:
    """Sizes and constants of the body-schema processor.

    **Arguments:**

    - `proprio_dim`, `tactile_dim`, `motor_dim`: P, T, M, the input sizes.
    - `som_grid`: (rows, cols) of the proprioceptive self-organising map.
    - `hidden_dim`: Hd, width of the motor GRU and the hidden layers.
    - `som_temperature`: softness of the map's activation; smaller is sharper.
    - `som_adaptation`: `"off"` (default) or `"per_stream"`: each stream keeps its own copy
        of the map in its state and moves it towards what it feels.
    - `som_learning_rate`: step size of that adaptation, in [0, 1].
    - `boundary_decay`: how slowly the per-stream boundary memory forgets, in [0, 1).
    """

    proprio_dim: int = 64
    tactile_dim: int = 32
    motor_dim: int = 32
    som_grid: tuple[int, int] = (20, 20)
    hidden_dim: int = 64
    som_temperature: float = 0.1
    som_adaptation: str = "off"
    som_learning_rate: float = 0.05
    boundary_decay: float = 0.9

    def __post_init__(self) -> None:
        n = type(self).__name__
        _int_in(n, "proprio_dim", self.proprio_dim)
        _int_in(n, "tactile_dim", self.tactile_dim)
        _int_in(n, "motor_dim", self.motor_dim)
        grid = tuple(self.som_grid) if isinstance(self.som_grid, (tuple, list)) else None
        if grid is None or len(grid) != 2:
            raise ModelConfigError(n, "som_grid", self.som_grid, "must be (rows, cols)")
        for i, side in enumerate(grid):
            _int_in(n, f"som_grid[{i}]", side, "som_grid")
        object.__setattr__(self, "som_grid", grid)
        _int_in(n, "hidden_dim", self.hidden_dim)
        _float_in(n, "som_temperature", self.som_temperature, 0.0, 100.0, open_lo=True)
        if self.som_adaptation not in ("off", "per_stream"):
            raise ModelConfigError(
                n, "som_adaptation", self.som_adaptation, "must be one of 'off', 'per_stream'"
            )
        _float_in(n, "som_learning_rate", self.som_learning_rate, 0.0, 1.0)
        _float_in(n, "boundary_decay", self.boundary_decay, 0.0, 1.0, open_hi=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything `EnactiveModel` needs: both processors' sizes plus the integration.

    Defaults match the original framework. `moment_dim` is the size of the integrated
    moment vector (defaults to `state_dim`).
    """

    state_dim: int = 32
    proprio_dim: int = 64
    tactile_dim: int = 32
    motor_dim: int = 32
    retention_depth: int = 10
    protention_horizon: int = 5
    som_grid: tuple[int, int] = (20, 20)
    hidden_dim: int = 64
    attention_heads: int = 2
    moment_dim: int | None = None
    retention_decay: float = 0.8
    context_gain: float = 0.1
    som_temperature: float = 0.1
    som_adaptation: str = "off"
    som_learning_rate: float = 0.05
    boundary_decay: float = 0.9

    def __post_init__(self) -> None:
        n = type(self).__name__
        if self.moment_dim is None:
            object.__setattr__(self, "moment_dim", self.state_dim)
        try:
            _ = self.temporal
            # The normalised (hashable) tuple: this config is a static field of the model.
            object.__setattr__(self, "som_grid", self.body.som_grid)
        except ModelConfigError as e:  # name this class's field, not the part's
            reason = e.reason.replace(f"{e.owner}.", f"{n}.")
            raise ModelConfigError(n, e.field, e.value, reason) from None
        _int_in(n, "moment_dim", self.moment_dim)

    @property
    def temporal(self) -> TemporalConfig:
        """The temporal processor's part of this configuration."""
        return TemporalConfig(
            state_dim=self.state_dim,
            retention_depth=self.retention_depth,
            protention_horizon=self.protention_horizon,
            attention_heads=self.attention_heads,
            hidden_dim=self.hidden_dim,
            retention_decay=self.retention_decay,
            context_gain=self.context_gain,
        )

    @property
    def body(self) -> BodySchemaConfig:
        """The body-schema processor's part of this configuration."""
        return BodySchemaConfig(
            proprio_dim=self.proprio_dim,
            tactile_dim=self.tactile_dim,
            motor_dim=self.motor_dim,
            som_grid=self.som_grid,
            hidden_dim=self.hidden_dim,
            som_temperature=self.som_temperature,
            som_adaptation=self.som_adaptation,
            som_learning_rate=self.som_learning_rate,
            boundary_decay=self.boundary_decay,
        )
