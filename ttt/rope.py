"""Rotary position embedding (RoPE)."""

import jax
import jax.numpy as jnp


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates feature pairs (i, i + head_dim/2) of `x` by angle `position * theta^(-2i/head_dim)`.

    Args:
      x: [batch, seq, heads, head_dim].
      positions: [seq] integer positions.
    Returns:
      [batch, seq, heads, head_dim], computed in float32 and cast back to `x.dtype`.
    """
    half = x.shape[-1] // 2
    frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * frequencies  # [seq, half]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
