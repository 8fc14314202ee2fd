"""Projections of one input by several kernels, with the backward written out (`jax.custom_vjp`).

The weight gradient of `y = x . W` is `x^T dy`, a product over tokens. Under autodiff, XLA:CPU picks
dy as the operand to transpose, and fuses that transpose into whatever produced dy: the whole
backward chain behind a projection (a convolution's adjoint, a gate's and a LayerNorm's) is then
evaluated in transposed order, with strided reads of every operand. In the TTT layer those fusions
cost more than the products themselves. The adjoint below transposes x instead, once for all the
kernels that read it, behind an optimisation barrier so that XLA cannot fold the transpose back into
the products. It is built from differentiable JAX operations, so gradients of gradients (reverse over
reverse) still work; forward-mode differentiation does not (as for any `custom_vjp`).
"""

import jax
import jax.numpy as jnp


def project(x: jax.Array, kernels: tuple[jax.Array, ...], dtype) -> tuple[jax.Array, ...]:
    """x [batch, seq, embed] and kernels [embed, *features] -> (x . kernel: [batch, seq, *features] for each),
    computed in `dtype` (x and the kernels are cast to it; their gradients come back in their own dtypes)."""
    return _project(x.astype(dtype), tuple(kernel.astype(dtype) for kernel in kernels))


def _products(x, kernels):
    return tuple(jnp.tensordot(x, kernel, axes=1) for kernel in kernels)


@jax.custom_vjp
def _project(x, kernels):
    return _products(x, kernels)


def _project_fwd(x, kernels):
    return _products(x, kernels), (x, kernels)


def _project_bwd(residuals, grads):
    x, kernels = residuals
    grad_x = sum(jnp.tensordot(g, k, axes=(tuple(range(2, g.ndim)), tuple(range(1, k.ndim))))
                 for g, k in zip(grads, kernels))
    # x as [embed, batch, seq]: every weight gradient reads it with the summed tokens minor.
    x_t = jax.lax.optimization_barrier(jnp.moveaxis(x, -1, 0))
    return grad_x, tuple(jnp.tensordot(x_t, g, axes=2) for g in grads)


_project.defvjp(_project_fwd, _project_bwd)
