"""Checks of the token ids a model is given, for its Python entry points (eager calls, generation, data, evaluation).

An id outside `[0, vocab_size)` is never an error inside a compiled model: the embedding lookup
returns NaN for ids >= vocab_size and silently indexes from the end of the table for negative ids.
So ids are checked where their values are concrete, before they reach the model.
"""

import jax
import numpy as np


def check_token_ids(ids, vocab_size: int, *, name: str = "ids") -> None:
    """Raise ValueError unless `ids` is an integer [batch, seq] array of ids in [0, vocab_size).

    Args:
      ids: token ids, [batch, seq]: a numpy or jax array (or nested lists).
      vocab_size: the model's number of token ids.
      name: what `ids` is called in the message (e.g. "prompt_ids").

    Under `jit` (`ids` a tracer) and for arrays not fully addressable by this process, only the rank
    and the dtype are checked: the values are not known here, and an out-of-range id then gives NaN
    (>= vocab_size) or the embedding of another token (negative), without an error.
    """
    if not hasattr(ids, "dtype"):
        ids = np.asarray(ids)
    if len(ids.shape) != 2:
        raise ValueError(f"{name} of shape {tuple(ids.shape)}; expected [batch, seq] token ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} of dtype {ids.dtype}; expected integer token ids")
    if isinstance(ids, jax.core.Tracer) or (isinstance(ids, jax.Array) and not ids.is_fully_addressable):
        return
    values = np.asarray(ids)
    outside = (values < 0) | (values >= vocab_size)
    if outside.any():
        row, column = np.argwhere(outside)[0]
        raise ValueError(f"{name} holds {int(outside.sum())} token id(s) outside [0, {vocab_size}), the first "
                         f"{int(values[row, column])} at [{row}, {column}]; expected ids below the model's "
                         f"vocab_size={vocab_size}")
