"""Causal self-attention, full or sliding-window, with RoPE, grouped-query heads, optional QK-norm.

The state is a KV cache of fixed size: a ring buffer of `window` slots for a sliding-window layer
and of `max_seq_len` slots for full attention, where the token at position p lives in slot
`p % slots`. Keys are stored after RoPE (absolute positions), so the order of the slots does not
matter to the softmax. Full attention is exact as long as no more than `max_seq_len` tokens are read.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt.configs import ModelConfig
from ttt.context import DEFAULT, Context
from ttt.documents import segment_ids
from ttt.models.layers import normal_init, rms_norm
from ttt.models.sliding_window import sliding_window_attention
from ttt.rope import rotary_embedding
from ttt.sharding import constrain


def causal_attention(query: jax.Array, key: jax.Array, value: jax.Array, window: int | None,
                     document_starts: jax.Array | None = None) -> jax.Array:
    """Softmax attention of every position to itself and the positions before it.

    Full attention is the quadratic baseline; a sliding window runs blockwise, in time and memory
    linear in the sequence (models/sliding_window.py).

    Args:
      query: [batch, seq, heads, head_dim].
      key, value: [batch, seq, kv_heads, head_dim]; heads is a multiple of kv_heads (query head h
        reads key/value head h // (heads // kv_heads)).
      window: when set, position t attends only to positions t - window + 1 ... t.
      document_starts: bool [batch, seq] or None (ttt/documents.py): no position attends to one
        before the latest start at or before it.
    Returns:
      [batch, seq, heads, head_dim].
    """
    segments = None if document_starts is None else segment_ids(document_starts)
    if window is None:
        mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
        return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=True)
    return sliding_window_attention(query, key, value, window, segment_ids=segments)


def attention_after_cache(query: jax.Array, key: jax.Array, value: jax.Array, key_positions: jax.Array,
                          query_positions: jax.Array, window: int) -> jax.Array:
    """Queries against keys given with their positions (negative: an empty cache slot); dense.

    Args:
      query: [batch, q_len, heads, head_dim]; key, value: [batch, kv_len, kv_heads, head_dim].
      key_positions: int [kv_len]; query_positions: int [q_len].
      window: a query at position p reads the keys at positions p - window + 1 ... p.
    Returns:
      [batch, q_len, heads, head_dim].
    """
    distance = query_positions[:, None] - key_positions[None, :]
    mask = (key_positions[None, :] >= 0) & (distance >= 0) & (distance < window)
    return jax.nn.dot_product_attention(query, key, value, mask=mask[None, None])


class Attention(nnx.Module):
    """Multi-head causal self-attention; a sequence mixer with the TTT layer's interface
    (`extend`, `init_state`, `state_axes`, `__call__`).

    Args:
      config: model config (sizes, RoPE base, QK-norm, dtypes, `max_seq_len`).
      window: None for full attention, else the sliding-window size.
    """

    def __init__(self, config: ModelConfig, *, window: int | None, rngs: nnx.Rngs):
        width, heads, kv_heads, head_dim = config.hidden_size, config.num_heads, config.kv_heads, config.head_dim
        einsum = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.config = config
        self.window = window
        self.cache_size = config.max_seq_len if window is None else window
        self.query = nnx.Einsum("btd,dhk->bthk", (width, heads, head_dim),
                                kernel_init=normal_init(config, ("embed", "heads", "head_dim")), **einsum)
        self.key = nnx.Einsum("btd,dhk->bthk", (width, kv_heads, head_dim),
                              kernel_init=normal_init(config, ("embed", "kv_heads", "head_dim")), **einsum)
        self.value = nnx.Einsum("btd,dhk->bthk", (width, kv_heads, head_dim),
                                kernel_init=normal_init(config, ("embed", "kv_heads", "head_dim")), **einsum)
        self.out = nnx.Einsum("bthk,hkd->btd", (heads, head_dim, width),
                              kernel_init=normal_init(config, ("heads", "head_dim", "embed")), **einsum)
        if config.attention.qk_norm:
            self.query_norm = rms_norm(config, head_dim, "head_dim", rngs=rngs)
            self.key_norm = rms_norm(config, head_dim, "head_dim", rngs=rngs)
        else:
            self.query_norm = self.key_norm = None

    def __call__(self, x: jax.Array, context: Context = DEFAULT) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed], from an empty cache."""
        return self.extend(x, None, context)[0]

    def extend(self, x: jax.Array, state: dict | None = None, context: Context = DEFAULT) -> tuple[jax.Array, dict]:
        """Reads x [batch, seq, embed] after the tokens in the cache `state` (None: empty) ->
        (y [batch, seq, embed], cache after x). Attention learns nothing at test time: of `context` it
        reads only `document_starts`, and only from an empty cache (a cache does not record where its
        keys' documents start, so reading from one with document starts is an error).

        From an empty cache, full attention reads at most `max_seq_len` tokens (a clear error); from a
        cache, positions past it overwrite the oldest slots (callers such as `generate` check lengths).
        """
        batch, seq = x.shape[:2]
        if state is None:
            if self.window is None and seq > self.cache_size:
                raise ValueError(f"{seq} tokens exceed max_seq_len={self.cache_size} of full attention")
            query, key, value = self._project(x, jnp.arange(seq))
            attended = causal_attention(query, key, value, self.window, context.document_starts)
            return self._output(attended), self._cache_of(key, value)
        if context.document_starts is not None:
            raise ValueError("attention reads document_starts only from an empty cache (state None): its cache does "
                             "not record where the documents of its keys start")
        position = state["position"]
        query, key, value = self._project(x, position + jnp.arange(seq))
        if seq == 1:
            return self._decode_one(query, key, value, state)
        # Previous keys in chronological order (positions position - slots ... position - 1), then x's.
        slots = self.cache_size
        previous = position - slots + jnp.arange(slots)
        ordered = lambda cache: jnp.take(cache, previous % slots, axis=1).astype(key.dtype)
        keys = jnp.concatenate([ordered(state["key"]), key], axis=1)
        values = jnp.concatenate([ordered(state["value"]), value], axis=1)
        if self.window is None:
            key_positions = jnp.concatenate([previous, position + jnp.arange(seq)])
            attended = attention_after_cache(query, keys, values, key_positions, position + jnp.arange(seq), slots)
        else:
            key_valid = jnp.concatenate([previous >= 0, jnp.ones((seq,), bool)])
            attended = sliding_window_attention(query, keys, values, self.window,
                                                key_valid=jnp.broadcast_to(key_valid, keys.shape[:2]))
        # The last `slots` keys become the cache, rolled so that position p sits in slot p % slots.
        ring = lambda a: jnp.roll(a[:, -slots:], (position + seq) % slots, axis=1).astype(self.config.dtype)
        return self._output(attended), {"key": ring(keys), "value": ring(values), "position": position + seq}

    def init_state(self, batch: int) -> dict:
        """Empty KV cache: key/value [batch, slots, kv_heads, head_dim], position (tokens read) 0."""
        shape = (batch, self.cache_size, self.config.kv_heads, self.config.head_dim)
        return {"key": jnp.zeros(shape, self.config.dtype), "value": jnp.zeros(shape, self.config.dtype),
                "position": np.zeros((), np.int32)}

    def state_axes(self) -> dict:
        """Logical axis names of every array of the cache."""
        kv = P("batch", None, "kv_heads", "head_dim")
        return {"key": kv, "value": kv, "position": P()}

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [batch, seq, embed], positions: [seq] -> query [b, s, heads, d], key/value [b, s, kv_heads, d]."""
        query, key, value = self.query(x), self.key(x), self.value(x)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        query = rotary_embedding(query, positions, self.config.rope_theta, self.config.rope_pairing)
        key = rotary_embedding(key, positions, self.config.rope_theta, self.config.rope_pairing)
        query = constrain(query, ("batch", "seq", "heads", "head_dim"))
        key = constrain(key, ("batch", "seq", "kv_heads", "head_dim"))
        value = constrain(value, ("batch", "seq", "kv_heads", "head_dim"))
        return query, key, value

    def _output(self, attended: jax.Array) -> jax.Array:
        attended = constrain(attended, ("batch", "seq", "heads", "head_dim"))
        return constrain(self.out(attended), ("batch", "seq", "embed"))

    def _cache_of(self, key: jax.Array, value: jax.Array) -> dict:
        """The cache after reading a whole sequence from empty: its last `slots` tokens, token p in slot p % slots."""
        batch, seq = key.shape[:2]
        kept = np.arange(max(0, seq - self.cache_size), seq)
        state = self.init_state(batch)
        return {"key": state["key"].at[:, kept % self.cache_size].set(key[:, kept].astype(self.config.dtype)),
                "value": state["value"].at[:, kept % self.cache_size].set(value[:, kept].astype(self.config.dtype)),
                "position": jnp.asarray(seq, jnp.int32)}

    def _decode_one(self, query, key, value, state):
        """One token per sequence: written into its slot, then attending to every filled slot."""
        position = state["position"]
        slot = position % self.cache_size
        key_cache = jax.lax.dynamic_update_slice_in_dim(state["key"], key.astype(state["key"].dtype), slot, axis=1)
        value_cache = jax.lax.dynamic_update_slice_in_dim(state["value"], value.astype(state["value"].dtype), slot,
                                                          axis=1)
        # Slot s has been written once position >= s; in a ring buffer that holds all slots after wrap-around.
        filled = jnp.arange(self.cache_size) <= position
        attended = jax.nn.dot_product_attention(query, key_cache.astype(query.dtype), value_cache.astype(query.dtype),
                                                mask=filled[None, None, None, :])
        return self._output(attended), {"key": key_cache, "value": value_cache, "position": position + 1}
