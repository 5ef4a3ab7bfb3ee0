"""Factories kept for the original framework's users: plain, no-JIT and safe variants.

Each returns a callable `step(state, *inputs) -> (new_state, output)` bound to a freshly
initialised processor, plus the processor itself as `step.processor` and the strategy as
`step.strategy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jaxtyping import PRNGKeyArray

from .body_schema import BodySchemaProcessor
from .config import BodySchemaConfig, TemporalConfig
from .jit import FallbackListener, JITStrategy, safe_jit
from .temporal import TemporalProcessor

__all__ = [
    "create_body_schema_processor",
    "create_body_schema_processor_no_jit",
    "create_body_schema_processor_safe",
    "create_temporal_processor",
    "create_temporal_processor_no_jit",
    "create_temporal_processor_safe",
]


def _bind(processor: Any, strategy: JITStrategy, on_fallback: FallbackListener | None) -> Callable:
    def call(state: Any, *inputs: Any) -> Any:
        return processor(state, *inputs)

    call.__qualname__ = f"{type(processor).__name__}.__call__"
    if strategy is JITStrategy.EAGER:
        step = call
    else:
        step = safe_jit(call, on_fallback=on_fallback, fallback=strategy is JITStrategy.SAFE)
    step.processor = processor  # type: ignore[attr-defined]
    step.strategy = strategy  # type: ignore[attr-defined]
    step.init_state = processor.init_state  # type: ignore[attr-defined]
    return step


def create_temporal_processor(
    config: TemporalConfig, state_dim: int | None = None, key: PRNGKeyArray | None = None
) -> Callable:
    """A compiled temporal step; a compile failure raises `JITCompilationError`.
    `key` defaults to `jax.random.PRNGKey(0)`."""
    return _bind(_temporal(config, state_dim, key), JITStrategy.JIT, None)


def create_temporal_processor_no_jit(
    config: TemporalConfig, state_dim: int | None = None, key: PRNGKeyArray | None = None
) -> Callable:
    """The same temporal step, executed eagerly (op by op)."""
    return _bind(_temporal(config, state_dim, key), JITStrategy.EAGER, None)


def create_temporal_processor_safe(
    config: TemporalConfig,
    state_dim: int | None = None,
    key: PRNGKeyArray | None = None,
    *,
    use_jit: bool = True,
    on_fallback: FallbackListener | None = None,
) -> Callable:
    """Compiled when `use_jit`, falling back to eager execution on failure — reported to
    `on_fallback(name, reason)`, never silent."""
    strategy = JITStrategy.SAFE if use_jit else JITStrategy.EAGER
    return _bind(_temporal(config, state_dim, key), strategy, on_fallback)


def create_body_schema_processor(
    config: BodySchemaConfig, key: PRNGKeyArray | None = None
) -> Callable:
    """A compiled body-schema step; a compile failure raises `JITCompilationError`."""
    return _bind(_body(config, key), JITStrategy.JIT, None)


def create_body_schema_processor_no_jit(
    config: BodySchemaConfig, key: PRNGKeyArray | None = None
) -> Callable:
    """The same body-schema step, executed eagerly."""
    return _bind(_body(config, key), JITStrategy.EAGER, None)


def create_body_schema_processor_safe(
    config: BodySchemaConfig,
    key: PRNGKeyArray | None = None,
    *,
    use_jit: bool = True,
    on_fallback: FallbackListener | None = None,
) -> Callable:
    """Compiled when `use_jit`, with reported eager fallback."""
    strategy = JITStrategy.SAFE if use_jit else JITStrategy.EAGER
    return _bind(_body(config, key), strategy, on_fallback)


def _temporal(
    config: TemporalConfig, state_dim: int | None, key: PRNGKeyArray | None
) -> TemporalProcessor:
    return TemporalProcessor(config, state_dim, key=jax.random.PRNGKey(0) if key is None else key)


def _body(config: BodySchemaConfig, key: PRNGKeyArray | None) -> BodySchemaProcessor:
    return BodySchemaProcessor(config, key=jax.random.PRNGKey(0) if key is None else key)
