"""Next-token cross-entropy computed chunk by chunk, so float32 logits exist for one chunk at a time."""

import jax
import jax.numpy as jnp
import optax

from ttt.sharding import constrain


def project_to_vocab(hidden: jax.Array, unembedding: jax.Array, out_dtype) -> jax.Array:
    """hidden: [batch, seq, embed], unembedding: [embed, vocab] -> logits [batch, seq, vocab] in out_dtype.

    The matmul runs in hidden's dtype and accumulates in out_dtype.
    """
    logits = jnp.einsum("bsd,dv->bsv", hidden, unembedding.astype(hidden.dtype), preferred_element_type=out_dtype)
    return constrain(logits, ("batch", "seq", "vocab"))


def chunked_cross_entropy(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, chunk_size: int) -> jax.Array:
    """Per-token cross-entropy of the logits `hidden @ unembedding` against `targets`.

    The sequence is cut into chunks of `chunk_size` positions; each chunk's logits are computed in
    float32, reduced to one loss per token and dropped. The chunk body is rematerialised, so the
    backward pass also never holds more than one chunk of logits.

    Args:
      hidden: [batch, seq, embed] final hidden states.
      unembedding: [embed, vocab].
      targets: int [batch, seq] token ids to predict.
      chunk_size: positions per chunk.
    Returns:
      float32 [batch, seq] of -log p(target).
    """
    batch, seq, embed = hidden.shape
    chunk_size = min(chunk_size, seq)
    num_chunks = -(-seq // chunk_size)
    padding = num_chunks * chunk_size - seq
    hidden = jnp.pad(hidden, ((0, 0), (0, padding), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, padding)))
    # [num_chunks, batch, chunk, ...]: the scan runs over chunks.
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk_size, embed).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(_, chunk):
        hidden_chunk, target_chunk = chunk
        logits = project_to_vocab(hidden_chunk, unembedding, jnp.float32)
        return None, optax.softmax_cross_entropy_with_integer_labels(logits, target_chunk)

    _, losses = jax.lax.scan(chunk_loss, None, (hidden_chunks, target_chunks))
    return losses.swapaxes(0, 1).reshape(batch, num_chunks * chunk_size)[:, :seq]
