"""Checks of the token ids given to a model's Python entry points."""

import jax
import jax.numpy as jnp
import numpy as np


def check_token_ids(ids, vocab_size: int, *, name: str = "ids") -> None:
    """Raises ValueError unless `ids` is an integer [batch, seq] array with values in [0, vocab_size).

    The values are checked only when they are concrete (eager calls, numpy inputs); under `jit` they
    are traced and only the rank and dtype are checked: an id outside the vocabulary then gives a NaN
    or a wrapped-around embedding instead of an error.
    """
    shape, dtype = jnp.shape(ids), jnp.result_type(ids)
    if len(shape) != 2:
        raise ValueError(f"{name} has shape {shape}; expected [batch, seq] token ids")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} has dtype {dtype}; expected integer token ids")
    if 0 in shape or isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True):
        return
    values = np.asarray(ids)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}; expected ids in [0, {vocab_size}) for this model's vocabulary")
