"""Projections with a written-out backward, against independent references: a float64 numpy product
for the values, autodiff of a per-kernel einsum for gradients and gradients of gradients, and finite
differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np

from ttt.projection import project

BATCH, SEQ, EMBED = 2, 5, 6
FEATURES = ((3, 2), (4,), (2, 3))  # kernels [EMBED, *features]: heads x head_dim, a plain width, another


def make_inputs(seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 1 + len(FEATURES))
    x = jax.random.normal(keys[0], (BATCH, SEQ, EMBED), dtype)
    kernels = tuple(jax.random.normal(key, (EMBED, *features), dtype) for key, features in zip(keys[1:], FEATURES))
    return x, kernels


def projected(x, kernels):
    """`project` in the dtype of its inputs."""
    return project(x, kernels, x.dtype)


def einsum_project(x, kernels):
    """x . kernel for each kernel, written as one einsum per kernel (autodiff's own backward)."""
    return tuple(jnp.einsum("bte,e...->bt...", x, kernel) for kernel in kernels)


def loss_of(fn, seed=7):
    """A loss with a different random weight on every output element, so no gradient is uniform."""
    weights = tuple(jax.random.normal(key, (BATCH, SEQ, *features))
                    for key, features in zip(jax.random.split(jax.random.key(seed), len(FEATURES)), FEATURES))
    return lambda x, kernels: sum(jnp.sum(w * jnp.sin(y)) for w, y in zip(weights, fn(x, kernels)))


def test_values_match_a_float64_product():
    x, kernels = make_inputs()
    got = project(x, kernels, jnp.float32)
    x64 = np.asarray(x, np.float64)
    for y, kernel, features in zip(got, kernels, FEATURES):
        expected = (x64.reshape(-1, EMBED) @ np.asarray(kernel, np.float64).reshape(EMBED, -1))
        assert y.shape == (BATCH, SEQ, *features)
        np.testing.assert_allclose(y, expected.reshape(BATCH, SEQ, *features), rtol=1e-5, atol=1e-5)


def test_gradients_match_autodiff_of_einsums():
    x, kernels = make_inputs(1)
    got = jax.grad(loss_of(projected), argnums=(0, 1))(x, kernels)
    expected = jax.grad(loss_of(einsum_project), argnums=(0, 1))(x, kernels)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_gradients_of_gradients_match_autodiff_of_einsums():
    """Reverse over reverse: the gradient of |d loss / d kernels|^2 with respect to x and the kernels."""
    x, kernels = make_inputs(2)

    def outer(fn):
        inner = jax.grad(loss_of(fn), argnums=1)
        return lambda x, kernels: sum(jnp.sum(g ** 2) for g in inner(x, kernels))

    got = jax.grad(outer(projected), argnums=(0, 1))(x, kernels)
    expected = jax.grad(outer(einsum_project), argnums=(0, 1))(x, kernels)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_gradient_matches_finite_differences_in_float64():
    with jax.enable_x64():
        x, kernels = make_inputs(3, jnp.float64)
        loss = loss_of(projected)
        directions = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape, jnp.float64), (x, kernels))
        eps = 1e-6
        step = lambda sign: jax.tree.map(lambda a, d: a + sign * eps * d, (x, kernels), directions)
        difference = (loss(*step(1)) - loss(*step(-1))) / (2 * eps)
        grads = jax.grad(loss, argnums=(0, 1))(x, kernels)
        directional = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(directions)))
        np.testing.assert_allclose(directional, difference, rtol=1e-7)


def test_computes_in_the_given_dtype_and_returns_gradients_in_the_inputs_dtypes():
    x, kernels = make_inputs(5)
    outputs = project(x, kernels, jnp.bfloat16)
    assert all(y.dtype == jnp.bfloat16 for y in outputs)
    in_bf16 = lambda x, kernels: einsum_project(x.astype(jnp.bfloat16), [k.astype(jnp.bfloat16) for k in kernels])
    got = jax.grad(loss_of(lambda x, kernels: project(x, kernels, jnp.bfloat16)), argnums=(0, 1))(x, kernels)
    expected = jax.grad(loss_of(in_bf16), argnums=(0, 1))(x, kernels)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert g.dtype == jnp.float32
        # Both sum the kernels' input gradients in bfloat16, in different orders: one rounding apart.
        np.testing.assert_allclose(g, e, rtol=0, atol=float(jnp.finfo(jnp.bfloat16).eps) * float(jnp.abs(e).max()))
