"""The body-schema processor: proprioception, motor intention and the body's boundary.

Merleau-Ponty's body schema: the body knows where it is (proprioception), what it is
about to do (motor intention) and where it ends and the world begins (boundary), all
at once and without thinking about it. Here that is a pure per-stream step.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .config import BodySchemaConfig

__all__ = ["BodySchemaOutput", "BodySchemaProcessor", "BodyState"]


class BodyState(eqx.Module):
    """One stream's body-schema state (float32).

    - `motor_hidden`: `(Hd,)`, the motor GRU's hidden state.
    - `boundary_memory`: `(P+T+M,)`, a slow average of what the body has felt.
    - `som`: `(G·G, P)` this stream's own map when `som_adaptation="per_stream"`, else None.
    """

    motor_hidden: Float[Array, " Hd"]
    boundary_memory: Float[Array, " F"]
    som: Float[Array, "G P"] | None


class BodySchemaOutput(eqx.Module):
    """What one body-schema step produces for one frame (float32 throughout).

    - `schema`: `(P,)`, the integrated body-schema vector.
    - `som_activation`: `(G·G,)`, the map's activation; sums to 1.
    - `motor_command`: `(M,)`, the decoded motor intention, in [-1, 1].
    - `confidence`: `()`, confidence of the motor intention, in [0, 1].
    - `boundary`: `()`, the body-boundary signal, in [0, 1].
    - `boundary_confidence`: `()`, confidence of the boundary signal, in [0, 1].
    """

    schema: Float[Array, " P"]
    som_activation: Float[Array, " G"]
    motor_command: Float[Array, " M"]
    confidence: Float[Array, ""]
    boundary: Float[Array, ""]
    boundary_confidence: Float[Array, ""]


class BodySchemaProcessor(eqx.Module):
    """Proprioceptive map, motor schema and boundary detector for one stream.

    `new_state, out = processor(state, proprio, tactile, motor)` handles ONE unbatched
    frame; batch with `jax.vmap`.
    """

    som: Float[Array, "G P"]
    som_features: eqx.nn.Linear
    motor_cell: eqx.nn.GRUCell
    motor_mlp: eqx.nn.MLP
    motor_decoder: eqx.nn.Linear
    motor_confidence: eqx.nn.Linear
    boundary_mlp: eqx.nn.MLP
    boundary_head: eqx.nn.Linear
    schema_mlp: eqx.nn.MLP
    proprio_dim: int = eqx.field(static=True)
    tactile_dim: int = eqx.field(static=True)
    motor_dim: int = eqx.field(static=True)
    hidden_dim: int = eqx.field(static=True)
    som_temperature: float = eqx.field(static=True)
    som_adaptation: str = eqx.field(static=True)
    som_learning_rate: float = eqx.field(static=True)
    boundary_decay: float = eqx.field(static=True)

    def __init__(self, config: BodySchemaConfig, key: PRNGKeyArray) -> None:
        """**Arguments:** `config`, a `BodySchemaConfig`; `key`, a `jax.random.PRNGKey`
        (positional or `key=`)."""
        p, t, m, hd = config.proprio_dim, config.tactile_dim, config.motor_dim, config.hidden_dim
        units = config.som_grid[0] * config.som_grid[1]
        keys = jax.random.split(key, 8)
        self.som = jax.random.uniform(keys[0], (units, p), jnp.float32, -1.0, 1.0)
        self.som_features = eqx.nn.Linear(units, hd, key=keys[1])
        self.motor_cell = eqx.nn.GRUCell(m, hd, key=keys[2])
        self.motor_mlp = eqx.nn.MLP(2 * hd, hd, hd, depth=1, activation=jax.nn.gelu, key=keys[3])
        self.motor_decoder = eqx.nn.Linear(hd, m, key=keys[4])
        self.motor_confidence = eqx.nn.Linear(hd, "scalar", key=keys[5])
        self.boundary_mlp = eqx.nn.MLP(
            2 * (p + t + m), hd, hd, depth=1, activation=jax.nn.gelu, key=keys[6]
        )
        k_head, k_schema = jax.random.split(keys[7])
        self.boundary_head = eqx.nn.Linear(hd, 2, key=k_head)
        self.schema_mlp = eqx.nn.MLP(
            3 * hd, p, hd, depth=2, activation=jax.nn.gelu, final_activation=jnp.tanh, key=k_schema
        )
        self.proprio_dim, self.tactile_dim, self.motor_dim, self.hidden_dim = p, t, m, hd
        self.som_temperature = config.som_temperature
        self.som_adaptation = config.som_adaptation
        self.som_learning_rate = config.som_learning_rate
        self.boundary_decay = config.boundary_decay

    def init_state(self) -> BodyState:
        """A fresh stream: zero GRU state, zero boundary memory, the shared map if adapting."""
        features = self.proprio_dim + self.tactile_dim + self.motor_dim
        som = self.som if self.som_adaptation == "per_stream" else None
        return BodyState(
            jnp.zeros(self.hidden_dim, jnp.float32), jnp.zeros(features, jnp.float32), som
        )

    def __call__(
        self,
        state: BodyState,
        proprio: Float[Array, " P"],
        tactile: Float[Array, " T"],
        motor: Float[Array, " M"],
        present: Bool[Array, " 3"] | None = None,
    ) -> tuple[BodyState, BodySchemaOutput]:
        """One step for one stream.

        **Arguments:**

        - `state`: this stream's `BodyState`.
        - `proprio`, `tactile`, `motor`: float32 `(P,)`, `(T,)`, `(M,)`.
        - `present`: bool `(3,)` for (proprio, tactile, motor), default all present. An
            absent input counts as zeros; an absent motor signal leaves the GRU state as
            it was; an absent proprio signal does not move an adapting map.

        **Returns:** `(new_state, BodySchemaOutput)`.
        """
        if present is None:
            present = jnp.ones(3, bool)
        proprio = jnp.where(present[0], proprio, 0.0)
        tactile = jnp.where(present[1], tactile, 0.0)
        motor = jnp.where(present[2], motor, 0.0)

        som = self.som if state.som is None else state.som
        distance = jnp.sum(jnp.square(som - proprio), axis=-1) / self.proprio_dim
        activation = jax.nn.softmax(-distance / self.som_temperature)
        som_features = jax.nn.gelu(self.som_features(activation))
        new_som = state.som
        if state.som is not None:  # static: decided by the config, not by data
            rate = jnp.where(present[0], self.som_learning_rate, 0.0)
            new_som = state.som + rate * activation[:, None] * (proprio - state.som)

        hidden = jnp.where(
            present[2], self.motor_cell(motor, state.motor_hidden), state.motor_hidden
        )
        intention = self.motor_mlp(jnp.concatenate([hidden, som_features]))
        motor_command = jnp.tanh(self.motor_decoder(intention))
        confidence = jax.nn.sigmoid(self.motor_confidence(intention))

        felt = jnp.concatenate([proprio, tactile, motor])
        surprise = felt - state.boundary_memory
        boundary_hidden = self.boundary_mlp(jnp.concatenate([felt, surprise]))
        boundary, boundary_confidence = jax.nn.sigmoid(self.boundary_head(boundary_hidden))
        memory = self.boundary_decay * state.boundary_memory + (1.0 - self.boundary_decay) * felt

        schema = self.schema_mlp(jnp.concatenate([som_features, intention, boundary_hidden]))
        out = BodySchemaOutput(
            schema, activation, motor_command, confidence, boundary, boundary_confidence
        )
        return BodyState(hidden, memory, new_som), out
