"""Primal form: generic mini-batch GD for any inner model, with gradients from `jax.grad`.

It materialises the weights of every token of a mini-batch (`[b, *param_shape]` per head), so it
is the slow, obviously-correct form, and the way a new inner model works before it has a dual.
"""

import jax
import jax.numpy as jnp

from ttt.inner_models import InnerModel
from ttt.objective import inner_loss


def prepare(q, k, v, coeff, update):
    """Per-mini-batch scan inputs (nothing to precompute for the primal form); q, k, v token-major."""
    return {"q": q, "k": k, "v": v, "coeff": coeff, "update": update}


def make_body(model: InnerModel, ln_weight, ln_bias):
    """Scan body over mini-batches: `(params [rows, ...], xs) -> (next params, g(q) [rows, b, d])`, rows =
    batch * heads (mini_batch._row_step); ln_weight, ln_bias: [rows, d] or None."""
    per_token_grad = jax.vmap(jax.grad(lambda p, k, v, w, b: inner_loss(model, p, k, v, w, b)), in_axes=(None, 0, 0, None, None))

    def one_head(params, q, k, v, coeff, update, ln_w, ln_b):
        grads = per_token_grad(params, k, v, ln_w, ln_b)  # leaves [b, *shape]
        token_params = jax.tree.map(lambda p, g: p - jnp.tensordot(coeff, g, axes=1), params, grads)
        inner_out = jax.vmap(model.apply)(token_params, q)
        next_params = jax.tree.map(lambda p, g: p - jnp.tensordot(update, g, axes=1), params, grads)
        return next_params, inner_out

    per_row = jax.vmap(one_head)

    def body(params, xs):
        return per_row(params, xs["q"], xs["k"], xs["v"], xs["coeff"], xs["update"], ln_weight, ln_bias)

    return body
