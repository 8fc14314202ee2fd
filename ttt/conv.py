"""Causal depthwise convolution that reads the inputs before a sequence from a carried history."""

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
    taps = [padded[:, j:j + seq_len] for j in range(kernel)]
    if document_starts is not None:
        segments = segment_ids(document_starts)
        padded_segments = jnp.pad(segments, [(0, 0), (kernel - 1, 0)])
        taps = [_where_rows(padded_segments[:, j:j + seq_len] == segments, tap) for j, tap in enumerate(taps)]
    return bias + sum(weight[j] * tap for j, tap in enumerate(taps))


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
