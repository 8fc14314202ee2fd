"""The reconstruction objective of TTT-Linear / TTT-MLP (docs/MATH.md).

  f(x; theta) = x + LN(g(x; theta))                        (layer output, `ttt.ops`)
  l(theta; k, v) = 1/2 || LN(g(k; theta)) - (v - k) ||^2   (inner loss)

LN has outer (learned, not test-time-trained) scale and shift; passing None for both drops it.
Without the residual (`ttt.ops`, residual=False) f = LN(g) and the target is v instead of v - k.
"""

import jax
import jax.numpy as jnp

from ttt.inner_models import InnerModel, Params
from ttt.layer_norm import layer_norm


def inner_loss(model: InnerModel, params: Params, k, v, ln_weight, ln_bias) -> jax.Array:
    """Inner loss of one token for one head. `k, v: [d]`; `ln_weight, ln_bias: [d]` or None."""
    error = layer_norm(model.apply(params, k), ln_weight, ln_bias) - (v - k)
    return 0.5 * jnp.sum(error * error)
