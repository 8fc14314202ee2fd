"""Sampling and generation: read the prompt once, then a jitted `lax.scan` of one-token reads."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.models.inputs import check_token_ids
from ttt.models.lm import LM


def sample(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Draws one token per row.

    Args:
      logits: [batch, vocab].
      rng: a PRNG key.
      temperature: logits are divided by it; 0 means greedy (argmax, rng unused).
      top_k: keep only the k most likely tokens (ties with the k-th are kept too).
      top_p: nucleus sampling: keep the most likely tokens until their probability mass reaches
        top_p (the token that crosses top_p is kept).
    Returns:
      int32 [batch].
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; expected >= 0")
    if top_k is not None and not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k}; expected 1 <= top_k <= vocab={logits.shape[-1]}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}; expected 0 < top_p <= 1")
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:
        descending = -jnp.sort(-logits, axis=-1)
        probabilities = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
        # The smallest logit still kept: every token whose preceding mass is below top_p survives.
        cutoff = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def _generate_new_tokens(model: LM, prompt_ids: jax.Array, rng: jax.Array, cache, *, max_new_tokens: int,
                         temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, cache = model.extend(prompt_ids, cache)
    rng, key = jax.random.split(rng)
    first = draw(logits[:, -1, :], key)

    @nnx.scan(in_axes=(None, nnx.Carry), out_axes=(nnx.Carry, 0), length=max_new_tokens - 1)
    def decode(model: LM, carry):
        token, cache, rng = carry
        logits, cache = model.extend(token[:, None], cache)
        rng, key = jax.random.split(rng)
        return (draw(logits[:, 0], key), cache, rng), token

    (last, _, _), tokens = decode(model, (first, cache, rng))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model: LM, prompt_ids: jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             cache=None) -> jax.Array:
    """Continues every prompt by `max_new_tokens` sampled tokens.

    The prompt is read once with `model.extend`; the new tokens come from a `lax.scan` of one-token
    `model.extend` calls under one `nnx.jit` (compiled once per shape and sampling setting).

    Args:
      model: the LM.
      prompt_ids: int32 [batch, prompt] (all prompts of one length, >= 1).
      max_new_tokens: tokens to add (>= 0).
      temperature, top_k, top_p: see `sample`; temperature 0 is greedy decoding.
      rng: PRNG key for sampling; defaults to `jax.random.key(0)`.
      cache: read the prompt after what this cache holds (`LM.extend`'s cache, e.g. made from a
        memory of earlier documents) instead of from the initial state.
    Returns:
      int32 [batch, prompt + max_new_tokens]: the prompt followed by the new tokens.
    """
    check_token_ids(prompt_ids, model.config.vocab_size, name="prompt_ids")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids of shape {prompt_ids.shape}; expected [batch, prompt] with prompt >= 1")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 0")
    config = model.config
    total = prompt_ids.shape[1] + max_new_tokens
    if "attention" in config.mixers and total > config.max_seq_len:
        raise ValueError(f"prompt of {prompt_ids.shape[1]} + {max_new_tokens} new tokens exceeds "
                         f"max_seq_len={config.max_seq_len} of the full-attention KV cache")
    if max_new_tokens == 0:
        return prompt_ids
    rng = jax.random.key(0) if rng is None else rng
    new_tokens = _generate_new_tokens(model, prompt_ids, rng, cache, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p)
    return jnp.concatenate([prompt_ids, new_tokens], axis=1)
