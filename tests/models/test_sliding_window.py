"""Blockwise sliding-window attention against a float64 loop and, for gradients, dense masked attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt.models.sliding_window import sliding_window_attention

HEADS, HEAD_DIM = 4, 8
attend = jax.jit(sliding_window_attention, static_argnums=3, static_argnames=("block_size", "chunk_size"))


def reference(query, key, value, window, key_valid=None):
    """One query at a time in float64; a query with no valid key in its window gives 0.

    query: [batch, q_len, heads, d], key/value: [batch, kv_len, kv_heads, d], key_valid: [batch, kv_len].
    """
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, q_len, heads, dim = query.shape
    kv_len = key.shape[1]
    valid = np.ones((batch, kv_len), bool) if key_valid is None else np.asarray(key_valid)
    group = heads // key.shape[2]
    output = np.zeros_like(query)
    for b in range(batch):
        for i in range(q_len):
            position = kv_len - q_len + i
            seen = [s for s in range(max(0, position - window + 1), position + 1) if valid[b, s]]
            for h in range(heads):
                if not seen:
                    continue
                scores = np.array([query[b, i, h] @ key[b, s, h // group] for s in seen]) / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                output[b, i, h] = sum(w * value[b, s, h // group] for w, s in zip(weights, seen))
    return output


def inputs(seq, kv_heads, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, seq, HEADS, HEAD_DIM))
    key, value = (rng.normal(size=(batch, seq, kv_heads, HEAD_DIM)) for _ in range(2))
    return tuple(jnp.asarray(a, jnp.float32) for a in (query, key, value))


def dense(query, key, value, window, key_valid=None):
    """The quadratic formulation: jax's attention with a [batch, 1, q_len, kv_len] mask."""
    q_len, kv_len = query.shape[1], key.shape[1]
    distance = (kv_len - q_len + np.arange(q_len))[:, None] - np.arange(kv_len)[None, :]
    mask = jnp.asarray((distance >= 0) & (distance < window))[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return jax.nn.dot_product_attention(query, key, value, mask=mask)


# (seq, window, block_size, chunk_size): shorter than the window, equal, not a multiple of the
# block, a block smaller than the window, and long enough for the scan over chunks with padding.
LENGTHS = [(5, 8, None, 1024), (8, 8, None, 1024), (37, 8, 8, 1024), (45, 16, 4, 1024), (203, 8, 8, 32)]


@pytest.mark.parametrize("seq,window,block_size,chunk_size", LENGTHS)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_float64_loop(seq, window, block_size, chunk_size, kv_heads):
    query, key, value = inputs(seq, kv_heads)
    output = attend(query, key, value, window, block_size=block_size, chunk_size=chunk_size)
    assert output.shape == query.shape and output.dtype == query.dtype
    np.testing.assert_allclose(output, reference(query, key, value, window), atol=2e-5)


@pytest.mark.parametrize("chunk_size", [1024, 16])
def test_continuation_from_cache_with_missing_keys(chunk_size):
    """Queries after a cache of window - 1 keys, some not yet written (holes at the start),
    one sequence with no cache at all; equals the loop, and the last rows of a full call."""
    window, cached, q_len = 8, 7, 40
    query, key, value = inputs(cached + q_len, kv_heads=2, seed=1)
    key_valid = np.ones((2, cached + q_len), bool)
    key_valid[0, :3] = False  # cache holds 4 of 7 entries
    key_valid[1, :cached] = False  # empty cache
    key_valid = jnp.asarray(key_valid)
    output = attend(query[:, cached:], key, value, window, key_valid=key_valid, block_size=8, chunk_size=chunk_size)
    np.testing.assert_allclose(output, reference(query[:, cached:], key, value, window, key_valid), atol=2e-5)
    full = attend(query, key, value, window, key_valid=key_valid, block_size=8, chunk_size=chunk_size)
    np.testing.assert_allclose(output, full[:, cached:], atol=1e-6)


def test_one_query_after_a_partly_filled_cache():
    """The decoding shape: one query, window - 1 cached keys before it, some not yet written."""
    window = 8
    query, key, value = inputs(window, kv_heads=2, seed=3)
    key_valid = jnp.asarray(np.arange(window)[None, :] >= np.array([[5], [0]]))
    output = attend(query[:, -1:], key, value, window, key_valid=key_valid)
    np.testing.assert_allclose(output, reference(query[:, -1:], key, value, window, key_valid), atol=2e-5)


def test_query_without_valid_keys_gives_zero_and_finite_gradients():
    window = 4
    query, key, value = inputs(10, kv_heads=2)
    key_valid = jnp.asarray(np.arange(10)[None, :] >= np.array([[2], [10]]))  # row 1: no key at all
    output = attend(query, key, value, window, key_valid=key_valid, block_size=4)
    np.testing.assert_allclose(output, reference(query, key, value, window, key_valid), atol=2e-5)
    assert np.all(np.asarray(output[1]) == 0) and np.all(np.asarray(output[0, :2]) == 0)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(attend(*a, window, key_valid=key_valid, block_size=4) ** 2),
                             argnums=(0, 1, 2)))(query, key, value)
    assert all(np.all(np.isfinite(g)) for g in grads)


def first_and_second_order(attention):
    """A jitted function of (query, key, value) -> (gradient of a scalar loss of `attention`,
    gradient of that gradient's squared norm, i.e. a Hessian-vector product), each for q, k, v."""
    def loss(query, key, value):
        output = attention(query, key, value)
        return jnp.sum(jnp.sin(output) * jnp.arange(output.size).reshape(output.shape) / output.size)

    gradient = jax.grad(loss, argnums=(0, 1, 2))

    def gradient_norm(query, key, value):
        return sum(jnp.sum(g ** 2) for g in gradient(query, key, value))

    return jax.jit(lambda *a: (gradient(*a), jax.grad(gradient_norm, argnums=(0, 1, 2))(*a)))


def test_first_and_second_order_gradients_match_dense():
    """Through the scan over chunks, after a cache with holes (as in TTT-E2E's chunked reading)."""
    window, cached, q_len = 6, 5, 37
    query, key, value = inputs(cached + q_len, kv_heads=2, seed=2)
    query = query[:, cached:]
    # Holes only in the cache, so that every query has a key (dense attention averages empty rows).
    key_valid = jnp.asarray(np.arange(cached + q_len)[None, :] >= np.array([[0], [2]]))
    ours = first_and_second_order(lambda q, k, v: sliding_window_attention(
        q, k, v, window, key_valid=key_valid, block_size=4, chunk_size=16))(query, key, value)
    theirs = first_and_second_order(lambda q, k, v: dense(q, k, v, window, key_valid))(query, key, value)
    for order, mine, expected in zip((1, 2), ours, theirs):
        for name, got, want in zip("qkv", mine, expected):
            np.testing.assert_allclose(got, want, atol=5e-5 * order, rtol=1e-4, err_msg=f"order {order}, d/d{name}")


def test_temporaries_grow_linearly_with_length():
    """XLA's planned temporaries of forward and backward at 4x the length: about 4x, not 16x."""
    def temporaries(seq):
        query = jax.ShapeDtypeStruct((1, seq, HEADS, HEAD_DIM), jnp.float32)
        forward = lambda q, k, v: sliding_window_attention(q, k, v, 16)
        backward = jax.grad(lambda *a: jnp.sum(forward(*a)), argnums=(0, 1, 2))
        return np.array([jax.jit(fn).lower(query, query, query).compile().memory_analysis().temp_size_in_bytes
                         for fn in (forward, backward)])

    ratio = temporaries(16384) / temporaries(4096)
    assert np.all(ratio < 4.5), ratio


def test_bfloat16_inputs_give_bfloat16_output_close_to_float32():
    query, key, value = inputs(20, kv_heads=4)
    low = attend(*(a.astype(jnp.bfloat16) for a in (query, key, value)), 8)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), reference(query, key, value, 8), atol=5e-2)


def test_rejects_bad_shapes():
    query, key, value = inputs(8, kv_heads=4)
    with pytest.raises(ValueError, match="kv_len 4 must be >= q_len 8"):
        sliding_window_attention(query, key[:, :4], value[:, :4], 4)
    with pytest.raises(ValueError, match="heads 4 must be a multiple of kv_heads 3"):
        sliding_window_attention(query, key[:, :, :3], value[:, :, :3], 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window_attention(query, key, value, 0)
