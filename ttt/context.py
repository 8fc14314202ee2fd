"""`Context`: what one call of a model's forward knows besides its inputs and state.

One object passed from the LM down to every mixer, so that a new per-call input is one field here
instead of an argument in every signature. It is a pytree: its fields may be traced (a new value
does not recompile a jitted step).
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-call inputs of a forward pass.

    Attributes:
      inner_lr_scale: scalar multiplying every TTT layer's inner learning rate; training's inner-LR
        warmup sets it below 1 for the first steps, everything else leaves it at 1 (it scales TTT-E2E's
        inner learning rate too). Attention ignores it.
      targets: int [batch, seq], the token each position must predict (negative: none known), for
        inner losses that need the next token (TTT-E2E); None when the caller has no targets.
      document_starts: bool [batch, seq] or None (the default: no boundaries), True at the first token
        of every document after the first in a packed row (ttt/documents.py): every mixer then
        computes, for each document, what it computes on that document alone. TTT layers restart
        from their initial fast weights there, so a start must fall where a TTT mini-batch begins;
        attention and convolutions read nothing across a start (attention only from an empty cache).
        TTT-E2E models refuse it.
    """

    inner_lr_scale: jax.Array | float = 1.0
    targets: jax.Array | None = None
    document_starts: jax.Array | None = None


jax.tree_util.register_dataclass(Context, data_fields=["inner_lr_scale", "targets", "document_starts"], meta_fields=[])

DEFAULT = Context()
