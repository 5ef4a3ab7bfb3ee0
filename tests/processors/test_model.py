"""EnactiveModel: the compiled batched step equals the eager per-frame step; absent modalities."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processors
from processors import (
    RECORD_FIELDS,
    EnactiveModel,
    EnactiveOutput,
    EnactiveState,
    ModelConfig,
    pack_record,
)

B, T = 3, 3  # streams per batch, steps per example: fixed, so each jitted fn compiles once
RTOL, ATOL = 1e-4, 1e-5
FIELDS = [f.name for f in dataclasses.fields(EnactiveOutput)]
HYPOTHESIS = settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _batched_init(model: EnactiveModel, n: int) -> EnactiveState:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), model.init_state())


def _split(cfg: ModelConfig, x: np.ndarray) -> list[np.ndarray]:
    cuts = np.cumsum([cfg.state_dim, cfg.proprio_dim, cfg.tactile_dim])
    return np.split(x, cuts, axis=-1)


def _width(cfg: ModelConfig) -> int:
    return cfg.state_dim + cfg.proprio_dim + cfg.tactile_dim + cfg.motor_dim


def _frames(cfg: ModelConfig) -> st.SearchStrategy[tuple[np.ndarray, np.ndarray]]:
    values = hnp.arrays(np.float32, (T, B, _width(cfg)), elements=st.floats(-3, 3, width=32))
    present = hnp.arrays(np.bool_, (T, B, 4))
    return st.tuples(values, present)


@pytest.fixture(scope="module")
def model(small_config: ModelConfig) -> EnactiveModel:
    return EnactiveModel(small_config, key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def adaptive_model(small_config: ModelConfig) -> EnactiveModel:
    cfg = dataclasses.replace(small_config, som_adaptation="per_stream", som_learning_rate=0.3)
    return EnactiveModel(cfg, key=jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def batched(model: EnactiveModel):
    """`jax.jit(jax.vmap(model))`, compiled once for the module's fixed shapes."""
    return jax.jit(jax.vmap(model))


@pytest.fixture(scope="module")
def adaptive_batched(adaptive_model: EnactiveModel):
    return jax.jit(jax.vmap(adaptive_model))


def _run_batched(fn, model: EnactiveModel, values: np.ndarray, present: np.ndarray):
    state = _batched_init(model, B)
    outs = []
    for t in range(T):
        state, out = fn(state, *_split(model.config, values[t]), present[t])
        outs.append(out)
    return state, outs


def _assert_same_as_eager(model: EnactiveModel, values, present, state, outs) -> None:
    with jax.disable_jit():
        for b in range(B):
            eager = model.init_state()
            for t in range(T):
                parts = [jnp.asarray(p) for p in _split(model.config, values[t, b])]
                eager, out = model(eager, *parts, jnp.asarray(present[t, b]))
                for name in FIELDS:
                    np.testing.assert_allclose(
                        getattr(outs[t], name)[b],
                        getattr(out, name),
                        rtol=RTOL,
                        atol=ATOL,
                        err_msg=f"field {name}, stream {b}, step {t}",
                    )
            for path, got, want in zip(
                jax.tree_util.tree_leaves_with_path(state),
                jax.tree.leaves(state),
                jax.tree.leaves(eager),
                strict=True,
            ):
                np.testing.assert_allclose(
                    got[b], want, rtol=RTOL, atol=ATOL, err_msg=f"state {path[0]}, stream {b}"
                )


def _assert_ranges(outs: list[EnactiveOutput]) -> None:
    for out in outs:
        for name in FIELDS:
            assert np.all(np.isfinite(getattr(out, name))), name
            assert getattr(out, name).dtype == jnp.float32, name
        np.testing.assert_allclose(jnp.sum(out.attention, axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(jnp.sum(out.som_activation, axis=-1), 1.0, rtol=1e-5)
        for name in ("coherence", "boundary", "confidence", "boundary_confidence"):
            v = np.asarray(getattr(out, name))
            assert v.shape == (B,), name
            assert np.all((v >= 0.0) & (v <= 1.0)), (name, v)
        assert np.all(np.abs(np.asarray(out.motor_command)) <= 1.0)


@settings(HYPOTHESIS)
@given(frames=_frames(ModelConfig(state_dim=8, proprio_dim=6, tactile_dim=4, motor_dim=3)))
def test_jit_vmap_equals_eager_per_frame(model, batched, frames) -> None:
    values, present = frames
    state, outs = _run_batched(batched, model, values, present)
    _assert_same_as_eager(model, values, present, state, outs)
    _assert_ranges(outs)


@settings(HYPOTHESIS, max_examples=2)
@given(frames=_frames(ModelConfig(state_dim=8, proprio_dim=6, tactile_dim=4, motor_dim=3)))
def test_jit_vmap_equals_eager_with_per_stream_som(adaptive_model, adaptive_batched, frames):
    values, present = frames
    state, outs = _run_batched(adaptive_batched, adaptive_model, values, present)
    assert state.body.som is not None
    _assert_same_as_eager(adaptive_model, values, present, state, outs)
    _assert_ranges(outs)


def test_small_config_matches_strategy_dims(small_config: ModelConfig) -> None:
    # The strategies above are built at import time, before fixtures exist.
    assert _width(small_config) == 8 + 6 + 4 + 3


def _frame(cfg: ModelConfig, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, _width(cfg))).astype(np.float32)


def test_absent_sensory_gives_zero_impression(model, batched) -> None:
    cfg = model.config
    present = np.ones((B, 4), bool)
    present[1, 0] = False
    state, out = batched(_batched_init(model, B), *_split(cfg, _frame(cfg, 0)), present)
    assert np.all(np.asarray(out.impression[1]) == 0.0)
    assert np.all(np.asarray(state.temporal.retention[1, 0]) == 0.0)  # the newest retained
    assert np.any(np.asarray(out.impression[0]) != 0.0)
    _assert_ranges([out])


def test_absent_motor_leaves_gru_hidden_unchanged(model, batched) -> None:
    cfg = model.config
    everything = np.ones((B, 4), bool)
    state, _ = batched(_batched_init(model, B), *_split(cfg, _frame(cfg, 1)), everything)
    before = np.asarray(state.body.motor_hidden)
    assert np.all(np.any(before != 0.0, axis=1))
    no_motor = everything.copy()
    no_motor[:, 3] = False
    state, out = batched(state, *_split(cfg, _frame(cfg, 2)), no_motor)
    np.testing.assert_array_equal(np.asarray(state.body.motor_hidden), before)
    _assert_ranges([out])


def test_absent_values_are_ignored_not_used(model, batched) -> None:
    """An absent modality's slot may hold anything: the result equals the zero-filled one."""
    cfg = model.config
    present = np.array(
        [[False, True, True, True], [True, False, False, True], [False, False, False, False]]
    )
    zeroed = _frame(cfg, 3)
    garbage = zeroed.copy()
    for row, mask in enumerate(present):
        columns = np.split(
            np.arange(_width(cfg)), np.cumsum([cfg.state_dim, cfg.proprio_dim, cfg.tactile_dim])
        )
        for m, part in enumerate(columns):
            if not mask[m]:
                zeroed[row, part] = 0.0
                garbage[row, part] = 1e3
    init = _batched_init(model, B)
    s1, o1 = batched(init, *_split(cfg, zeroed), present)
    s2, o2 = batched(init, *_split(cfg, garbage), present)
    for a, b in zip(jax.tree.leaves((s1, o1)), jax.tree.leaves((s2, o2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_ranges([o1])


def test_absent_proprio_does_not_move_adapting_map(adaptive_model, adaptive_batched) -> None:
    cfg = adaptive_model.config
    present = np.ones((B, 4), bool)
    present[0, 1] = False
    init = _batched_init(adaptive_model, B)
    state, _ = adaptive_batched(init, *_split(cfg, _frame(cfg, 4)), present)
    np.testing.assert_array_equal(np.asarray(state.body.som[0]), np.asarray(init.body.som[0]))
    assert np.any(np.asarray(state.body.som[1]) != np.asarray(init.body.som[1]))


def test_pack_record_layout(model, batched) -> None:
    cfg = model.config
    _, out = batched(_batched_init(model, B), *_split(cfg, _frame(cfg, 5)), np.ones((B, 4), bool))
    records = jax.vmap(pack_record)(out)
    assert records.shape == (
        B,
        cfg.moment_dim + cfg.state_dim + cfg.proprio_dim + cfg.motor_dim + 3,
    )
    assert records.dtype == jnp.float32
    expected = np.concatenate(
        [np.asarray(getattr(out, f)).reshape(B, -1) for f in RECORD_FIELDS], axis=1
    )
    np.testing.assert_array_equal(np.asarray(records), expected)


def test_constructors_take_the_documented_positional_signatures() -> None:
    """`TemporalProcessor(config, state_dim, key)`, `BodySchemaProcessor(config, key)` and
    `EnactiveModel(config, key)`, as the original framework's users call them."""
    key = jax.random.PRNGKey(3)
    temporal = processors.TemporalProcessor(processors.TemporalConfig(), 16, key)
    assert temporal.state_dim == 16
    assert temporal.init_state().retention.shape == (10, 16)
    body = processors.BodySchemaProcessor(processors.BodySchemaConfig(proprio_dim=5), key)
    assert body.proprio_dim == 5
    model = processors.EnactiveModel(processors.ModelConfig(state_dim=8), key)
    assert eqx.tree_equal(
        model, processors.EnactiveModel(processors.ModelConfig(state_dim=8), key=key)
    )
    with pytest.raises(TypeError, match="PRNG key"):
        processors.TemporalProcessor(processors.TemporalConfig())
