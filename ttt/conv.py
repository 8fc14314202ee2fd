"""Causal depthwise convolution that reads the inputs before a sequence from a carried history.

The backward pass is written out (`jax.custom_vjp`): autodiff of the shifted sums transposes every
slice into a padded copy and reduces the weight gradients over [batch, seq] with the batch axis kept,
which XLA:CPU runs about ten times slower at batch 1 (benchmarks/xla_cpu.py). The adjoint below places
each tap's gradient back by the same shifts, and reduces weight gradients over flattened tokens. It is
built from differentiable JAX operations, so gradients of gradients (reverse over reverse) still work.
"""

import jax
import jax.numpy as jnp

from ttt.documents import segment_ids


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, bias: jax.Array, history: jax.Array,
                          document_starts: jax.Array | None = None) -> jax.Array:
    """y_t = bias + sum_j weight[j] * x_{t - K + 1 + j}, reading the K - 1 inputs before x from `history`.

    Args:
      x: [batch, seq, *channels]; weight: [K, *channels]; bias: [*channels].
      history: [batch, K - 1, *channels], the inputs before x (zeros at the start of a sequence).
      document_starts: bool [batch, seq] or None (ttt/documents.py): an output reads the inputs
        before the latest start at or before it as zeros, as at the start of a sequence.
    Returns:
      [batch, seq, *channels].
    """
    kernel, seq_len = weight.shape[0], x.shape[1]
    padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    keep = None
    if document_starts is not None:
        segments = segment_ids(document_starts)
        padded_segments = jnp.pad(segments, [(0, 0), (kernel - 1, 0)])
        keep = jnp.stack([padded_segments[:, j:j + seq_len] == segments for j in range(kernel)])
    return _valid_conv(padded, weight, bias, keep)


def next_history(history: jax.Array, x: jax.Array, document_starts: jax.Array | None = None) -> jax.Array:
    """The last K - 1 inputs after reading x [batch, seq, ...] that followed `history` [batch, K - 1, ...];
    with `document_starts` [batch, seq], those before the last document's start are zeros (the tokens
    that continue that document never read them)."""
    kept = jnp.concatenate([history, x.astype(history.dtype)], axis=1)[:, x.shape[1]:]
    if document_starts is None:
        return kept
    segments = jnp.pad(segment_ids(document_starts), [(0, 0), (history.shape[1], 0)])
    return _where_rows(segments[:, x.shape[1]:] == segments[:, -1:], kept)


def _where_rows(keep: jax.Array, x: jax.Array) -> jax.Array:
    """x [batch, seq, *channels] where keep [batch, seq], else 0."""
    return jnp.where(keep.reshape(*keep.shape, *(1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


def _taps(padded: jax.Array, kernel: int, keep: jax.Array | None) -> list[jax.Array]:
    """Tap j of every output, padded[:, j : j + seq] (zero where `keep[j]` [batch, seq] is False)."""
    length = padded.shape[1] - kernel + 1
    taps = [padded[:, j:j + length] for j in range(kernel)]
    return taps if keep is None else [_where_rows(keep[j], tap) for j, tap in enumerate(taps)]


@jax.custom_vjp
def _valid_conv(padded, weight, bias, keep):
    """[batch, K - 1 + seq, *channels] -> [batch, seq, *channels]: the taps over every full window."""
    return bias + sum(weight[j] * tap for j, tap in enumerate(_taps(padded, weight.shape[0], keep)))


def _valid_conv_fwd(padded, weight, bias, keep):
    return _valid_conv(padded, weight, bias, keep), (padded, weight, bias, keep)


def _valid_conv_bwd(residuals, grad):
    padded, weight, bias, keep = residuals
    kernel = weight.shape[0]
    tap_grads = [grad if keep is None else _where_rows(keep[j], grad) for j in range(kernel)]
    # Tap j of output t read input t + j: its gradient goes back shifted by j.
    trailing = [(0, 0)] * (grad.ndim - 2)
    grad_input = sum(jnp.pad(weight[j].astype(grad.dtype) * tap_grads[j], [(0, 0), (j, kernel - 1 - j)] + trailing)
                     for j in range(kernel))

    def token_sum(a):  # [batch, seq, *channels] -> [*channels] in float32, tokens flattened first
        return jnp.sum(a.astype(jnp.float32).reshape(-1, *a.shape[2:]), axis=0)

    taps = _taps(padded, kernel, None)
    grad_weight = jnp.stack([token_sum(tap_grads[j] * taps[j]) for j in range(kernel)])
    return (grad_input.astype(padded.dtype), grad_weight.astype(weight.dtype), token_sum(grad).astype(bias.dtype),
            None)


_valid_conv.defvjp(_valid_conv_fwd, _valid_conv_bwd)
