"""Step form: one token at a time with O(1) state, for decoding.

The state holds the weights at the start of the current mini-batch, the eta-weighted sum of the
inner gradients of the mini-batch so far, and the position inside it; the weights a token sees
are `params - s_i * grad_sum` (docs/MATH.md), whatever the length of the context.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ttt.inner_models import InnerModel
from ttt.objective import inner_loss


def init_state(params):
    """Decode state before any token, from fast weights `{name: [batch, heads, ...]}`."""
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    return {
        "params": params,
        "grad_sum": jax.tree.map(jnp.zeros_like, params),
        # numpy, so that it stays a concrete 0 inside jit (ttt.continuation skips the head then).
        "position": np.zeros((), np.int32),
    }


def _per_batch_and_head(fn):
    """vmap a per-head function over [batch, heads]; the trailing two arguments (LN) are per head."""
    per_head = jax.vmap(fn, in_axes=(0, 0, 0, 0, 0))
    return jax.vmap(per_head, in_axes=(0, 0, 0, None, None))


def step(model: InnerModel, q, k, v, eta, state, ln_weight, ln_bias, *, mini_batch_size, token_scale):
    """One token of mini-batch GD. `q, k, v: [batch, heads, d]`, `eta: [batch, heads]`, all float32.

    Returns (g(q; theta_t) [batch, heads, d], the state after the token); the layer output adds LN and
    the residual (`ttt.ops`).
    """
    grad = _per_batch_and_head(lambda p, k, v, w, b: jax.grad(inner_loss, argnums=1)(model, p, k, v, w, b))

    params, position = state["params"], state["position"]
    grads = grad(params, k, v, ln_weight, ln_bias)
    grad_sum = jax.tree.map(lambda s, g: s + eta.reshape(eta.shape + (1,) * (g.ndim - 2)) * g, state["grad_sum"], grads)
    token_params = jax.tree.map(lambda p, s: p - token_scale[position] * s, params, grad_sum)
    inner_out = jax.vmap(jax.vmap(model.apply))(token_params, q)

    # At the end of a mini-batch its last weights become the start of the next one.
    boundary = position + 1 == mini_batch_size
    new_state = {
        "params": jax.tree.map(lambda t, p: jnp.where(boundary, t, p), token_params, params),
        "grad_sum": jax.tree.map(lambda s: jnp.where(boundary, jnp.zeros_like(s), s), grad_sum),
        "position": (position + 1) % mini_batch_size,
    }
    return inner_out, new_state
