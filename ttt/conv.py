"""Causal depthwise convolution that reads the inputs before a sequence from a carried history."""

import jax
import jax.numpy as jnp


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, history: jax.Array) -> jax.Array:
    """y_t = bias + sum_j weight[j] * x_{t - K + 1 + j}, reading the K - 1 inputs before x from `history`.

    Args:
      x: [batch, seq, *channels]; weight: [K, *channels]; bias: [*channels].
      history: [batch, K - 1, *channels], the inputs before x (zeros at the start of a sequence).
    Returns:
      [batch, seq, *channels].
    """
    kernel, seq_len = weight.shape[0], x.shape[1]
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    return bias + sum(weight[j] * padded[:, j:j + seq_len] for j in range(kernel))


def next_history(history: jax.Array, x: jax.Array) -> jax.Array:
    """The last K - 1 inputs after reading x [batch, seq, ...] that followed `history` [batch, K - 1, ...]."""
    return jnp.concatenate([history, x.astype(history.dtype)], axis=1)[:, x.shape[1]:]
