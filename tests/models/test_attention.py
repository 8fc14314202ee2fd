"""Attention math against a float64 numpy reference; the cached path against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt.configs import AttentionConfig, ModelConfig
from ttt.models.attention import Attention, causal_attention
from ttt.rope import rotary_embedding


def reference_attention(query, key, value, window):
    """Naive masked softmax per head in float64; key/value heads repeated for grouped queries.

    query: [batch, seq, heads, d], key/value: [batch, seq, kv_heads, d].
    """
    query, key, value = (np.asarray(a, np.float64) for a in (query, key, value))
    batch, seq, heads, dim = query.shape
    group = heads // key.shape[2]
    key, value = np.repeat(key, group, axis=2), np.repeat(value, group, axis=2)
    output = np.zeros_like(query)
    for t in range(seq):
        first = 0 if window is None else max(0, t - window + 1)
        scores = np.einsum("bhd,bshd->bhs", query[:, t], key[:, first:t + 1]) / np.sqrt(dim)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        output[:, t] = np.einsum("bhs,bshd->bhd", weights, value[:, first:t + 1])
    return output


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causal_attention_matches_reference(window, kv_heads):
    rng = np.random.default_rng(0)
    query = rng.normal(size=(2, 11, 4, 8)).astype(np.float32)
    key = rng.normal(size=(2, 11, kv_heads, 8)).astype(np.float32)
    value = rng.normal(size=(2, 11, kv_heads, 8)).astype(np.float32)
    output = causal_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value), window)
    np.testing.assert_allclose(output, reference_attention(query, key, value, window), atol=2e-5)


def test_rotary_embedding_is_a_rotation_by_relative_position():
    rng = np.random.default_rng(1)
    query = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    key = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(query_position, key_position):
        rotated_query = rotary_embedding(query, jnp.array([query_position]), 10000.0)
        rotated_key = rotary_embedding(key, jnp.array([key_position]), 10000.0)
        return float(jnp.sum(rotated_query * rotated_key))

    np.testing.assert_allclose(jnp.linalg.norm(rotary_embedding(query, jnp.array([7]), 10000.0)),
                               jnp.linalg.norm(query), rtol=1e-6)
    np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(query * key)), rtol=1e-6)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3


@pytest.mark.parametrize("window, qk_norm", [(None, False), (4, True)])
def test_attention_token_by_token_and_in_pieces_equals_full_forward(window, qk_norm):
    """Read 6 tokens, then 7 more one at a time (past the window: the ring buffer wraps around);
    separately read 3, then 4, then 6 tokens from the cache (pieces longer than the window)."""
    config = ModelConfig(vocab_size=16, hidden_size=32, num_layers=1, num_heads=4, mlp_hidden_size=32,
                         layer_pattern="swa" if window else "attention",
                         attention=AttentionConfig(num_kv_heads=2, sliding_window=window, qk_norm=qk_norm),
                         max_seq_len=16)
    attention = Attention(config, window=window, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 13, 32))
    extend = nnx.jit(lambda module, x, state: module.extend(x, state))
    full = nnx.jit(lambda module, x: module(x))(attention, x)
    prefix, state = extend(attention, x[:, :6], None)
    np.testing.assert_allclose(prefix, full[:, :6], atol=1e-5)
    assert state["key"].shape == (2, window or 16, 2, 8)
    for t in range(6, 13):
        y_t, state = extend(attention, x[:, t:t + 1], state)
        np.testing.assert_allclose(y_t[:, 0], full[:, t], atol=1e-5, err_msg=f"position {t}")
    assert int(state["position"]) == 13
    pieces, state = [], attention.init_state(2)
    for start, end in [(0, 3), (3, 7), (7, 13)]:
        y, state = extend(attention, x[:, start:end], state)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)
    y_t, _ = extend(attention, x[:, :1], state)  # the cache after the pieces continues like the whole
    np.testing.assert_allclose(y_t[:, 0], extend(attention, x[:, :1], extend(attention, x, None)[1])[0][:, 0],
                               atol=1e-5)


def test_prefill_longer_than_full_attention_cache_is_rejected():
    config = ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, mlp_hidden_size=16, max_seq_len=4)
    attention = nnx.eval_shape(lambda: Attention(config, window=None, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_seq_len=4"):
        attention.extend(jnp.zeros((1, 5, 16)))
