"""Gradients of gradients (what meta-learning through inner steps needs) against finite differences.

For a scalar loss L, the mixed second derivative along directions c (of one input) and d (of
another) is `d . grad(c . grad L)`: reverse-over-reverse autodiff. The reference is the four-point
central difference of L, in float64 for the ops (against tests/ttt/reference.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.models.test_lm import make_config
from tests.ttt import reference
from tests.ttt.test_ops import BATCH, HEAD_DIM, HEADS, SEQUENCE_FNS, make_inputs
from ttt.models import LM


def mixed_difference(loss, x, c, y, d, eps):
    """(L(x+ec, y+ed) - L(x+ec, y-ed) - L(x-ec, y+ed) + L(x-ec, y-ed)) / (4 e^2)."""
    shift = lambda a, direction, sign: jax.tree.map(lambda u, w: u + sign * eps * w, a, direction)
    total = sum(sx * sy * loss(shift(x, c, sx), shift(y, d, sy)) for sx in (1, -1) for sy in (1, -1))
    return total / (4 * eps * eps)


def directional_second_derivative(loss, x, c, y, d):
    """d . grad_y (c . grad_x L(x, y)) by reverse-over-reverse autodiff (jitted)."""
    inner = lambda y: sum(jnp.vdot(g, w) for g, w in zip(jax.tree.leaves(jax.grad(loss)(x, y)), jax.tree.leaves(c)))
    outer = jax.jit(lambda y: sum(jnp.vdot(g, w) for g, w in zip(jax.tree.leaves(jax.grad(inner)(y)), jax.tree.leaves(d))))
    return float(outer(y))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_second_order_gradient_of_the_inner_loop(kind):
    """Across the initial fast weights (what TTT-E2E meta-learns) and the keys the inner loss reads:
    float32 reverse-over-reverse through the dual form vs float64 differences of the reference."""
    seq_len, mini_batch_size = 7, 4
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs(kind, seq_len)
    rng = np.random.default_rng(3)
    probe = rng.normal(size=(BATCH, HEADS, seq_len, HEAD_DIM))
    c = rng.normal(size=k.shape)
    d = jax.tree.map(lambda p: rng.normal(size=p.shape), params)

    def ours(k, params):
        z, _ = SEQUENCE_FNS[kind](q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=mini_batch_size)
        return jnp.sum(z * probe)

    def theirs(k, params):
        z, _ = reference.ttt(kind, q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size)
        return float(np.sum(z * probe))

    analytic = directional_second_derivative(ours, jnp.asarray(k), c, params, d)
    as64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    numeric = mixed_difference(theirs, as64(k), c, as64(params), d, eps=1e-4)
    assert abs(analytic - numeric) <= 1e-3 * max(abs(numeric), 1.0), (analytic, numeric)


def test_second_order_gradient_of_the_lm_loss():
    """A Hessian entry of a TTT-MLP + sliding-window LM's loss across the TTT layer's value and output
    projections (the values are the inner loss's targets, so the path runs through the inner loop):
    reverse-over-reverse against float32 central differences. At
    eps 0.1 of unit directions the differences carry about 2% truncation and 0.6% rounding error."""
    config = dataclasses.replace(make_config("hybrid"), layer_pattern="ttt_mlp,swa")
    graphdef, params = nnx.split(LM(config, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jax.random.randint(jax.random.key(2), (2, 11), 0, config.vocab_size)
    mixer = nnx.to_pure_dict(params)["stages"][0]["blocks"][0]["mixer"]
    rng = np.random.default_rng(4)
    unit = lambda tree: jax.tree.map(lambda a: (lambda r: r / np.sqrt(np.sum(r * r)))(rng.normal(size=a.shape)), tree)
    values, outputs = mixer["v_proj"], mixer["o_proj"]
    c, d = unit(values), unit(outputs)

    @jax.jit
    def loss(values, outputs):
        tree = nnx.to_pure_dict(params)
        tree["stages"][0]["blocks"][0]["mixer"].update(v_proj=values, o_proj=outputs)
        state = nnx.State(params)
        nnx.replace_by_pure_dict(state, tree)
        return nnx.merge(graphdef, state).loss(ids)[0]

    analytic = directional_second_derivative(loss, values, c, outputs, d)
    numeric = float(mixed_difference(loss, values, c, outputs, d, eps=0.1))
    assert abs(analytic) > 1e-3  # the two directions interact: the check is not 0 == 0
    assert abs(analytic - numeric) <= 5e-2 * abs(numeric), (analytic, numeric)
