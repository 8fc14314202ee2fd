"""Sliding-window causal attention in time and memory linear in the sequence length.

Queries are cut into blocks; each block attends to its own keys and the `window - 1` keys before
it, so the scores held are [block, block + window - 1] per block instead of [seq, seq]. The key
span of every block is made of shifted views of one reshaped array (a copy, not a gather). A
`lax.scan` runs over chunks of several blocks, each chunk a continuation of the previous keys,
so that its scores stay in cache; each chunk is recomputed in the backward pass (remat), so the
backward keeps no scores either.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def default_block_size(window: int) -> int:
    """Queries per block for a window: half the window rounded up to a multiple of 8, within 16 ... 64.

    A block of b queries computes scores against b + window - 1 keys, so smaller blocks waste fewer
    masked scores and larger ones make larger matmuls. On a 2-core CPU (batch 1, 4 heads, head_dim
    32) block 32 was the fastest for window 64 and block 64 for window 256, forward and backward.
    """
    return min(64, max(16, 8 * math.ceil(window / 16)))


def _overlapping_spans(array: jax.Array, front: int, back: int, block: int, halo: int) -> jax.Array:
    """Pads the key axis (axis 1) and cuts it into blocks, each with the `halo` keys before it.

    array: [batch, keys, ...] with front + keys + back = num_blocks * block + halo ->
    [batch, num_blocks, halo + block, ...]; span n holds padded keys n * block ... n * block +
    halo + block - 1. Padding is zero (False for masks). Built from shifted views of one reshaped
    array, so the cost is a copy, not a gather.
    """
    if front + array.shape[1] + back == halo + block:  # a single span (short continuations, decoding)
        return jnp.pad(array, [(0, 0), (front, back)] + [(0, 0)] * (array.ndim - 2))[:, None]
    reach = -(-halo // block)  # whole blocks covering the halo
    extra = reach * block - halo
    pad = [(0, 0), (front + extra, back)] + [(0, 0)] * (array.ndim - 2)
    blocks = jnp.pad(array, pad)
    blocks = blocks.reshape(blocks.shape[0], -1, block, *blocks.shape[2:])
    num_blocks = blocks.shape[1] - reach
    spans = jnp.concatenate([blocks[:, shift:shift + num_blocks] for shift in range(reach + 1)], axis=2)
    return spans[:, :, extra:]


def _blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, key_valid: jax.Array,
                       segment_ids: jax.Array | None, window: int, block: int) -> jax.Array:
    """All query blocks at once. Same contract as `sliding_window_attention` with key_valid given
    and at most window - 1 keys before the first query (kv_len - q_len < window)."""
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    halo = window - 1
    num_blocks = -(-q_len // block)
    front = halo - (key.shape[1] - q_len)
    back = num_blocks * block - q_len
    key_spans = _overlapping_spans(key, front, back, block, halo)          # [b, n, span, kv_heads, d]
    value_spans = _overlapping_spans(value, front, back, block, halo)      # [b, n, span, kv_heads, d]
    valid_spans = _overlapping_spans(key_valid, front, back, block, halo)  # [b, n, span]

    # Query row i of a block sits at span index halo + i; span key s is (halo + i - s) back.
    distance = (halo + np.arange(block))[:, None] - np.arange(halo + block)[None, :]
    in_window = jnp.asarray((distance >= 0) & (distance < window))  # [block, span], same for every block
    mask = in_window[None, None, None, None] & valid_spans[:, :, None, None, None, :]
    if segment_ids is not None:
        segment_spans = _overlapping_spans(segment_ids, front, back, block, halo)  # [b, n, span]
        same = segment_spans[:, :, halo:, None] == segment_spans[:, :, None, :]  # query row i at span index halo + i
        mask = mask & same[:, :, None, None]

    group = heads // kv_heads
    query_blocks = jnp.pad(query, [(0, 0), (0, back), (0, 0), (0, 0)])
    query_blocks = query_blocks.reshape(batch, num_blocks, block, kv_heads, group, head_dim)
    logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", query_blocks, key_spans, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(head_dim))

    # Masked softmax that gives 0 (and finite gradients) for a row with no valid key.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probabilities = weights / jnp.where(total > 0, total, 1.0)

    output = jnp.einsum("bnkgqs,bnskd->bnqkgd", probabilities.astype(value.dtype), value_spans,
                        preferred_element_type=jnp.float32)
    output = output.reshape(batch, num_blocks * block, heads, head_dim)[:, :q_len]
    return output.astype(query.dtype)


def sliding_window_attention(query: jax.Array, key: jax.Array, value: jax.Array, window: int, *,
                             key_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                             block_size: int | None = None, chunk_size: int = 512) -> jax.Array:
    """Causal softmax attention of each query to the last `window` key positions up to its own.

    The queries are the last q_len positions of the key sequence: query i sits at key position
    p = kv_len - q_len + i and attends to the valid keys at positions p - window + 1 ... p. So one
    call serves a whole sequence (kv_len == q_len) and a continuation whose keys start with
    cached ones (kv_len > q_len). Logits are accumulated and the softmax taken in float32;
    scale 1/sqrt(head_dim). A query with no valid key in its window gets output 0 (not NaN).
    Time and memory are linear in q_len; keys that no query can reach are never read.

    Args:
      query: [batch, q_len, heads, head_dim].
      key, value: [batch, kv_len, kv_heads, head_dim], kv_len >= q_len; heads is a multiple of
        kv_heads (query head h reads key/value head h // (heads // kv_heads)).
      window: number of key positions each query may see, itself included (>= 1).
      key_valid: [batch, kv_len] bool, False for keys that do not exist (e.g. empty cache slots);
        None means all exist.
      segment_ids: int [batch, kv_len] or None: the document of each key position (the queries' are
        the last q_len); a query reads only keys of its own document (ttt/documents.py).
      block_size: queries per block; None chooses `default_block_size(window)`.
      chunk_size: queries per step of the scan over the sequence (rounded down to a multiple of
        the block); all blocks of a chunk are computed at once. Chunks keep the scores in cache:
        at 16K tokens one chunk of the whole sequence was 2x slower than chunks of 512.
    Returns:
      [batch, q_len, heads, head_dim] in query's dtype.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if key.shape != value.shape or key.shape[0] != batch or key.shape[3] != head_dim:
        raise ValueError(f"key {key.shape} and value {value.shape} must both be "
                         f"[{batch}, kv_len, kv_heads, {head_dim}] for query {query.shape}")
    if kv_len < q_len:
        raise ValueError(f"kv_len {kv_len} must be >= q_len {q_len}: queries are the last keys' positions")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} must be a multiple of kv_heads {kv_heads}")
    for name, per_key in (("key_valid", key_valid), ("segment_ids", segment_ids)):
        if per_key is not None and per_key.shape != (batch, kv_len):
            raise ValueError(f"{name} {per_key.shape} must be [batch, kv_len] = [{batch}, {kv_len}]")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    block = min(block_size or default_block_size(window), q_len)

    # Keys before the first query's window are unreachable: drop them.
    halo = window - 1
    first_key = max(0, kv_len - q_len - halo)
    key, value = key[:, first_key:], value[:, first_key:]
    key_valid = jnp.ones(key.shape[:2], bool) if key_valid is None else key_valid[:, first_key:]
    segment_ids = None if segment_ids is None else segment_ids[:, first_key:]
    attend = functools.partial(_blocked_attention, window=window, block=block)
    chunk = block * max(1, chunk_size // block)
    if q_len <= chunk:
        return attend(query, key, value, key_valid, segment_ids)

    # A scan over chunks keeps each chunk's scores in cache; every chunk is a continuation with
    # the `halo` keys before it. Recomputing a chunk in the backward pass (checkpoint) was faster
    # than keeping all scores, and keeps the backward's memory linear too.
    num_chunks = -(-q_len // chunk)
    front = halo - (key.shape[1] - q_len)
    back = num_chunks * chunk - q_len
    spans = [None if a is None else jnp.moveaxis(_overlapping_spans(a, front, back, chunk, halo), 1, 0)
             for a in (key, value, key_valid, segment_ids)]
    query_chunks = jnp.pad(query, [(0, 0), (0, back), (0, 0), (0, 0)])
    query_chunks = jnp.moveaxis(query_chunks.reshape(batch, num_chunks, chunk, heads, head_dim), 1, 0)
    step = jax.checkpoint(attend)
    _, output = jax.lax.scan(lambda _, chunk_inputs: (None, step(*chunk_inputs)), None, (query_chunks, *spans))
    return jnp.moveaxis(output, 0, 1).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :q_len]
