"""The temporal processor: retention, primal impression and protention in one step.

Husserl's time-consciousness: every "now" (primal impression) is held together with a
fading trail of what just was (retention) and an anticipation of what comes (protention).
Here that is a pure per-stream step over a ring of past impressions.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .config import TemporalConfig
from .layers import MultiHeadAttention

__all__ = ["TemporalOutput", "TemporalProcessor", "TemporalState"]


class TemporalState(eqx.Module):
    """One stream's temporal state.

    - `retention`: float32 `(R, D)`, past primal impressions, newest first.
    """

    retention: Float[Array, "R D"]


class TemporalOutput(eqx.Module):
    """What one temporal step produces for one frame (float32 throughout).

    - `synthesis`: `(D,)`, the temporal synthesis of the moment.
    - `impression`: `(D,)`, the primal impression of the present frame.
    - `retention`: `(D,)`, the decay-weighted synthesis of retained impressions.
    - `protention`: `(D,)`, the distance-weighted synthesis of anticipated states.
    - `attention`: `(3,)`, attention of the present over [retained, present,
        protentional], averaged over heads; sums to 1.
    """

    synthesis: Float[Array, " D"]
    impression: Float[Array, " D"]
    retention: Float[Array, " D"]
    protention: Float[Array, " D"]
    attention: Float[Array, " 3"]


class TemporalProcessor(eqx.Module):
    """Retention / primal impression / protention synthesis for one stream.

    `new_state, out = processor(state, sensory)` handles ONE unbatched frame; batch with
    `jax.vmap`.
    """

    impression: eqx.nn.Linear
    protention_weight: Float[Array, "H D D"]
    protention_bias: Float[Array, "H D"]
    protention_confidence: Float[Array, " H"]
    attention: MultiHeadAttention
    synthesis: eqx.nn.MLP
    retention_weights: Float[Array, " R"]
    distance_weights: Float[Array, " H"]
    state_dim: int = eqx.field(static=True)
    retention_depth: int = eqx.field(static=True)
    protention_horizon: int = eqx.field(static=True)
    context_gain: float = eqx.field(static=True)

    def __init__(
        self,
        config: TemporalConfig,
        state_dim: int | None = None,
        key: PRNGKeyArray | None = None,
    ) -> None:
        """**Arguments:**

        - `config`: a `TemporalConfig`.
        - `state_dim`: overrides `config.state_dim` when given (the original framework's
            signature, `TemporalProcessor(config, state_dim, key)`).
        - `key`: a `jax.random.PRNGKey` for parameter initialisation (required; positional
            for the original signature, or `key=`).
        """
        if key is None:
            raise TypeError("TemporalProcessor needs a PRNG key: key=jax.random.PRNGKey(seed)")
        if state_dim is not None and state_dim != config.state_dim:
            config = TemporalConfig(**{**config.__dict__, "state_dim": state_dim})
        d, r, h = config.state_dim, config.retention_depth, config.protention_horizon
        k_imp, k_pw, k_pc, k_att, k_syn = jax.random.split(key, 5)
        self.impression = eqx.nn.Linear(d, d, key=k_imp)
        scale = 1.0 / jnp.sqrt(jnp.asarray(d, jnp.float32))
        self.protention_weight = jax.random.normal(k_pw, (h, d, d), jnp.float32) * scale
        self.protention_bias = jnp.zeros((h, d), jnp.float32)
        self.protention_confidence = 1.0 + 0.1 * jax.random.normal(k_pc, (h,), jnp.float32)
        self.attention = MultiHeadAttention(d, config.attention_heads, key=k_att)
        self.synthesis = eqx.nn.MLP(
            3 * d, d, config.hidden_dim, depth=2, activation=jax.nn.gelu, key=k_syn
        )
        decay = jnp.power(jnp.float32(config.retention_decay), jnp.arange(r, dtype=jnp.float32))
        self.retention_weights = decay / jnp.sum(decay)
        distance = 1.0 / jnp.arange(1, h + 1, dtype=jnp.float32)
        self.distance_weights = distance / jnp.sum(distance)
        self.state_dim, self.retention_depth, self.protention_horizon = d, r, h
        self.context_gain = config.context_gain

    def init_state(self) -> TemporalState:
        """A fresh stream: an empty (all-zero) retention buffer."""
        return TemporalState(jnp.zeros((self.retention_depth, self.state_dim), jnp.float32))

    def __call__(
        self,
        state: TemporalState,
        sensory: Float[Array, " D"],
        present: Bool[Array, ""] | bool = True,
    ) -> tuple[TemporalState, TemporalOutput]:
        """One step for one stream.

        **Arguments:**

        - `state`: this stream's `TemporalState`.
        - `sensory`: float32 `(D,)`, the present frame.
        - `present`: bool scalar; when False the frame is treated as all-zero (absent) and
            the impression is zero, while retention still moves on by one step.

        **Returns:** `(new_state, TemporalOutput)`.
        """
        impression = jnp.where(present, jnp.tanh(self.impression(sensory)), 0.0)
        retained = self.retention_weights @ state.retention
        protentional = self._protend(impression, retained)
        context = jnp.stack([retained, impression, protentional])
        attended, attention = self.attention(impression, context)
        synthesis = self.synthesis(jnp.concatenate([retained, attended, protentional]))
        retention = jnp.concatenate([impression[None], state.retention[:-1]], axis=0)
        out = TemporalOutput(synthesis, impression, retained, protentional, attention)
        return TemporalState(retention), out

    def _protend(self, impression: Float[Array, " D"], context: Float[Array, " D"]) -> Array:
        """H chained projections tanh(W_t x + b_t + gain·context)·confidence_t, weighted by
        1/distance."""

        def step(x: Array, p: tuple[Any, Any, Any]) -> tuple[Array, Array]:
            w, b, c = p
            nxt = jnp.tanh(w @ x + b + self.context_gain * context) * jax.nn.sigmoid(c)
            return nxt, nxt

        _, projections = jax.lax.scan(
            step,
            impression,
            (self.protention_weight, self.protention_bias, self.protention_confidence),
        )
        return self.distance_weights @ projections
