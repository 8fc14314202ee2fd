"""Dual forms: closed-form mini-batch GD for the linear and MLP inner models.

No per-token weights are materialised: the outputs of a mini-batch are the outputs of its start
weights minus a causal, coefficient-weighted attention over the inner gradients (Sun et al. 2024,
section 2.7).

`prepare` reads token-major mini-batches [num, batch, b, heads, d] (mini_batch.split_tokens); inside a
scan step (after mini_batch._row_step's transpose, rows = batch * heads) keys_queries: [rows, 2b, d]
(k above q); target: [rows, b, d]; eta, update, token_scale: [rows, b]; the coefficients [rows, b, b];
ln_weight, ln_bias: [rows, 1, d] or None.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ttt.inner_models import gelu
from ttt.layer_norm import reconstruction_grad


def prepare(q, k, v, eta, update, token_scale):
    """Scan inputs for both dual forms, from token-major q, k, v [num, batch, b, heads, d], eta and update
    [num, batch, heads, b] and token_scale [b]. The [b, b] coefficient and attention matrices are formed
    inside each step, where they stay in cache: precomputed for the whole sequence they are num * b^2
    per head, written out and read back (at b = 256 that product alone took a third of the forward)."""
    # Keys and queries of a mini-batch meet the same first-layer weights: one product of twice the rows.
    keys_queries = jnp.concatenate([k, q], axis=-3)
    # The token scale is read per head and step, so that its gradient is summed over heads once, after
    # the scan: closed over as [b], it was summed over heads in every step, and with heads sharded
    # that sum was an all-reduce, a synchronisation of the devices per step of the backward scan.
    return {"keys_queries": keys_queries, "target": v - k, "eta": eta, "update": update,
            "token_scale": jnp.broadcast_to(token_scale, eta.shape)}


def causal_coefficients(eta: jax.Array, token_scale: jax.Array) -> jax.Array:
    """coeff[..., i, j] = s_i * eta_j for j <= i, else 0: [..., b, b] from eta [..., b] and token_scale [..., b]
    (or [b])."""
    size = eta.shape[-1]
    causal = np.tril(np.ones((size, size), np.float32))
    return token_scale[..., :, None] * causal * eta[..., None, :]


def _attention(coeff, queries, keys):
    """coeff * (queries . keys^T + 1): the weights of the inner gradients in each output, [..., b, b]."""
    return coeff * (jnp.einsum("...id,...jd->...ij", queries, keys) + 1.0)


def _first_layer(xs, w, b):
    """(k, q, k @ w + b, q @ w + b) of a mini-batch, from one product of its stacked keys and queries."""
    keys_queries = xs["keys_queries"]
    n = keys_queries.shape[-2] // 2
    out = keys_queries @ w + b
    return keys_queries[..., :n, :], keys_queries[..., n:, :], out[..., :n, :], out[..., n:, :]


def _subtract_update(w, inputs, scaled_grad):
    """w - inputs^T @ scaled_grad: the end-of-mini-batch step of a weight matrix."""
    # Spelled with an explicit transpose: the gradients autodiff derives from this spelling are plain
    # products, where an einsum's contracted the major axis of the weight gradient, which XLA:CPU ran at
    # about 25 GFLOP/s against 60-90 for the plain ones (profiled: TTT-MLP fwd+bwd at 2048, b = 16).
    return w - jnp.swapaxes(inputs, -1, -2) @ scaled_grad


def _weighted_sum(update, grad):
    """sum_j update[j] * grad[j]: [..., h] from update [..., b] and grad [..., b, h]."""
    # A product rather than `(update[..., None] * grad).sum(-2)`: XLA:CPU fused that reduction with the
    # GELU derivative that forms TTT-MLP's first-layer gradient and computed the derivative a second time
    # there; a product reads the gradient the other products read (TTT-MLP layer at 4096, b = 16: forward
    # 6% and forward+backward 4% faster; in TTT-Linear, whose gradient is cheap to recompute, it gained nothing).
    return jnp.einsum("...j,...jh->...h", update, grad)


def make_linear_body(ln_weight, ln_bias):
    """Scan body of TTT-Linear: `({"W", "b"}, xs) -> (next params, g(q; theta_t) [rows, b, d])`."""

    def body(params, xs):
        w = params["W"]
        k, q, z_k, z_q = _first_layer(xs, w, params["b"][..., None, :])
        grad_z = reconstruction_grad(z_k, xs["target"], ln_weight, ln_bias)
        inner_out = z_q - _attention(causal_coefficients(xs["eta"], xs["token_scale"]), q, k) @ grad_z
        scaled = xs["update"][..., None] * grad_z
        next_params = {"W": _subtract_update(w, k, scaled), "b": params["b"] - scaled.sum(-2)}
        return next_params, inner_out

    return body


def make_mlp_body(ln_weight, ln_bias):
    """Scan body of TTT-MLP: `({"W1", "b1", "W2", "b2"}, xs) -> (next params, g(q; theta_t))`."""

    def body(params, xs):
        w1, b1 = params["W1"], params["b1"][..., None, :]
        w2, b2 = params["W2"], params["b2"][..., None, :]
        k, q, z1_k, z1_q = _first_layer(xs, w1, b1)
        coeff = causal_coefficients(xs["eta"], xs["token_scale"])
        hidden_k, gelu_vjp = jax.vjp(gelu, z1_k)
        grad_z2 = reconstruction_grad(hidden_k @ w2 + b2, xs["target"], ln_weight, ln_bias)
        # An einsum rather than `@ swapaxes(w2)`: the swap's adjoint would add this product's W2 gradient
        # transposed to the others, a strided pass per step.
        (grad_z1,) = gelu_vjp(jnp.einsum("...je,...he->...jh", grad_z2, w2))

        hidden_q = gelu(z1_q - _attention(coeff, q, k) @ grad_z1)
        inner_out = hidden_q @ w2 + b2 - _attention(coeff, hidden_q, hidden_k) @ grad_z2

        update = xs["update"][..., None]
        next_params = {
            "W1": _subtract_update(w1, k, update * grad_z1),
            "b1": params["b1"] - _weighted_sum(xs["update"], grad_z1),
            "W2": _subtract_update(w2, hidden_k, update * grad_z2),
            "b2": params["b2"] - _weighted_sum(xs["update"], grad_z2),
        }
        return next_params, inner_out

    return body
