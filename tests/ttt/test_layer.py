"""TTTLayer: full forward vs decode, reading in pieces, composition vs numpy, sharding names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttt
from tests.ttt import reference
from ttt.configs import TTTLayerConfig
from ttt.context import Context

WIDTH, HEADS, MINI_BATCH = 16, 2, 4


def make_layer(inner="linear", backbone="mamba", **overrides):
    config = TTTLayerConfig(WIDTH, HEADS, inner=inner, backbone=backbone, mini_batch_size=MINI_BATCH, **overrides)
    return ttt.TTTLayer(config, rngs=nnx.Rngs(0))


def inputs(seq_len, seed=1, batch=2):
    return jax.random.normal(jax.random.key(seed), (batch, seq_len, WIDTH))


forward = nnx.jit(lambda layer, x: layer(x))
extend = nnx.jit(lambda layer, x, state: layer.extend(x, state))


@nnx.jit
def decode_all(layer, x):
    """Every token of x [batch, seq, embed] read one at a time, from the initial state."""

    def body(state, x_t):
        y_t, state = layer.extend(x_t[:, None], state)
        return state, y_t[:, 0]

    state, y = jax.lax.scan(body, layer.init_state(x.shape[0]), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(y, 0, 1), state


BOTH = [("linear", "mamba"), ("mlp", "mamba"), ("linear", "transformer"), ("mlp", "transformer")]


@pytest.mark.parametrize("inner,backbone", BOTH)
def test_step_by_step_decode_equals_full_forward(inner, backbone):
    layer = make_layer(inner, backbone)
    x = inputs(11)  # two whole mini-batches and a partial one
    full = forward(layer, x)
    decoded, _ = decode_all(layer, x)
    np.testing.assert_allclose(decoded, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inner,backbone", [("linear", "mamba"), ("mlp", "transformer")])
@pytest.mark.parametrize("prompt_len", [3, 10])  # inside the first mini-batch; after two and a partial one
def test_prompt_then_decode_continues_the_full_forward(inner, backbone, prompt_len):
    layer = make_layer(inner, backbone)
    x = inputs(13)
    full = forward(layer, x)
    prefix, state = extend(layer, x[:, :prompt_len], None)
    np.testing.assert_allclose(prefix, full[:, :prompt_len], rtol=1e-4, atol=1e-5)
    for t in range(prompt_len, x.shape[1]):
        y_t, state = extend(layer, x[:, t:t + 1], state)
        np.testing.assert_allclose(y_t[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inner,backbone", BOTH)
def test_reading_in_pieces_equals_one_pass(inner, backbone):
    """Five pieces of 3 tokens (mini-batch 4): the state stands inside a mini-batch (3, 6, 9) and at a
    boundary (12), and pieces cross boundaries; outputs and the final state equal one pass."""
    layer = make_layer(inner, backbone)
    x = inputs(15)
    whole, whole_state = extend(layer, x, None)
    pieces, state = [], None
    for start in range(0, 15, 3):
        y, state = extend(layer, x[:, start:start + 3], state)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), whole, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole_state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_inner_lr_scale_is_a_scaled_base_learning_rate(inner):
    """layer(x, s) is the same layer built with base_lr * s: the warmup only rescales eta."""
    x = inputs(2 * MINI_BATCH + 1)
    layer = make_layer(inner)
    scaled_config = make_layer(inner, base_lr=0.3 * layer.config.base_lr)
    y = nnx.jit(lambda layer, x, scale: layer(x, Context(inner_lr_scale=scale)))(layer, x, jnp.float32(0.3))
    np.testing.assert_allclose(y, forward(scaled_config, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, forward(layer, x), rtol=1e-3, atol=1e-5)  # the scale matters at all


def test_state_size_does_not_depend_on_context():
    layer = make_layer("mlp")
    shapes = [jax.tree.map(jnp.shape, nnx.eval_shape(lambda m, x: m.extend(x)[1], layer, inputs(n))) for n in (5, 37)]
    assert shapes[0] == shapes[1] == jax.tree.map(jnp.shape, layer.init_state(2))


def _rope(x, positions, theta=1e4):
    """x: [seq, heads, d] rotated pairwise (i, i + d/2), float64."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@pytest.mark.parametrize("inner,backbone", [("linear", "mamba"), ("mlp", "transformer")])
def test_layer_matches_numpy_composition_of_its_parameters(inner, backbone):
    """Projections, conv, RoPE, learning-rate gate, inner loop, post-norm, gate, output: in numpy."""
    layer = make_layer(inner, backbone)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
    x = np.asarray(inputs(9, batch=1), np.float64)[0]  # [seq, embed]
    seq_len, head_dim = x.shape[0], WIDTH // HEADS
    positions = np.arange(seq_len) % MINI_BATCH

    def project(name):
        return np.einsum("te,ehd->thd", x, p[name]["kernel"])

    def conv(u, w, b):
        padded = np.concatenate([np.zeros((w.shape[0] - 1,) + u.shape[1:]), u])
        return b + sum(w[j] * padded[j:j + seq_len] for j in range(w.shape[0]))

    if backbone == "mamba":
        qk = project("qk_proj")
        q, k = conv(qk, p["conv_q_weight"], p["conv_q_bias"]), conv(qk, p["conv_k_weight"], p["conv_k_bias"])
    else:
        q, k = project("q_proj"), project("k_proj")
    q, k, v = _rope(q, positions), _rope(k, positions), project("v_proj")
    eta = 1.0 / (1.0 + np.exp(-(x @ p["lr_weight"] + p["lr_bias"]))) / head_dim  # base_lr = 1
    to_heads = lambda a: np.swapaxes(a, 0, 1)[None]
    fast = {n: w[None] for n, w in p["fast_weights"].items()}
    z, _ = reference.ttt(inner, to_heads(q), to_heads(k), to_heads(v), eta.T[None], fast,
                         p["inner_ln_weight"], p["inner_ln_bias"], MINI_BATCH)
    y = np.swapaxes(z[0], 0, 1).reshape(seq_len, WIDTH)
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6) * p["post_norm"]["scale"] + p["post_norm"]["bias"]
    if backbone == "mamba":
        g = project("gate_proj").reshape(seq_len, WIDTH)
        y = reference.gelu(g) * y
    y = np.einsum("thd,hde->te", y.reshape(seq_len, HEADS, head_dim), p["o_proj"]["kernel"])
    np.testing.assert_allclose(forward(layer, jnp.asarray(x[None], jnp.float32))[0], y, rtol=1e-4, atol=1e-5)


def test_parameters_carry_logical_axis_names():
    layer = make_layer("mlp")
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(layer, nnx.Param)))
    assert tuple(specs["qk_proj"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(specs["o_proj"]["kernel"]) == ("heads", "head_dim", "embed")
    assert tuple(specs["fast_weights"]["W1"]) == ("heads", None, None)
    assert tuple(specs["lr_weight"]) == ("embed", "heads")
    assert tuple(specs["post_norm"]["scale"]) == ("embed",)


def test_gradients_reach_every_parameter():
    layer = make_layer("linear")
    x = inputs(10)

    def loss(model):
        return jnp.mean(model(x) ** 2)

    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(layer))
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


def test_bfloat16_compute_keeps_inner_state_in_float32():
    layer = make_layer("linear", dtype="bfloat16")
    x = inputs(10).astype(jnp.bfloat16)
    y, state = extend(layer, x, None)
    assert y.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state["ttt"]["params"]))
    reference_y = forward(make_layer("linear"), x.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(y - reference_y)) / jnp.max(jnp.abs(reference_y))) < 5e-2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="not divisible"):
        TTTLayerConfig(10, 3)
    with pytest.raises(ValueError, match="inner="):
        TTTLayerConfig(16, 2, inner="rnn")
    with pytest.raises(ValueError, match="mini_batch_size=0"):
        TTTLayerConfig(16, 2, mini_batch_size=0)
    assert math.isclose(TTTLayerConfig(16, 2).head_dim, 8)
