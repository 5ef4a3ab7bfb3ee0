"""Small layers the processors share."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(eqx.Module):
    """Multi-head attention of one query vector over a few context vectors, returning
    the head-averaged attention weights as well (which `eqx.nn.MultiheadAttention` does
    not)."""

    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    output: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, dim: int, heads: int, *, key: PRNGKeyArray) -> None:
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.query = eqx.nn.Linear(dim, dim, use_bias=False, key=kq)
        self.key = eqx.nn.Linear(dim, dim, use_bias=False, key=kk)
        self.value = eqx.nn.Linear(dim, dim, use_bias=False, key=kv)
        self.output = eqx.nn.Linear(dim, dim, key=ko)
        self.heads = heads

    def __call__(
        self, query: Float[Array, " D"], context: Float[Array, "N D"]
    ) -> tuple[Float[Array, " D"], Float[Array, " N"]]:
        """**Arguments:** `query` float32 `(D,)`; `context` float32 `(N, D)`.

        **Returns:** the attended vector `(D,)` and the head-averaged weights `(N,)`.
        """
        d = query.shape[0]
        hd = d // self.heads
        q = self.query(query).reshape(self.heads, hd)
        k = jax.vmap(self.key)(context).reshape(-1, self.heads, hd)
        v = jax.vmap(self.value)(context).reshape(-1, self.heads, hd)
        scores = jnp.einsum("hd,nhd->hn", q, k) / jnp.sqrt(jnp.float32(hd))
        weights = jax.nn.softmax(scores, axis=-1)
        attended = jnp.einsum("hn,nhd->hd", weights, v).reshape(d)
        return self.output(attended), jnp.mean(weights, axis=0)
