"""LayerNorm over the head dimension, and the closed-form gradient of the inner loss through it."""

import jax
import jax.numpy as jnp

EPS = 1e-6


def layer_norm(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """LayerNorm over the last axis with eps 1e-6; identity when `weight` and `bias` are None.

    Args:
      x: [..., d].
      weight, bias: [d] (or broadcastable to x), or both None for no normalisation.
    """
    if weight is None:
        return x
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(variance + EPS) * weight + bias


def reconstruction_grad(z: jax.Array, target: jax.Array, weight: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """d/dz of 1/2 ||LN(z) - target||^2, without autodiff (the dual forms' inner gradient).

    Args:
      z: [..., d] inner-model outputs g(k).
      target: [..., d] reconstruction targets v - k.
      weight, bias: [d] LayerNorm parameters, or both None for no normalisation.
    Returns:
      [..., d] gradient with respect to z.
    """
    if weight is None:
        return z - target
    mean = jnp.mean(z, axis=-1, keepdims=True)
    centred = z - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + EPS)
    normalised = centred * inv_std
    grad_normalised = (normalised * weight + bias - target) * weight
    return inv_std * (
        grad_normalised
        - jnp.mean(grad_normalised, axis=-1, keepdims=True)
        - normalised * jnp.mean(grad_normalised * normalised, axis=-1, keepdims=True)
    )
