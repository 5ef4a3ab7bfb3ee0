"""From a `ModelConfig` to a ready model, and the fingerprint a checkpoint is tied to."""

from __future__ import annotations

from typing import Any

import jax

from .config import ModelConfig
from .model import EnactiveModel
from .params import load_params

__all__ = ["build_model", "model_fingerprint"]


def build_model(
    model_config: ModelConfig, *, seed: int, params: str | None = None
) -> EnactiveModel:
    """The model `model_config` describes.

    **Arguments:**

    - `model_config`: the sizes and constants.
    - `seed`: initialises the parameters (`jax.random.PRNGKey(seed)`).
    - `params`: a file written by `save_params` to load them from instead; `None` or `""`
        keeps the initialisation.

    **Returns:** an `EnactiveModel`.

    **Raises:** `ParamsMismatchError` when the file does not fit this model or cannot be
    parsed; `OSError` (`FileNotFoundError`, …) when it cannot be opened.
    """
    model = EnactiveModel(model_config, key=jax.random.PRNGKey(seed))
    if params:
        model = load_params(model, params)
    return model


def model_fingerprint(model_config: ModelConfig, capacity: int) -> dict[str, Any]:
    """What a checkpoint must have been written for to be restored into this model.

    **Arguments:** `model_config`; `capacity`, the state slab's rows.

    **Returns:** `{"dims": [D, P, T, M], "model": [R, H, hidden, [rows, cols], heads],
    "capacity": capacity}`, plain ints and lists (JSON-ready). The layout is part of the
    checkpoint format: changing it makes existing checkpoints unloadable.
    """
    m = model_config
    return {
        "dims": [m.state_dim, m.proprio_dim, m.tactile_dim, m.motor_dim],
        "model": [
            m.retention_depth,
            m.protention_horizon,
            m.hidden_dim,
            list(m.som_grid),
            m.attention_heads,
        ],
        "capacity": capacity,
    }
