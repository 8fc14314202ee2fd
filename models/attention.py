"""Causal self-attention, full or sliding-window, with RoPE, grouped-query heads, optional QK-norm.

Decoding keeps a fixed-size KV cache: full attention preallocates `max_seq_len` entries; a
sliding-window layer keeps a ring buffer of `window` entries where the token at position p lives
in slot `p % window`. Keys are stored after RoPE (absolute positions), so the order of the slots
does not matter to the softmax.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt.configs import ModelConfig
from ttt.models.layers import normal_init, rms_norm
from ttt.rope import rotary_embedding
from ttt.sharding import constrain


def causal_attention(query: jax.Array, key: jax.Array, value: jax.Array, window: int | None) -> jax.Array:
    """Softmax attention of every position to itself and the positions before it.

    Args:
      query: [batch, seq, heads, head_dim].
      key, value: [batch, seq, kv_heads, head_dim]; heads is a multiple of kv_heads (query head h
        reads key/value head h // (heads // kv_heads)).
      window: when set, position t attends only to positions t - window + 1 ... t.
    Returns:
      [batch, seq, heads, head_dim].
    """
    local_window = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(query, key, value, is_causal=True, local_window_size=local_window)


def cached_attention(query: jax.Array, key_cache: jax.Array, value_cache: jax.Array, filled: jax.Array) -> jax.Array:
    """One query token per sequence against a KV cache.

    Args:
      query: [batch, 1, heads, head_dim].
      key_cache, value_cache: [batch, slots, kv_heads, head_dim].
      filled: [slots] bool, the slots holding a key the query may read.
    Returns:
      [batch, 1, heads, head_dim].
    """
    mask = filled[None, None, None, :]
    return jax.nn.dot_product_attention(query, key_cache, value_cache, mask=mask)


class Attention(nnx.Module):
    """Multi-head causal self-attention; a sequence mixer with the TTT layer's interface
    (`__call__`, `prefill`, `init_state`, `step`).

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
        if config.qk_norm:
            self.query_norm = rms_norm(config, head_dim, "head_dim", rngs=rngs)
            self.key_norm = rms_norm(config, head_dim, "head_dim", rngs=rngs)
        else:
            self.query_norm = self.key_norm = None

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [batch, seq, embed], positions: [seq] -> query [b, s, heads, d], key/value [b, s, kv_heads, d]."""
        query, key, value = self.query(x), self.key(x), self.value(x)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        query = rotary_embedding(query, positions, self.config.rope_theta)
        key = rotary_embedding(key, positions, self.config.rope_theta)
        query = constrain(query, ("batch", "seq", "heads", "head_dim"))
        key = constrain(key, ("batch", "seq", "kv_heads", "head_dim"))
        value = constrain(value, ("batch", "seq", "kv_heads", "head_dim"))
        return query, key, value

    def _output(self, attended: jax.Array) -> jax.Array:
        attended = constrain(attended, ("batch", "seq", "heads", "head_dim"))
        return constrain(self.out(attended), ("batch", "seq", "embed"))

    def __call__(self, x: jax.Array, inner_lr_scale: jax.Array | float = 1.0) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed].

        Attention learns nothing at test time; `inner_lr_scale` is accepted for the common mixer
        interface and has no effect.
        """
        del inner_lr_scale
        query, key, value = self._project(x, jnp.arange(x.shape[1]))
        return self._output(causal_attention(query, key, value, self.window))

    def init_state(self, batch: int) -> dict[str, jax.Array]:
        """Empty KV cache: key/value [batch, cache_size, kv_heads, head_dim], position (tokens read) 0."""
        shape = (batch, self.cache_size, self.config.kv_heads, self.config.head_dim)
        return {"key": jnp.zeros(shape, self.config.dtype), "value": jnp.zeros(shape, self.config.dtype),
                "position": jnp.zeros((), jnp.int32)}

    def prefill(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [batch, seq, embed] -> (the same output as `__call__`, the KV cache after reading x)."""
        batch, seq = x.shape[:2]
        if self.window is None and seq > self.cache_size:
            raise ValueError(f"prefill of {seq} tokens exceeds max_seq_len={self.cache_size} of full attention")
        query, key, value = self._project(x, jnp.arange(seq))
        output = self._output(causal_attention(query, key, value, self.window))
        # Only the last cache_size tokens survive; token p goes to slot p % cache_size.
        kept = np.arange(max(0, seq - self.cache_size), seq)
        state = self.init_state(batch)
        state = {"key": state["key"].at[:, kept % self.cache_size].set(key[:, kept].astype(self.config.dtype)),
                 "value": state["value"].at[:, kept % self.cache_size].set(value[:, kept].astype(self.config.dtype)),
                 "position": jnp.asarray(seq, jnp.int32)}
        return output, state

    def step(self, x: jax.Array, state: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One token per sequence. x: [batch, embed] -> ([batch, embed], state after it).

        A full-attention cache holds `max_seq_len` tokens; stepping past that overwrites the
        oldest entries (callers such as `generate` check the length before decoding).
        """
        position = state["position"]
        query, key, value = self._project(x[:, None, :], position[None])
        slot = position % self.cache_size
        key_cache = jax.lax.dynamic_update_slice_in_dim(state["key"], key.astype(state["key"].dtype), slot, axis=1)
        value_cache = jax.lax.dynamic_update_slice_in_dim(state["value"], value.astype(state["value"].dtype), slot,
                                                          axis=1)
        # Slot s has been written once position >= s; in a ring buffer that holds all slots after wrap-around.
        filled = jnp.arange(self.cache_size) <= position
        attended = cached_attention(query, key_cache.astype(query.dtype), value_cache.astype(query.dtype), filled)
        output = self._output(attended)[:, 0, :]
        return output, {"key": key_cache, "value": value_cache, "position": position + 1}
