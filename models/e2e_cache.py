"""TTT-E2E reading from a cache: a prompt, then any number of tokens, in memory that does not grow with the context.

The suffix's cache is `{"reading": the SuffixReader state at the last chunk boundary whose inner
step has been taken, "pending": the chunk read since}`; pending holds the suffix inputs `x`
[batch, chunk, embed] and token `ids` [batch, chunk] of its first `count` tokens (1 ... chunk). A
chunk's inner step needs the token after its last one (its last target), so a full pending chunk
is stepped when the next token arrives, before that token is read. Each token is read by running
the suffix over the pending chunk from the boundary state (exact, and O(chunk) per token whatever
the context).
"""

import jax
import jax.numpy as jnp

from ttt.context import Context
from ttt.models.e2e import SuffixReader


def extend_suffix(model, x: jax.Array, ids: jax.Array, cache: dict | None, context: Context) -> tuple[jax.Array, dict]:
    """The suffix of the LM `model` reads x [batch, seq, embed] (the prefix's output for `ids` [batch, seq])
    after `cache` (None: nothing) -> (final-normed hidden [batch, seq, embed], the suffix cache after)."""
    reader = SuffixReader(model, context)
    if cache is None:
        return _prefill(reader, x, ids)

    def read_token(cache, inputs):
        x_t, id_t = inputs
        cache = jax.lax.cond(cache["pending"]["count"] == reader.config.e2e.chunk_size,
                             lambda cache: _step_pending(reader, cache, id_t), lambda cache: cache, cache)
        pending = cache["pending"]
        count = pending["count"]
        pending = {"x": jax.lax.dynamic_update_slice_in_dim(pending["x"], x_t[:, None].astype(pending["x"].dtype),
                                                            count, axis=1),
                   "ids": jax.lax.dynamic_update_slice_in_dim(pending["ids"], id_t[:, None], count, axis=1),
                   "count": count + 1}
        hidden, _ = reader.forward(cache["reading"], pending["x"])
        return {"reading": cache["reading"], "pending": pending}, jax.lax.dynamic_index_in_dim(hidden, count, 1, False)

    cache, hidden = jax.lax.scan(read_token, cache, (x.swapaxes(0, 1), ids.swapaxes(0, 1)))
    return hidden.swapaxes(0, 1), cache


def _prefill(reader: SuffixReader, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, dict]:
    """From the start: every chunk whose last target is in `ids` is read and stepped as in training; the
    rest (1 ... chunk tokens) becomes the pending chunk."""
    chunk = reader.config.e2e.chunk_size
    batch, seq, embed = x.shape
    stepped = (seq - 1) // chunk * chunk
    state, hidden = reader.initial_state(batch), []
    if stepped:
        chunks = lambda a: a.reshape(batch, stepped // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)

        def chunk_step(state, inputs):
            state, chunk_hidden, _ = reader.step(state, *inputs)
            return state, chunk_hidden

        state, chunk_hidden = jax.lax.scan(chunk_step, state, (chunks(x[:, :stepped]), chunks(ids[:, 1:stepped + 1])))
        hidden.append(chunk_hidden.swapaxes(0, 1).reshape(batch, stepped, embed))
    padding = ((0, 0), (0, stepped + chunk - seq))
    pending = {"x": jnp.pad(x[:, stepped:], padding + ((0, 0),)), "ids": jnp.pad(ids[:, stepped:], padding),
               "count": jnp.asarray(seq - stepped, jnp.int32)}
    pending_hidden, _ = reader.forward(state, pending["x"])
    hidden.append(pending_hidden[:, :seq - stepped])
    return jnp.concatenate(hidden, axis=1), {"reading": state, "pending": pending}


def _step_pending(reader: SuffixReader, cache: dict, next_id: jax.Array) -> dict:
    """The full pending chunk's inner step, its last target `next_id` [batch]; the pending chunk starts anew."""
    pending = cache["pending"]
    targets = jnp.concatenate([pending["ids"][:, 1:], next_id[:, None]], axis=1)
    reading, _, _ = reader.step(cache["reading"], pending["x"], targets)
    return {"reading": reading, "pending": dict(pending, count=jnp.zeros_like(pending["count"]))}
