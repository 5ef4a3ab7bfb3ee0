"""Model configuration: sizes and constants, validated once at construction."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["BodySchemaConfig", "ModelConfig", "ModelConfigError", "TemporalConfig"]


class ModelConfigError(ValueError):
    """A model configuration value is outside its allowed range."""


def _int_in(cls: str, name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ModelConfigError(f"{cls}.{name} = {value!r}: must be an integer in [{lo}, {hi}]")


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
        raise ModelConfigError(
            f"{cls}.{name} = {value!r}: must be a number in {left}{lo}, {hi}{right}"
        )


MAX_DIM = 4096


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
        _int_in(n, "state_dim", self.state_dim, 1, MAX_DIM)
        _int_in(n, "retention_depth", self.retention_depth, 1, 1024)
        _int_in(n, "protention_horizon", self.protention_horizon, 1, 256)
        _int_in(n, "attention_heads", self.attention_heads, 1, self.state_dim)
        if self.state_dim % self.attention_heads:
            raise ModelConfigError(
                f"{n}.attention_heads = {self.attention_heads}: must divide "
                f"state_dim = {self.state_dim}"
            )
        _int_in(n, "hidden_dim", self.hidden_dim, 1, MAX_DIM)
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
        _int_in(n, "proprio_dim", self.proprio_dim, 1, MAX_DIM)
        _int_in(n, "tactile_dim", self.tactile_dim, 1, MAX_DIM)
        _int_in(n, "motor_dim", self.motor_dim, 1, MAX_DIM)
        grid = tuple(self.som_grid) if isinstance(self.som_grid, (tuple, list)) else None
        if grid is None or len(grid) != 2:
            raise ModelConfigError(f"{n}.som_grid = {self.som_grid!r}: must be (rows, cols)")
        for i, side in enumerate(grid):
            _int_in(n, f"som_grid[{i}]", side, 1, 128)
        object.__setattr__(self, "som_grid", grid)
        _int_in(n, "hidden_dim", self.hidden_dim, 1, MAX_DIM)
        _float_in(n, "som_temperature", self.som_temperature, 0.0, 100.0, open_lo=True)
        if self.som_adaptation not in ("off", "per_stream"):
            raise ModelConfigError(
                f"{n}.som_adaptation = {self.som_adaptation!r}: must be one of 'off', 'per_stream'"
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
        if self.moment_dim is None:
            object.__setattr__(self, "moment_dim", self.state_dim)
        try:
            _ = self.temporal
            # The normalised (hashable) tuple: this config is a static field of the model.
            object.__setattr__(self, "som_grid", self.body.som_grid)
        except ModelConfigError as e:
            raise ModelConfigError(
                str(e)
                .replace("TemporalConfig.", "ModelConfig.")
                .replace("BodySchemaConfig.", "ModelConfig.")
            ) from None
        _int_in(type(self).__name__, "moment_dim", self.moment_dim, 1, MAX_DIM)

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
