"""The enactive model: the temporal and body-schema processors integrated into one moment."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .body_schema import BodySchemaProcessor, BodyState
from .config import ModelConfig
from .temporal import TemporalProcessor, TemporalState

__all__ = ["MODALITIES", "RECORD_FIELDS", "EnactiveModel", "EnactiveOutput", "EnactiveState"]

MODALITIES = ("sensory", "proprio", "tactile", "motor")
"""Input modalities, in the order of the presence mask and of the wire payload."""

RECORD_FIELDS = (
    "moment",
    "synthesis",
    "schema",
    "motor_command",
    "coherence",
    "boundary",
    "confidence",
)
"""Output fields packed, in this order, into one float32 record row by `pack_record`."""


class EnactiveState(eqx.Module):
    """One stream's whole state: `temporal` (`TemporalState`) and `body` (`BodyState`)."""

    temporal: TemporalState
    body: BodyState


class EnactiveOutput(eqx.Module):
    """Everything one step produces for one frame (float32 throughout).

    - `moment`: `(K,)`, the integrated moment vector (K = `moment_dim`).
    - `coherence`: `()`, agreement of time and body in [0, 1] (1 = aligned).
    - `synthesis`, `impression`, `retention`, `protention`: `(D,)`, temporal vectors.
    - `attention`: `(3,)`, attention over [retained, present, protentional].
    - `schema`: `(P,)`; `som_activation`: `(G·G,)`; `motor_command`: `(M,)`.
    - `confidence`, `boundary`, `boundary_confidence`: `()`, in [0, 1].
    """

    moment: Float[Array, " K"]
    coherence: Float[Array, ""]
    synthesis: Float[Array, " D"]
    impression: Float[Array, " D"]
    retention: Float[Array, " D"]
    protention: Float[Array, " D"]
    attention: Float[Array, " 3"]
    schema: Float[Array, " P"]
    som_activation: Float[Array, " G"]
    motor_command: Float[Array, " M"]
    confidence: Float[Array, ""]
    boundary: Float[Array, ""]
    boundary_confidence: Float[Array, ""]


class EnactiveModel(eqx.Module):
    """Temporal processor + body-schema processor + their integration, for one stream.

    ```python
    model = EnactiveModel(ModelConfig(), key=jax.random.PRNGKey(0))
    state = model.init_state()
    state, out = model(state, sensory, proprio, tactile, motor)      # one frame
    states, outs = jax.vmap(model)(states, s, p, t, m)               # a batch
    ```
    """

    temporal: TemporalProcessor
    body: BodySchemaProcessor
    time_projection: eqx.nn.Linear
    body_projection: eqx.nn.Linear
    integration: eqx.nn.MLP
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, key: PRNGKeyArray) -> None:
        """**Arguments:** `config`, a `ModelConfig`; `key`, a `jax.random.PRNGKey`
        (positional or `key=`). The same key always gives the same parameters."""
        k_t, k_b, k_tp, k_bp, k_i = jax.random.split(key, 5)
        k = config.moment_dim
        assert k is not None  # filled in by ModelConfig.__post_init__
        self.temporal = TemporalProcessor(config.temporal, key=k_t)
        self.body = BodySchemaProcessor(config.body, key=k_b)
        self.time_projection = eqx.nn.Linear(config.state_dim, k, key=k_tp)
        self.body_projection = eqx.nn.Linear(config.proprio_dim, k, key=k_bp)
        self.integration = eqx.nn.MLP(
            2 * k,
            k,
            config.hidden_dim,
            depth=1,
            activation=jax.nn.gelu,
            final_activation=jnp.tanh,
            key=k_i,
        )
        self.config = config

    def init_state(self) -> EnactiveState:
        """One fresh stream's state."""
        return EnactiveState(self.temporal.init_state(), self.body.init_state())

    def __call__(
        self,
        state: EnactiveState,
        sensory: Float[Array, " D"],
        proprio: Float[Array, " P"],
        tactile: Float[Array, " T"],
        motor: Float[Array, " M"],
        present: Bool[Array, " 4"] | None = None,
    ) -> tuple[EnactiveState, EnactiveOutput]:
        """One step for one stream.

        **Arguments:**

        - `state`: this stream's `EnactiveState`.
        - `sensory`, `proprio`, `tactile`, `motor`: float32 `(D,)`, `(P,)`, `(T,)`, `(M,)`.
        - `present`: bool `(4,)`, one flag per modality in `MODALITIES` order; default all
            True. An absent modality's values are ignored (treated as zeros) — callers
            zero-fill them and clear the flag; nothing is guessed.

        **Returns:** `(new_state, EnactiveOutput)`.
        """
        if present is None:
            present = jnp.ones(4, bool)
        temporal_state, t = self.temporal(state.temporal, sensory, present[0])
        body_state, b = self.body(state.body, proprio, tactile, motor, present[1:])
        in_time = self.time_projection(t.synthesis)
        in_body = self.body_projection(b.schema)
        moment = self.integration(jnp.concatenate([in_time, in_body]))
        cosine = jnp.dot(in_time, in_body) / (
            jnp.linalg.norm(in_time) * jnp.linalg.norm(in_body) + 1e-6
        )
        coherence = 0.5 * (1.0 + cosine)
        out = EnactiveOutput(
            moment,
            coherence,
            t.synthesis,
            t.impression,
            t.retention,
            t.protention,
            t.attention,
            b.schema,
            b.som_activation,
            b.motor_command,
            b.confidence,
            b.boundary,
            b.boundary_confidence,
        )
        return EnactiveState(temporal_state, body_state), out


def pack_record(out: EnactiveOutput) -> Float[Array, " W"]:
    """Concatenate the fields of `RECORD_FIELDS` of ONE frame's output into one float32 row
    of width K + D + P + M + 3 — the payload layout of a wire-protocol moment record."""
    return jnp.concatenate([jnp.atleast_1d(getattr(out, f)) for f in RECORD_FIELDS])
