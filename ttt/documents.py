"""Document boundaries inside packed rows: which document each position belongs to, and the check that
a TTT layer can restart at every start.

A packed row holds several documents; `document_starts` (bool [batch, seq], `Context.document_starts`)
is True at the first token of each document after the first. For every document of the row, a model
that honours it computes what it computes on that document alone: attention and convolutions read
only positions of the same document (`segment_ids`), and a TTT layer restarts from its initial fast
weights, which it can do only where a mini-batch begins (`check_document_starts`): an exact restart
inside a mini-batch would need two sets of start weights for its gradients (docs/MATH.md).
"""

import jax
import jax.numpy as jnp
import numpy as np


def segment_ids(document_starts: jax.Array) -> jax.Array:
    """bool [batch, seq] -> int32 [batch, seq]: how many starts lie at or before each position (0: the
    row's first document, or whatever a carried state read before it)."""
    return jnp.cumsum(document_starts, axis=1, dtype=jnp.int32)


def check_document_starts(document_starts, shape: tuple[int, int], mini_batch_size: int | None = None,
                          position=0) -> None:
    """Raises ValueError unless `document_starts` is bool `shape` ([batch, seq]) and, when it and
    `position` are concrete and `mini_batch_size` is given, every start falls where a TTT mini-batch
    begins: at (position + t) % mini_batch_size == 0, `position` the tokens already read into the
    current mini-batch. Traced values are not checked: a TTT layer then restarts only at the starts
    that fall on a boundary (and attention and convolutions still stop at every start).
    """
    if tuple(jnp.shape(document_starts)) != tuple(shape) or jnp.result_type(document_starts) != jnp.bool_:
        raise ValueError(f"document_starts of shape {jnp.shape(document_starts)} and dtype "
                         f"{jnp.result_type(document_starts)}; expected bool {tuple(shape)} ([batch, seq])")
    if mini_batch_size is None:
        return
    try:
        starts, position = np.asarray(document_starts), int(position)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerIntegerConversionError):
        return
    rows, columns = np.nonzero(starts & ((position + np.arange(shape[1])) % mini_batch_size != 0))
    if rows.size:
        row, column = int(rows[0]), int(columns[0])
        raise ValueError(
            f"document_starts[{row}, {column}] is a document start {(position + column) % mini_batch_size} tokens "
            f"into a TTT mini-batch of {mini_batch_size} ({rows.size} such starts); a TTT layer restarts only where "
            f"a mini-batch begins: pad every document to a multiple of {mini_batch_size} tokens")
