"""Causal depthwise convolution that reads the inputs before a sequence from a carried history.

The backward pass is written out (`jax.custom_vjp`): autodiff of the shifted sums transposes every
slice into a padded copy and reduces the weight gradients over [batch, seq] with the batch axis kept,
which XLA:CPU runs about ten times slower at batch 1 (benchmarks/ttt_layer.py). The adjoint below is
the same shifted sum with the taps reversed, and weight gradients reduced over flattened tokens. It is
built from differentiable JAX operations, so gradients of gradients (reverse over reverse) still work.
"""

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
    return _valid_conv(jnp.concatenate([history.astype(x.dtype), x], axis=1), weight, bias)


def next_history(history: jax.Array, x: jax.Array) -> jax.Array:
    """The last K - 1 inputs after reading x [batch, seq, ...] that followed `history` [batch, K - 1, ...]."""
    return jnp.concatenate([history, x.astype(history.dtype)], axis=1)[:, x.shape[1]:]


def _shifted_sum(padded: jax.Array, weight: jax.Array, length: int) -> jax.Array:
    """sum_j weight[j] * padded[:, j : j + length]: [batch, length, *channels]."""
    return sum(weight[j] * padded[:, j:j + length] for j in range(weight.shape[0]))


@jax.custom_vjp
def _valid_conv(padded, weight, bias):
    """[batch, K - 1 + seq, *channels] -> [batch, seq, *channels]: the taps over every full window."""
    return bias + _shifted_sum(padded, weight, padded.shape[1] - weight.shape[0] + 1)


def _valid_conv_fwd(padded, weight, bias):
    return _valid_conv(padded, weight, bias), (padded, weight, bias)


def _valid_conv_bwd(residuals, grad):
    padded, weight, bias = residuals
    kernel, length = weight.shape[0], grad.shape[1]
    # Input position s received weight[j] * padded[s] in output s - j: the adjoint is the same
    # shifted sum over the gradient padded by K - 1 on both sides, with the taps reversed.
    grad_padded = jnp.pad(grad, [(0, 0), (kernel - 1, kernel - 1)] + [(0, 0)] * (grad.ndim - 2))
    grad_input = _shifted_sum(grad_padded, weight[::-1].astype(grad.dtype), padded.shape[1])

    def token_sum(a):  # [batch, seq, *channels] -> [*channels] in float32, tokens flattened first
        return jnp.sum(a.astype(jnp.float32).reshape(-1, *a.shape[2:]), axis=0)

    grad_weight = jnp.stack([token_sum(grad * padded[:, j:j + length]) for j in range(kernel)])
    return grad_input.astype(padded.dtype), grad_weight.astype(weight.dtype), token_sum(grad).astype(bias.dtype)


_valid_conv.defvjp(_valid_conv_fwd, _valid_conv_bwd)
