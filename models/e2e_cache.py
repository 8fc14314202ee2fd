"""TTT-E2E reading from a cache: a prompt, then any number of tokens, in memory that does not grow with the context.

The suffix's cache is `{"reading": the SuffixReader state at the last chunk boundary whose inner
step has been taken, "pending": the chunk read since}`; pending holds the suffix inputs `x`
[batch, chunk, embed] and token `ids` [batch, chunk] of its first `count` tokens (0 ... chunk). A
chunk's inner step needs the token after its last one (its last target), so a full pending chunk
is stepped when the next token arrives.

New tokens are read chunk by chunk as in training: appended to the pending chunk, they fill chunks
starting at the boundary; every chunk whose last target is known is scored and stepped
(`SuffixReader.step`), and the last, incomplete one (1 ... chunk tokens) is read with the fast
weights of its boundary (`SuffixReader.forward`) and becomes the new pending chunk. So a prompt
costs what the training forward costs, and a decoded token costs one pass over its chunk.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ttt.context import DEFAULT, Context
from ttt.models.e2e import SuffixReader


def initial_suffix_cache(model, batch: int) -> dict:
    """The suffix cache of the LM `model` before any token: fast weights at the model's values, nothing pending."""
    config = model.config
    reader = SuffixReader(model, DEFAULT)
    chunk = config.e2e.chunk_size
    pending = {"x": jnp.zeros((batch, chunk, config.hidden_size), config.dtype),
               "ids": jnp.zeros((batch, chunk), jnp.int32), "count": jnp.zeros((), jnp.int32)}
    return {"reading": reader.initial_state(batch), "pending": pending}


def suffix_cache_axes(model) -> dict:
    """Logical axis names (a `PartitionSpec` per array) of the suffix cache of the LM `model`."""
    pending = {"x": P("batch", None, "embed"), "ids": P("batch", None), "count": P()}
    return {"reading": SuffixReader(model, DEFAULT).state_axes(), "pending": pending}


def extend_suffix(model, x: jax.Array, ids: jax.Array, cache: dict | None, context: Context) -> tuple[jax.Array, dict]:
    """The suffix of the LM `model` reads x [batch, seq, embed] (the prefix's output for `ids` [batch, seq])
    after `cache` (None: nothing) -> (final-normed hidden [batch, seq, embed], the suffix cache after)."""
    reader = SuffixReader(model, context)
    chunk = reader.config.e2e.chunk_size
    batch, seq, _ = x.shape
    if cache is None:
        cache = initial_suffix_cache(model, batch)
    pending, count = cache["pending"], cache["pending"]["count"]
    # The pending chunk then the new tokens, from the boundary: `total` tokens in `num_chunks` chunks
    # (enough for any count), of which the first `stepped` have their last target.
    num_chunks = -(-(chunk + seq) // chunk)
    length = num_chunks * chunk
    extra = ((0, 0), (0, length - chunk))
    buffer_x = jax.lax.dynamic_update_slice_in_dim(jnp.pad(pending["x"], extra + ((0, 0),)),
                                                   x.astype(pending["x"].dtype), count, axis=1)
    buffer_ids = jax.lax.dynamic_update_slice_in_dim(jnp.pad(pending["ids"], extra), ids, count, axis=1)
    total = count + seq
    stepped = (total - 1) // chunk
    known = jnp.arange(length) < total - 1  # positions whose next token is in the buffer
    targets = jnp.where(known, jnp.pad(buffer_ids[:, 1:], ((0, 0), (0, 1))), -1)
    to_chunks = lambda a: a.reshape(batch, num_chunks, chunk, *a.shape[2:]).swapaxes(0, 1)

    def read_chunk(state, inputs):
        index, chunk_x, chunk_targets = inputs

        def step(state):
            state, hidden, _ = reader.step(state, chunk_x, chunk_targets)
            return state, hidden

        forward = lambda state: (state, reader.forward(state, chunk_x)[0])
        hidden = jax.eval_shape(forward, state)[1]
        skip = lambda state: (state, jnp.zeros(hidden.shape, hidden.dtype))
        # Step a chunk whose last target is known, read the incomplete one, skip the empty ones after it.
        branch = jnp.where(index < stepped, 0, jnp.where(index * chunk < total, 1, 2))
        return jax.lax.switch(branch, (step, forward, skip), state)

    reading, hidden = jax.lax.scan(read_chunk, cache["reading"],
                                   (jnp.arange(num_chunks), to_chunks(buffer_x), to_chunks(targets)))
    hidden = hidden.swapaxes(0, 1).reshape(batch, length, -1)
    start = stepped * chunk
    pending = {"x": jax.lax.dynamic_slice_in_dim(buffer_x, start, chunk, axis=1),
               "ids": jax.lax.dynamic_slice_in_dim(buffer_ids, start, chunk, axis=1), "count": total - start}
    return jax.lax.dynamic_slice_in_dim(hidden, count, seq, axis=1), {"reading": reading, "pending": pending}
