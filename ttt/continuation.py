"""Continuing the inner loop from a decode state, for any number of tokens and from any position.

A decode state `(theta_n, G, p)` holds the weights at the start of the current mini-batch, the
eta-weighted sum `G` of the inner gradients of its first `p` tokens (all taken at `theta_n`), and `p`.
Token `i` of the mini-batch (0-based) sees `theta_n - s_{i+1} (G + sum_{p <= j <= i} eta_j grad_j)`
(docs/MATH.md). Reading T tokens from such a state runs

  head:  the rest of the current mini-batch (slots p .. b-1), per token, from theta_n and G;
  body:  the following whole mini-batches with the sequence form (dual or primal), from the weights
         after the head;
  tail:  the tokens after the last whole mini-batch add their gradients to the new state's G.

`p` may be traced (a state carried through `jit`): the tokens are written at offset p of a buffer
of b + T slots whose other slots have eta = 0, which changes no weight, so every shape is static.
A state whose position is a concrete 0 (the initial state) skips the head.

With `document_starts` (bool [B, T], ttt/documents.py), a mini-batch whose first token starts a
document restarts from `initial_params` with an empty gradient sum: the head only when its first
slot is the first token (p = 0), the body's mini-batches in the scan (`mini_batch.scan_form`).

Shapes (B batch, H heads, T tokens, d head_dim, b mini_batch_size), everything float32:
  q, k, v: [B, H, T, d]; eta: [B, H, T]; token_scale: [b]; ln_weight, ln_bias: [H, d] or None;
  state: {"params": {name: [B, H, ...]}, "grad_sum": same, "position": int32 []}.
"""

import jax
import jax.numpy as jnp

from ttt import mini_batch
from ttt.inner_models import InnerModel
from ttt.objective import inner_loss


def extend(model: InnerModel, q, k, v, eta, state, ln_weight, ln_bias, *, mini_batch_size, token_scale, form,
           remat_group_size, document_starts=None, initial_params=None):
    """Inner-model outputs g(q_t; theta_t) of T tokens read from `state`, and the state after them.

    Returns:
      inner_out: token-major [B, T, H, d] (the layer output is `q + LN(inner_out)`).
      state: the decode state after the last token.
    """
    b, seq_len = mini_batch_size, q.shape[2]
    run = dict(mini_batch_size=b, token_scale=token_scale, form=form, remat_group_size=remat_group_size,
               initial_params=initial_params)
    position = state["position"]
    if _concrete(position) == 0:
        inner_out, params, grad_sum = whole_mini_batches(model, q, k, v, eta, state["params"], seq_len, ln_weight,
                                                          ln_bias, document_starts=document_starts, **run)
        return inner_out, _state(params, grad_sum, jnp.asarray(seq_len % b, jnp.int32))

    def place(x):
        buffer = jnp.zeros((*x.shape[:2], b + seq_len, *x.shape[3:]), x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(buffer, x, position, axis=2)

    q, k, v, eta = (place(x) for x in (q, k, v, eta))
    body_starts = None
    if document_starts is not None:
        starts = place(document_starts[:, None])[:, 0]  # slot 0 holds the first token only when p = 0
        body_starts = starts[:, b:]
        grad_sum = state["grad_sum"]
        state = _state(mini_batch.restart(starts[:, 0], initial_params, state["params"]),
                       mini_batch.restart(starts[:, 0], jax.tree.map(jnp.zeros_like, grad_sum), grad_sum), position)
    head_out, head_sums = _head(model, *(x[:, :, :b] for x in (q, k, v, eta)), state["params"], state["grad_sum"],
                                token_scale, ln_weight, ln_bias)
    last_sum = jax.tree.map(lambda s: s[:, :, -1], head_sums)
    after_head = jax.tree.map(lambda p, s: p - token_scale[-1] * s, state["params"], last_sum)
    rest = position + seq_len - b  # tokens after the current mini-batch; negative if it does not complete
    rest_out, params, grad_sum = whole_mini_batches(model, *(x[:, :, b:] for x in (q, k, v, eta)), after_head, rest,
                                                    ln_weight, ln_bias, document_starts=body_starts, **run)
    completed = rest >= 0
    params = jax.tree.map(lambda new, old: jnp.where(completed, new, old), params, state["params"])
    grad_sum = jax.tree.map(lambda new, old: jnp.where(completed, new, old), grad_sum, last_sum)
    inner_out = jnp.concatenate([mini_batch.heads_first(head_out), rest_out], axis=1)
    inner_out = jax.lax.dynamic_slice_in_dim(inner_out, position, seq_len, axis=1)
    return inner_out, _state(params, grad_sum, (position + seq_len) % b)


def whole_mini_batches(model: InnerModel, q, k, v, eta, params, num_real, ln_weight, ln_bias, *, mini_batch_size,
                       token_scale, form, remat_group_size, document_starts=None, initial_params=None):
    """The sequence form over tokens aligned to mini-batch starts, of which the first `num_real` are real.

    `num_real` may be traced; tokens past it must have eta = 0. Only whole mini-batches move the
    weights, so the final weights are those at the start of the last, partial mini-batch, and the
    gradient sum of its real tokens is returned beside them. A mini-batch whose first token starts a
    document (`document_starts` [B, T] or None) starts from `initial_params`.

    Returns:
      inner_out: token-major [B, T, H, d]; params: weights at the start of the partial mini-batch; grad_sum.
    """
    b, seq_len = mini_batch_size, q.shape[2]
    _, padded = mini_batch.num_mini_batches(seq_len, b, remat_group_size)
    q_mb, k_mb, v_mb = (mini_batch.split_tokens(x, b, padded) for x in (q, k, v))
    eta_mb = mini_batch.split(eta, b, padded)
    whole = (jnp.arange(padded) + 1) * b <= num_real
    update = jnp.where(whole[:, None, None, None], token_scale[-1] * eta_mb, 0.0)
    restart_flags = None if document_starts is None else mini_batch.restarts(document_starts, b, padded)
    params, inner_out = mini_batch.scan_form(model, form, params, q_mb, k_mb, v_mb, eta_mb, token_scale, update,
                                             ln_weight, ln_bias, min(remat_group_size, padded), restart_flags,
                                             initial_params)

    partial = jnp.clip(jnp.asarray(num_real) // b, 0, padded - 1)
    grads = token_grads(model, params, *(mini_batch.heads_first(x[partial]) for x in (k_mb, v_mb)), ln_weight, ln_bias)
    has_partial = jnp.asarray(num_real) % b > 0
    grad_sum = jax.tree.map(lambda g: jnp.where(has_partial, _weighted_sum(eta_mb[partial], g), 0.0), grads)
    return mini_batch.merge_tokens(inner_out, seq_len), params, grad_sum


def token_grads(model: InnerModel, params, k, v, ln_weight, ln_bias):
    """Inner-loss gradient of every token at the same weights: {name: [B, H, n, ...]} for k, v [B, H, n, d]."""

    def one(p, k_t, v_t, w, b):
        return jax.grad(inner_loss, argnums=1)(model, p, k_t, v_t, w, b)

    per_token = jax.vmap(one, in_axes=(None, 0, 0, None, None))
    per_head = jax.vmap(per_token, in_axes=(0, 0, 0, 0, 0) if ln_weight is not None else (0, 0, 0, None, None))
    return jax.vmap(per_head, in_axes=(0, 0, 0, None, None))(params, k, v, ln_weight, ln_bias)


def _head(model: InnerModel, q, k, v, eta, params, grad_sum, token_scale, ln_weight, ln_bias):
    """One mini-batch of b slots read from (params, grad_sum): outputs [B, H, b, d] and the running
    gradient sums {name: [B, H, b, ...]} (slot i: grad_sum plus the gradients of slots <= i)."""
    grads = token_grads(model, params, k, v, ln_weight, ln_bias)
    sums = jax.tree.map(lambda g, s: s[:, :, None] + jnp.cumsum(_expand(eta, g) * g, axis=2), grads, grad_sum)
    token_params = jax.tree.map(lambda p, s: p[:, :, None] - _expand(token_scale, s) * s, params, sums)
    inner_out = jax.vmap(jax.vmap(jax.vmap(model.apply)))(token_params, q)
    return inner_out, sums


def _weighted_sum(eta, grads):
    """sum_j eta[..., j] * grads[..., j, ...] over the token axis 2."""
    return jnp.sum(_expand(eta, grads) * grads, axis=2)


def _expand(scale, like):
    """`scale` [..., n] (or [n]) with trailing axes added to broadcast against `like` [B, H, n, ...]."""
    return scale.reshape(scale.shape + (1,) * (like.ndim - 3))


def _state(params, grad_sum, position):
    return {"params": params, "grad_sum": grad_sum, "position": position}


def _concrete(value):
    """`value` as a Python int when it is known at trace time, else None."""
    try:
        return int(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None
