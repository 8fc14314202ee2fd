"""Rotary position embedding (RoPE)."""

from typing import Literal

import jax
import jax.numpy as jnp

Pairing = Literal["half", "interleaved"]
PAIRINGS = ("half", "interleaved")


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float, pairing: Pairing = "half") -> jax.Array:
    """Rotates feature pairs of `x` by angle `position * theta^(-2i/head_dim)` for pair i.

    `pairing="half"` rotates features (i, i + head_dim/2); `"interleaved"` rotates (2i, 2i + 1), as
    the reference code of Sun et al. 2024 does. The two are the same map up to a fixed permutation
    of the features, so a model computes the same function with either once its weights are
    permuted accordingly; the switch lets converted weights run unpermuted.

    Args:
      x: [batch, seq, heads, head_dim].
      positions: [seq] integer positions.
    Returns:
      [batch, seq, heads, head_dim], computed in float32 and cast back to `x.dtype`.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r}; expected one of {PAIRINGS}")
    half = x.shape[-1] // 2
    frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * frequencies  # [seq, half]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    if pairing == "half":
        first, second = jnp.split(x32, 2, axis=-1)
    else:
        first, second = x32[..., 0::2], x32[..., 1::2]
    rotated = (first * cos - second * sin, second * cos + first * sin)
    if pairing == "half":
        return jnp.concatenate(rotated, axis=-1).astype(x.dtype)
    return jnp.stack(rotated, axis=-1).reshape(x.shape).astype(x.dtype)
