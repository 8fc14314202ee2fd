"""Cutting a sequence into mini-batches, and the inner-optimizer coefficients of each.

Mini-batch GD with per-token learning rate eta_j and per-position scale s_i (docs/MATH.md):
the weights seen by position i of a mini-batch are

  theta_i = theta_n - sum_j coeff[i, j] * grad l(theta_n; k_j, v_j),   coeff[i, j] = s_i * eta_j * [j <= i]

and the next mini-batch starts from the weights of its last real token L:

  theta_{n+1} = theta_n - sum_j update[j] * grad l(theta_n; k_j, v_j),  update[j] = s_L * eta_j.

A sequence that is not a multiple of the mini-batch size is padded with tokens whose eta is zero:
they change no weights and, by causality, no earlier output, so the partial last mini-batch is
exact; `update` uses the scale of its last real token, not of the padded end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from ttt import dual, primal
from ttt.inner_models import LINEAR, MLP, InnerModel

_DUAL_BODIES = {LINEAR.name: dual.make_linear_body, MLP.name: dual.make_mlp_body}


def num_mini_batches(seq_len: int, mini_batch_size: int, group_size: int) -> tuple[int, int]:
    """(mini-batches holding real tokens, mini-batches after padding to whole remat groups)."""
    real = math.ceil(seq_len / mini_batch_size)
    group = min(group_size, real)
    return real, math.ceil(real / group) * group


def split(x: jax.Array, mini_batch_size: int, num_padded: int) -> jax.Array:
    """Per-token scalars [batch, heads, seq] -> [num_padded, batch, heads, mini_batch_size], zero padded."""
    batch, heads, seq_len = x.shape
    x = jnp.pad(x, [(0, 0), (0, 0), (0, num_padded * mini_batch_size - seq_len)])
    return jnp.moveaxis(x.reshape(batch, heads, num_padded, mini_batch_size), 2, 0)


def split_tokens(x: jax.Array, mini_batch_size: int, num_padded: int) -> jax.Array:
    """Token vectors [batch, heads, seq, d] -> token-major [num_padded, batch, mini_batch_size, heads, d], zero padded.

    The scan reads and writes token-major mini-batches: a layer computes its projections as [batch, seq,
    heads, d], so the transpose here cancels the layer's and, at batch 1, cutting into mini-batches is
    a reshape. Transposing inside a scan step is cheap (its arrays are in cache); transposing the whole
    sequence is not, and XLA would repeat it in every fusion that reads it (benchmarks/reference_speed.py).
    """
    batch, heads, seq_len, d = x.shape
    x = jnp.pad(jnp.swapaxes(x, 1, 2), [(0, 0), (0, num_padded * mini_batch_size - seq_len), (0, 0), (0, 0)])
    return jnp.moveaxis(x.reshape(batch, num_padded, mini_batch_size, heads, d), 1, 0)


def merge_tokens(x: jax.Array, seq_len: int) -> jax.Array:
    """Token-major [num_mini_batches, batch, mini_batch_size, heads, d] -> token-major [batch, seq_len, heads, d]."""
    num, batch, size, heads, d = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(batch, num * size, heads, d)[:, :seq_len]


def heads_first(x: jax.Array) -> jax.Array:
    """One token-major mini-batch [batch, b, heads, d] <-> [batch, heads, b, d] (its own inverse)."""
    return jnp.swapaxes(x, -3, -2)


def update_coefficients(eta: jax.Array, token_scale: jax.Array, seq_len: int) -> jax.Array:
    """update[j] = s_L * eta_j of every mini-batch: [num, batch, heads, b] from eta [num, batch, heads, b]
    (zero on padding) and token_scale [b], with L the last real position of the mini-batch."""
    num = eta.shape[0]
    last_real = np.clip(seq_len - eta.shape[-1] * np.arange(num), 1, eta.shape[-1]) - 1
    return token_scale[last_real][:, None, None, None] * eta


def restarts(document_starts: jax.Array, mini_batch_size: int, num_padded: int) -> jax.Array:
    """bool [num_padded, batch]: the mini-batches whose first token starts a document, from
    `document_starts` bool [batch, seq] (ttt/documents.py; starts inside a mini-batch are not restarts)."""
    batch, seq_len = document_starts.shape
    padded = jnp.pad(document_starts, [(0, 0), (0, num_padded * mini_batch_size - seq_len)])
    return padded.reshape(batch, num_padded, mini_batch_size)[:, :, 0].T


def default_token_scale(mini_batch_size: int) -> jax.Array:
    """s_i = 1 / i for positions i = 1..b."""
    return 1.0 / jnp.arange(1, mini_batch_size + 1, dtype=jnp.float32)


def remat_scan(body, carry, xs, group_size: int):
    """`lax.scan(body, carry, xs)` in groups of `group_size` steps, each group rematerialised.

    Only the carry at group boundaries is kept for the backward pass, so the memory of the
    fast-weight trajectory falls by `group_size` for one extra forward through each group.
    Each group is unrolled: XLA then fuses across its steps and skips the per-step loop overhead,
    which dominates steps of TTT's size on CPU (compile time grows with `group_size`).
    The leading axis of every leaf of `xs` must be a multiple of `group_size`.
    """
    num = jax.tree.leaves(xs)[0].shape[0]
    grouped = jax.tree.map(lambda x: x.reshape(num // group_size, group_size, *x.shape[1:]), xs)

    def run_group(carry, group):
        return jax.lax.scan(body, carry, group, unroll=True)

    # Inside a scan, common-subexpression elimination cannot merge the recomputation with the
    # forward, so the barrier that prevent_cse adds would only cost speed.
    carry, ys = jax.lax.scan(jax.checkpoint(run_group, prevent_cse=False), carry, grouped)
    return carry, jax.tree.map(lambda y: y.reshape(num, *y.shape[2:]), ys)


def scan_form(model: InnerModel, form: str, params, q, k, v, eta, token_scale, update, ln_weight, ln_bias,
              group_size: int, restart_flags=None, initial_params=None):
    """The dual or primal form's scan over split mini-batches, rematerialised in groups.

    Args:
      q, k, v: token-major [num, batch, b, heads, d] (from `split_tokens`); eta: [num, batch, heads, b] (from
        `split`); token_scale: [b]; update: [num, batch, heads, b] (the end-of-mini-batch step's coefficients).
      ln_weight, ln_bias: [heads, d] or both None.
      group_size: mini-batches per rematerialised group (`num` must be a multiple of it).
      restart_flags: bool [num, batch] or None: the mini-batches that start from `initial_params` (same
        structure as `params`) instead of the weights the one before left (`restarts`).
    Returns:
      (weights after the scan, g(q; theta_t) token-major [num, batch, b, heads, d]).
    """
    batch, heads = q.shape[1], q.shape[3]
    # The steps read batch and heads as one axis of rows (`_row_step`): LN parameters per row, [rows, d].
    row_ln = (None, None) if ln_weight is None else tuple(jnp.tile(p, (batch, 1)) for p in (ln_weight, ln_bias))
    if form == "dual":
        # LN parameters shaped [rows, 1, d] to broadcast over [rows, tokens, d].
        dual_ln = (None, None) if ln_weight is None else (row_ln[0][:, None], row_ln[1][:, None])
        xs, body = dual.prepare(q, k, v, eta, update, token_scale), _DUAL_BODIES[model.name](*dual_ln)
    else:
        coeff = dual.causal_coefficients(eta, token_scale)
        xs, body = primal.prepare(q, k, v, coeff, update), primal.make_body(model, *row_ln)
    body = _row_step(body, batch, heads)
    if restart_flags is not None:
        xs, body = {**xs, "restart": restart_flags}, _restarting(body, initial_params)
    return remat_scan(body, params, xs, group_size)


_TOKEN_INPUTS = ("q", "k", "v", "target", "keys_queries")


def _row_step(body, batch: int, heads: int):
    """`body` (written for rows = batch * heads: token vectors [rows, b, d], scalars [rows, b], weights
    [rows, ...]) on token-major scan inputs, [batch, heads] scalars and weights, and token-major outputs.

    One axis of rows, and the inner LN parameters given per row (`scan_form` tiles them over the batch):
    a step's gradients of what its tokens share then stay per row, [rows, ...]. Summed over the batch
    inside the step, they were an all-reduce in every step of the backward scan when the batch is split
    over devices, and at batch 1 a reduction keeping a size-1 batch axis, which XLA:CPU's default
    reductions run many times slower (benchmarks/xla_cpu.py). Now the batch sum is one, after the scan.
    """
    rows = lambda x: x.reshape(batch * heads, *x.shape[2:])
    unrows = lambda x: x.reshape(batch, heads, *x.shape[1:])

    def step(params, xs):
        xs = {name: rows(heads_first(x) if name in _TOKEN_INPUTS else x) for name, x in xs.items()}
        params, inner_out = body(jax.tree.map(rows, params), xs)
        return jax.tree.map(unrows, params), heads_first(unrows(inner_out))

    return step


def restart(flag: jax.Array, initial_params, params):
    """`initial_params` in the rows where `flag` [batch] is True, else `params` (same pytrees of [batch, ...])."""
    return jax.tree.map(lambda initial, p: jnp.where(flag.reshape(-1, *(1,) * (p.ndim - 1)), initial, p),
                        initial_params, params)


def _restarting(body, initial_params):
    """`body` whose mini-batch starts from `initial_params` in the rows where `xs["restart"]` [batch] is True
    (`body` reads the other inputs)."""

    def step(params, xs):
        xs = dict(xs)
        return body(restart(xs.pop("restart"), initial_params, params), xs)

    return step
