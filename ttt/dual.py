"""Dual forms: closed-form mini-batch GD for the linear and MLP inner models.

No per-token weights are materialised: the outputs of a mini-batch are the outputs of its start
weights minus a causal, coefficient-weighted attention over the inner gradients (Sun et al. 2024,
section 2.7). Everything that does not depend on the fast weights (q.k^T, coefficient masks) is
computed for all mini-batches at once, outside the sequential scan.

`prepare` reads token-major mini-batches [num, batch, b, heads, d] (mini_batch.split_tokens); inside a
scan step (after mini_batch.scan_form's transpose) q, k, target: [batch, heads, b, d]; coeff:
[batch, heads, b, b]; update: [batch, heads, b]; ln_weight, ln_bias: [heads, 1, d] or None.
"""

import jax
import jax.numpy as jnp

from ttt.inner_models import gelu
from ttt.layer_norm import reconstruction_grad


def prepare(q, k, v, coeff, update):
    """Scan inputs for both dual forms; the q.k^T attention over inner gradients is precomputed."""
    attention = coeff * (jnp.einsum("...ihd,...jhd->...hij", q, k) + 1.0)
    return {"q": q, "k": k, "target": v - k, "coeff": coeff, "attention": attention, "update": update}


def _subtract_update(w, inputs, scaled_grad):
    """w - inputs^T @ scaled_grad: the end-of-mini-batch step of a weight matrix."""
    return w - jnp.einsum("...jd,...je->...de", inputs, scaled_grad)


def make_linear_body(ln_weight, ln_bias):
    """Scan body of TTT-Linear: `({"W", "b"}, xs) -> (next params, g(q; theta_t) [batch, heads, b, d])`."""

    def body(params, xs):
        w, b = params["W"], params["b"][..., None, :]
        grad_z = reconstruction_grad(xs["k"] @ w + b, xs["target"], ln_weight, ln_bias)
        inner_out = xs["q"] @ w + b - xs["attention"] @ grad_z
        scaled = xs["update"][..., None] * grad_z
        next_params = {"W": _subtract_update(w, xs["k"], scaled), "b": params["b"] - scaled.sum(-2)}
        return next_params, inner_out

    return body


def make_mlp_body(ln_weight, ln_bias):
    """Scan body of TTT-MLP: `({"W1", "b1", "W2", "b2"}, xs) -> (next params, g(q; theta_t))`."""

    def body(params, xs):
        w1, b1 = params["W1"], params["b1"][..., None, :]
        w2, b2 = params["W2"], params["b2"][..., None, :]
        hidden_k, gelu_vjp = jax.vjp(gelu, xs["k"] @ w1 + b1)
        grad_z2 = reconstruction_grad(hidden_k @ w2 + b2, xs["target"], ln_weight, ln_bias)
        (grad_z1,) = gelu_vjp(grad_z2 @ jnp.swapaxes(w2, -1, -2))

        hidden_q = gelu(xs["q"] @ w1 + b1 - xs["attention"] @ grad_z1)
        attention2 = xs["coeff"] * (jnp.einsum("...id,...jd->...ij", hidden_q, hidden_k) + 1.0)
        inner_out = hidden_q @ w2 + b2 - attention2 @ grad_z2

        update = xs["update"][..., None]
        next_params = {
            "W1": _subtract_update(w1, xs["k"], update * grad_z1),
            "b1": params["b1"] - (update * grad_z1).sum(-2),
            "W2": _subtract_update(w2, hidden_k, update * grad_z2),
            "b2": params["b2"] - (update * grad_z2).sum(-2),
        }
        return next_params, inner_out

    return body
