"""The causal depthwise convolution and its written-out backward pass, against independent references:
a float64 numpy loop for the values, autodiff of a naive per-position formulation for gradients and
gradients of gradients, and finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt.conv import causal_depthwise_conv, next_history

BATCH, SEQ, KERNEL, CHANNELS = 2, 7, 4, (3, 2)


def make_inputs(seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (BATCH, SEQ, *CHANNELS), dtype)
    weight = jax.random.normal(keys[1], (KERNEL, *CHANNELS), dtype)
    bias = jax.random.normal(keys[2], CHANNELS, dtype)
    history = jax.random.normal(keys[3], (BATCH, KERNEL - 1, *CHANNELS), dtype)
    return x, weight, bias, history


def naive_conv(x, weight, bias, history):
    """y[t] = bias + sum_j weight[j] * input[t - K + 1 + j], one position at a time (autodiff-able)."""
    inputs = jnp.concatenate([history, x], axis=1)  # input index t + K - 1 is x[t]
    return jnp.stack([bias + sum(weight[j] * inputs[:, t + j] for j in range(KERNEL)) for t in range(x.shape[1])],
                     axis=1)


def test_values_match_a_float64_loop():
    x, weight, bias, history = (np.asarray(a, np.float64) for a in make_inputs())
    expected = np.zeros_like(x)
    for t in range(SEQ):
        for j in range(KERNEL):
            source = t - KERNEL + 1 + j
            expected[:, t] += weight[j] * (x[:, source] if source >= 0 else history[:, KERNEL - 1 + source])
        expected[:, t] += bias
    got = causal_depthwise_conv(*(jnp.asarray(a, jnp.float32) for a in (x, weight, bias, history)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_autodiff_of_the_naive_form():
    inputs = make_inputs(1)
    cotangent = jax.random.normal(jax.random.key(9), (BATCH, SEQ, *CHANNELS))
    loss = lambda f: (lambda *a: jnp.sum(cotangent * jnp.sin(f(*a))))
    got = jax.grad(loss(causal_depthwise_conv), argnums=(0, 1, 2, 3))(*inputs)
    expected = jax.grad(loss(naive_conv), argnums=(0, 1, 2, 3))(*inputs)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences_in_float64():
    with jax.enable_x64():
        x, weight, bias, history = make_inputs(2, jnp.float64)
        loss = lambda w: jnp.sum(jnp.sin(causal_depthwise_conv(x, w, bias, history)))
        direction = jax.random.normal(jax.random.key(3), weight.shape, jnp.float64)
        eps = 1e-6
        difference = (loss(weight + eps * direction) - loss(weight - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(jax.grad(loss)(weight), direction), difference, rtol=1e-7)


def test_gradients_of_gradients_match_the_naive_form():
    """Reverse over reverse: the written-out backward is itself differentiable."""
    inputs = make_inputs(4)

    def second(f):
        inner = lambda x, w: jnp.sum(jax.grad(lambda w: jnp.sum(jnp.sin(f(x, w, inputs[2], inputs[3]))))(w) ** 2)
        return jax.grad(inner, argnums=(0, 1))(inputs[0], inputs[1])

    for g, e in zip(second(causal_depthwise_conv), second(naive_conv)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_keep_the_input_dtypes(dtype):
    x, weight, bias, history = make_inputs(5, dtype)
    grads = jax.grad(lambda *a: jnp.sum(causal_depthwise_conv(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))(
        x, weight, bias, history)
    assert [g.dtype for g in grads] == [dtype] * 4


def test_reading_in_two_pieces_equals_one_pass():
    x, weight, bias, history = make_inputs(6)
    first = causal_depthwise_conv(x[:, :3], weight, bias, history)
    second = causal_depthwise_conv(x[:, 3:], weight, bias, next_history(history, x[:, :3]))
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), causal_depthwise_conv(x, weight, bias, history),
                               rtol=1e-6, atol=1e-6)
