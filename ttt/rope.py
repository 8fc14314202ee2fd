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

    The rotation is written as `x * cos + swap(x) * (-sin, sin)`, with `swap` exchanging the two
    features of each pair (a reversal of a size-2 axis), so that it stays elementwise: XLA fuses it
    into its neighbours without the concatenations a split-and-join would need. With concrete
    positions (training from the initial state) the sin/cos tables are computed once, at trace time,
    instead of in every fusion that reads them.

    Args:
      x: [batch, seq, heads, head_dim].
      positions: [seq] integer positions.
    Returns:
      [batch, seq, heads, head_dim], computed in float32 and cast back to `x.dtype`.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r}; expected one of {PAIRINGS}")
    batch, seq_len, heads, head_dim = x.shape
    half = head_dim // 2
    pair_axis = -2 if pairing == "half" else -1  # pairs (i, i + half) along [2, half]; (2i, 2i + 1) along [half, 2]
    with jax.ensure_compile_time_eval():
        frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
        angles = positions.astype(jnp.float32)[:, None, None] * frequencies  # [seq, 1, half]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        cos, signed_sin = jnp.stack([cos, cos], axis=pair_axis), jnp.stack([-sin, sin], axis=pair_axis)
    pairs = x.astype(jnp.float32).reshape(batch, seq_len, heads, *cos.shape[-2:])
    rotated = pairs * cos + jnp.flip(pairs, axis=pair_axis) * signed_sin
    return rotated.reshape(x.shape).astype(x.dtype)
