"""Config validation messages; parameter save/load; deterministic initialisation."""

from __future__ import annotations

import dataclasses
import re

import equinox as eqx
import jax
import numpy as np
import pytest

from processors import (
    MODEL_BOUNDS,
    BodySchemaConfig,
    CompilationCounter,
    EnactiveModel,
    ModelConfig,
    ModelConfigError,
    ParamsMismatchError,
    TemporalConfig,
    abstract_model,
    build_model,
    load_params,
    model_fingerprint,
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
            "ModelConfig.attention_heads = 3: must divide ModelConfig.state_dim = 32; "
            "choose one of 1, 2, 4, 8, 16, 32",
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
            lambda: ModelConfig(retention_depth=1025),
            "ModelConfig.retention_depth = 1025: must be an integer in [1, 1024]",
        ),
        (
            lambda: TemporalConfig(attention_heads=3),
            "TemporalConfig.attention_heads = 3: must divide TemporalConfig.state_dim = 32",
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


def test_errors_carry_field_value_and_reason() -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(som_grid=(4, 129))
    e = info.value
    assert (e.owner, e.field, e.value) == ("ModelConfig", "som_grid[1]", 129)
    assert e.reason == "must be an integer in [1, 128]"


@pytest.mark.parametrize("name", sorted(MODEL_BOUNDS))
def test_bounds_are_the_ones_checked(name: str) -> None:
    lo, hi = MODEL_BOUNDS[name]

    def make(v: int) -> ModelConfig:
        if name == "som_grid":
            return ModelConfig(som_grid=(v, v))
        if name == "attention_heads":  # it must divide state_dim too
            return ModelConfig(attention_heads=v, state_dim=max(v, 1))
        return ModelConfig(**{"attention_heads": 1, name: v})

    for v in (lo, hi):
        make(v)
    for v in (lo - 1, hi + 1):
        with pytest.raises(ModelConfigError, match=re.escape(f"[{lo}, {hi}]")):
            make(v)


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


def test_build_model_seeds_then_loads_params(small_config: ModelConfig, tmp_path) -> None:
    model = build_model(small_config, seed=3, params=None)
    same = EnactiveModel(small_config, key=jax.random.PRNGKey(3))
    for a, b in zip(_arrays(model), _arrays(same), strict=True):
        np.testing.assert_array_equal(a, b)
    assert build_model(small_config, seed=3, params="").config == small_config
    path = tmp_path / "params.eqx"
    save_params(model, path)
    loaded = build_model(small_config, seed=4, params=str(path))
    for a, b in zip(_arrays(loaded), _arrays(model), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        build_model(small_config, seed=0, params=str(tmp_path / "missing.eqx"))


def test_build_model_caches_its_initialisation(small_config: ModelConfig, tmp_path) -> None:
    # A warm start reads the initialised parameters back (the same bits) instead of
    # running, tracing and compiling the initialisation again.
    want = EnactiveModel(small_config, key=jax.random.PRNGKey(5))
    first = build_model(small_config, seed=5, cache_dir=tmp_path)
    files = list(tmp_path.glob("enactive-params-*.eqx"))
    assert len(files) == 1
    with CompilationCounter() as counter:
        again = build_model(small_config, seed=5, cache_dir=tmp_path)
        assert counter.warmup == 0  # nothing compiled, nor even lowered
    for model in (first, again):
        for a, b in zip(_arrays(model), _arrays(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert again.config == small_config
    # Another seed or shape is another file; a damaged file is ignored and rewritten.
    build_model(small_config, seed=6, cache_dir=tmp_path)
    build_model(dataclasses.replace(small_config, hidden_dim=4), seed=5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("enactive-params-*.eqx"))) == 3
    files[0].write_bytes(b"not parameters")
    for a, b in zip(
        _arrays(build_model(small_config, seed=5, cache_dir=tmp_path)), _arrays(want), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert files[0].stat().st_size > len(b"not parameters")


@pytest.mark.parametrize("seed", [0, 11])
def test_build_model_draws_the_bits_of_the_plain_initialisation(seed: int) -> None:
    # build_model draws every uniform from one flat executable (one compilation, not one
    # per layer shape): the values must be those of the plain constructor, bit for bit,
    # at the daemon's default sizes too.
    original = jax.random.uniform
    for config in (ModelConfig(), ModelConfig(state_dim=16, hidden_dim=24, som_grid=(5, 7))):
        built = build_model(config, seed=seed)
        plain = EnactiveModel(config, key=jax.random.PRNGKey(seed))
        for a, b in zip(_arrays(built), _arrays(plain), strict=True):
            np.testing.assert_array_equal(a, b)
    assert jax.random.uniform is original  # put back


def test_flat_uniform_draws_are_the_shaped_ones() -> None:
    from processors.build import _uniform_from_one_executable

    key = jax.random.PRNGKey(4)
    shapes = [(), (1,), (7,), (32, 32), (5, 3, 2), (300, 301)]  # the last beyond 65,536
    want = [np.asarray(jax.random.uniform(key, s, minval=-0.3, maxval=0.3)) for s in shapes]
    with _uniform_from_one_executable():
        got = [np.asarray(jax.random.uniform(key, s, minval=-0.3, maxval=0.3)) for s in shapes]
        traced = jax.jit(lambda k: jax.random.uniform(k, (7,)))(key)  # tracers: itself
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(traced, jax.random.uniform(key, (7,)))


def test_params_file_is_read_into_the_structure(small_config: ModelConfig, tmp_path) -> None:
    # With a parameter file the seeded initialisation is skipped (its values are replaced).
    path = tmp_path / "params.eqx"
    saved = EnactiveModel(small_config, key=jax.random.PRNGKey(9))
    save_params(saved, path)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in _arrays_like(small_config))
    with CompilationCounter() as counter:
        loaded = build_model(small_config, seed=0, params=str(path))
        assert counter.warmup == 0
    for a, b in zip(_arrays(loaded), _arrays(saved), strict=True):
        np.testing.assert_array_equal(a, b)


def _arrays_like(config: ModelConfig) -> list:
    return [
        leaf
        for leaf in jax.tree.leaves(abstract_model(config))
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]


def test_model_fingerprint_is_the_checkpoint_format(small_config: ModelConfig) -> None:
    # Written into every checkpoint and compared at restore: this exact layout.
    assert model_fingerprint(small_config, 512) == {
        "dims": [8, 6, 4, 3],
        "model": [3, 2, 8, [3, 3], 2],
        "capacity": 512,
    }
