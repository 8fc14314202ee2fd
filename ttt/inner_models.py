"""Inner models g(x; theta): the fast weights a TTT layer trains while it reads.

Each model is a pair of pure functions on the parameters of one head:
`init(key, head_dim) -> params` and `apply(params, x) -> y` with `x, y: [..., head_dim]`.
The ops add the batch and head axes (`[batch, heads, ...]` on every leaf) with vmap.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class InnerModel:
    """An inner model: parameter initialiser and forward function for one head."""

    name: str
    init: Callable[[jax.Array, int], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    param_shapes: Callable[[int], dict[str, tuple[int, ...]]]


def gelu(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation, as in Sun et al. 2024."""
    return jax.nn.gelu(x, approximate=True)


def _linear_shapes(d: int) -> dict[str, tuple[int, ...]]:
    return {"W": (d, d), "b": (d,)}


def _linear_init(key: jax.Array, d: int) -> Params:
    return {"W": 0.02 * jax.random.normal(key, (d, d), jnp.float32), "b": jnp.zeros((d,), jnp.float32)}


def _linear_apply(params: Params, x: jax.Array) -> jax.Array:
    return x @ params["W"] + params["b"]


MLP_EXPANSION = 4


def _mlp_shapes(d: int) -> dict[str, tuple[int, ...]]:
    h = MLP_EXPANSION * d
    return {"W1": (d, h), "b1": (h,), "W2": (h, d), "b2": (d,)}


def _mlp_init(key: jax.Array, d: int) -> Params:
    k1, k2 = jax.random.split(key)
    h = MLP_EXPANSION * d
    return {
        "W1": 0.02 * jax.random.normal(k1, (d, h), jnp.float32),
        "b1": jnp.zeros((h,), jnp.float32),
        "W2": 0.02 * jax.random.normal(k2, (h, d), jnp.float32),
        "b2": jnp.zeros((d,), jnp.float32),
    }


def _mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    return gelu(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


LINEAR = InnerModel("linear", _linear_init, _linear_apply, _linear_shapes)
MLP = InnerModel("mlp", _mlp_init, _mlp_apply, _mlp_shapes)
