"""Config validation messages; parameter save/load; deterministic initialisation."""

from __future__ import annotations

import dataclasses
import re

import equinox as eqx
import jax
import numpy as np
import pytest

from processors import (
    BodySchemaConfig,
    EnactiveModel,
    ModelConfig,
    ModelConfigError,
    ParamsMismatchError,
    TemporalConfig,
    load_params,
    save_params,
)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ModelConfig(state_dim=0),
            "ModelConfig.state_dim = 0: must be an integer in [1, 4096]",
        ),
        (
            lambda: ModelConfig(attention_heads=3),
            "ModelConfig.attention_heads = 3: must divide state_dim = 32",
        ),
        (
            lambda: ModelConfig(som_grid=(0, 4)),
            "ModelConfig.som_grid[0] = 0: must be an integer in [1, 128]",
        ),
        (
            lambda: ModelConfig(moment_dim=-2),
            "ModelConfig.moment_dim = -2: must be an integer in [1, 4096]",
        ),
        (
            lambda: ModelConfig(som_adaptation="shared"),
            "ModelConfig.som_adaptation = 'shared': must be one of 'off', 'per_stream'",
        ),
        (
            lambda: TemporalConfig(retention_decay=1.0),
            "TemporalConfig.retention_decay = 1.0: must be a number in (0.0, 1.0)",
        ),
        (
            lambda: TemporalConfig(state_dim=True),
            "TemporalConfig.state_dim = True: must be an integer in [1, 4096]",
        ),
        (
            lambda: TemporalConfig(protention_horizon=2.0),
            "TemporalConfig.protention_horizon = 2.0: must be an integer in [1, 256]",
        ),
        (
            lambda: BodySchemaConfig(som_grid=(3,)),
            "BodySchemaConfig.som_grid = (3,): must be (rows, cols)",
        ),
        (
            lambda: BodySchemaConfig(boundary_decay=1.0),
            "BodySchemaConfig.boundary_decay = 1.0: must be a number in [0.0, 1.0)",
        ),
        (
            lambda: BodySchemaConfig(som_temperature=0.0),
            "BodySchemaConfig.som_temperature = 0.0: must be a number in (0.0, 100.0]",
        ),
        (
            lambda: BodySchemaConfig(som_learning_rate="fast"),
            "BodySchemaConfig.som_learning_rate = 'fast': must be a number in [0.0, 1.0]",
        ),
    ],
)
def test_config_errors_name_field_value_and_range(make, message: str) -> None:
    with pytest.raises(ModelConfigError, match=re.escape(message)):
        make()


def test_config_is_frozen_validated_data() -> None:
    cfg = ModelConfig(state_dim=16, som_grid=[4, 5])  # type: ignore[arg-type]
    assert cfg.moment_dim == 16
    assert cfg.som_grid == (4, 5)
    assert cfg.temporal.state_dim == 16 and cfg.body.som_grid == (4, 5)
    assert issubclass(ModelConfigError, ValueError)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.state_dim = 8  # type: ignore[misc]


def _arrays(model: eqx.Module) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def test_save_load_round_trip(small_config: ModelConfig, tmp_path) -> None:
    saved = EnactiveModel(small_config, key=jax.random.PRNGKey(3))
    path = tmp_path / "params.eqx"
    save_params(saved, path)
    assert [p.name for p in tmp_path.iterdir()] == ["params.eqx"]  # no temporary left behind
    loaded = load_params(EnactiveModel(small_config, key=jax.random.PRNGKey(4)), path)
    for a, b in zip(_arrays(loaded), _arrays(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.config == small_config


def test_loading_other_dims_raises(small_config: ModelConfig, tmp_path) -> None:
    path = tmp_path / "params.eqx"
    save_params(EnactiveModel(small_config, key=jax.random.PRNGKey(0)), path)
    bigger = dataclasses.replace(small_config, state_dim=16, moment_dim=None)
    with pytest.raises(ParamsMismatchError, match="other dimensions"):
        load_params(EnactiveModel(bigger, key=jax.random.PRNGKey(0)), path)


def test_loading_a_truncated_file_raises(small_config: ModelConfig, tmp_path) -> None:
    path = tmp_path / "params.eqx"
    model = EnactiveModel(small_config, key=jax.random.PRNGKey(0))
    save_params(model, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ParamsMismatchError):
        load_params(model, path)
    with pytest.raises(FileNotFoundError):
        load_params(model, tmp_path / "missing.eqx")


def test_initialisation_is_deterministic(small_config: ModelConfig) -> None:
    a = EnactiveModel(small_config, key=jax.random.PRNGKey(7))
    b = EnactiveModel(small_config, key=jax.random.PRNGKey(7))
    c = EnactiveModel(small_config, key=jax.random.PRNGKey(8))
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)
    differs = [not np.array_equal(x, z) for x, z in zip(_arrays(a), _arrays(c), strict=True)]
    assert sum(differs) > len(differs) // 2
    assert not np.array_equal(
        np.asarray(a.temporal.impression.weight), np.asarray(c.temporal.impression.weight)
    )
