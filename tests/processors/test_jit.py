"""safe_jit fallback and reporting, the factory trio, get_jit_info."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from processors import (
    BodySchemaConfig,
    JITCompilationError,
    JITStrategy,
    ModelConfig,
    create_body_schema_processor,
    create_body_schema_processor_no_jit,
    create_body_schema_processor_safe,
    create_temporal_processor,
    create_temporal_processor_no_jit,
    create_temporal_processor_safe,
    get_jit_info,
    safe_jit,
)


def branchy(x: jax.Array) -> jax.Array:
    """Data-dependent Python control flow: fine eagerly, untraceable under jit."""
    if jnp.sum(x) > 0:
        return x * 2.0
    return x - 1.0


def test_safe_jit_falls_back_and_reports_once() -> None:
    reports: list[tuple[str, str]] = []
    fn = safe_jit(branchy, on_fallback=lambda name, reason: reports.append((name, reason)))
    x = jnp.arange(3, dtype=jnp.float32)
    np.testing.assert_array_equal(fn(x), x * 2.0)
    assert reports == [("branchy", "TracerBoolConversionError")]
    np.testing.assert_array_equal(fn(-x - 1.0), -x - 2.0)  # same signature: straight to eager
    np.testing.assert_array_equal(fn(jnp.ones(5, jnp.float32)), 2.0)  # new shape, same reason
    assert reports == [("branchy", "TracerBoolConversionError")]
    assert fn.fallbacks[0][0] == "TracerBoolConversionError"  # type: ignore[attr-defined]


def test_safe_jit_without_fallback_raises() -> None:
    fn = safe_jit(branchy, fallback=False)
    with pytest.raises(JITCompilationError, match="TracerBoolConversionError"):
        fn(jnp.ones(3, jnp.float32))


def test_safe_jit_compiles_a_traceable_function() -> None:
    reports: list[tuple[str, str]] = []
    fn = safe_jit(lambda x, n: x * n, static_argnames="n", on_fallback=lambda *a: reports.append(a))
    np.testing.assert_array_equal(fn(jnp.ones(2, jnp.float32), n=3), [3.0, 3.0])
    assert reports == []


def test_temporal_factory_trio_agrees(small_config: ModelConfig) -> None:
    cfg = small_config.temporal
    reports: list[tuple[str, str]] = []
    variants = [
        create_temporal_processor(cfg),
        create_temporal_processor_no_jit(cfg),
        create_temporal_processor_safe(cfg, on_fallback=lambda *a: reports.append(a)),
    ]
    assert [v.strategy for v in variants] == [JITStrategy.JIT, JITStrategy.EAGER, JITStrategy.SAFE]
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, cfg.state_dim)).astype(np.float32)
    results = []
    for step in variants:
        state, outs = step.init_state(), []
        for frame in frames:
            state, out = step(state, jnp.asarray(frame))
            outs.append(out)
        results.append((state, outs))
    for state, outs in results[1:]:
        for a, b in zip(jax.tree.leaves((state, outs)), jax.tree.leaves(results[0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert reports == []


def test_body_schema_factory_trio_agrees(small_config: ModelConfig) -> None:
    cfg: BodySchemaConfig = small_config.body
    variants = [
        create_body_schema_processor(cfg),
        create_body_schema_processor_no_jit(cfg),
        create_body_schema_processor_safe(cfg, use_jit=False),
        create_body_schema_processor_safe(cfg),
    ]
    assert variants[2].strategy is JITStrategy.EAGER
    sizes = (cfg.proprio_dim, cfg.tactile_dim, cfg.motor_dim)
    results = []
    for step in variants:
        rng = np.random.default_rng(1)  # the same frames for every variant
        state, outs = step.init_state(), []
        for _ in range(2):
            inputs = [jnp.asarray(rng.normal(size=n).astype(np.float32)) for n in sizes]
            state, out = step(state, *inputs)
            outs.append(out)
        results.append((state, outs))
    for state, outs in results[1:]:
        for a, b in zip(jax.tree.leaves((state, outs)), jax.tree.leaves(results[0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_get_jit_info(compilation_cache: str) -> None:
    info = get_jit_info()
    assert set(info) >= {
        "backend",
        "devices",
        "device_count",
        "jax_version",
        "jaxlib_version",
        "equinox_version",
        "compilation_cache_dir",
        "x64",
    }
    assert info["backend"] == jax.default_backend()
    assert info["device_count"] == len(info["devices"]) == len(jax.devices())
    assert info["jax_version"] == jax.__version__
    assert info["compilation_cache_dir"] == compilation_cache
    assert info["x64"] is False


def test_compilation_counter_phases_split_at_seal_and_by_thread() -> None:
    # Before seal: warm-up. After: runtime, except on a thread inside in_background()
    # (the daemon's bucket compiler): a compilation on any other thread stays runtime.
    import threading

    from processors import CompilationCounter

    seen: list[str] = []
    x = jnp.ones(3)
    with CompilationCounter(seen.append) as counter:
        jax.jit(lambda a: a + 1).lower(x).compile()
        counter.seal()

        def compile_in_background() -> None:
            with counter.in_background():
                jax.jit(lambda a: a + 2).lower(x).compile()
            jax.jit(lambda a: a + 3).lower(x).compile()  # outside the block

        thread = threading.Thread(target=compile_in_background)
        with counter.in_background():  # another thread's block does not cover this one
            thread.start()
            thread.join()
        jax.jit(lambda a: a + 4).lower(x).compile()
    assert (counter.warmup, counter.background, counter.runtime) == (1, 1, 2)
    assert seen == ["warmup", "background", "runtime", "runtime"]
