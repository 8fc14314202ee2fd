"""The ablation switches of the TTT layer (Sun et al. 2024, Table 1; configs/ttt.py): each one off removes
its ingredient, the linear-attention limit holds exactly, and the layer still decodes what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ttt
from tests.ttt.test_layer import HEADS, WIDTH, decode_all, forward, inputs, make_layer
from tests.ttt.test_ops import BATCH, HEAD_DIM, relative_error
from ttt import configs, ops
from ttt.configs import TTTLayerConfig
from ttt.context import Context
from ttt.models import LM

ALL_OFF = dict(inner_norm=False, learn_initial_weights=False, learn_inner_lr=False, learn_token_scale=False)
SWITCH_PARAMS = {"inner_norm": ("inner_ln_weight", "inner_ln_bias"), "learn_initial_weights": ("fast_weights",),
                 "learn_inner_lr": ("lr_weight", "lr_bias"), "learn_token_scale": ("token_scale_offset",)}


def param_names(layer) -> set[str]:
    return {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


@pytest.mark.parametrize("switch", sorted(SWITCH_PARAMS))
def test_each_switch_off_removes_exactly_its_parameters(switch):
    assert param_names(make_layer()) - param_names(make_layer(**{switch: False})) == set(SWITCH_PARAMS[switch])


def test_fixed_initial_weights_are_zero_and_get_no_gradient():
    layer = make_layer(learn_initial_weights=False)
    state = layer.init_state(2)["ttt"]["params"]
    assert all(not np.any(w) for w in jax.tree.leaves(state))
    grads = nnx.grad(lambda layer: jnp.sum(layer(inputs(6)) ** 2))(layer)
    assert "fast_weights" not in {str(path[0]) for path, _ in nnx.to_flat_state(grads)}


def test_fixed_inner_lr_is_base_lr_over_head_dim_and_follows_the_warmup_scale():
    layer = make_layer(learn_inner_lr=False, base_lr=0.5)
    x = inputs(7)
    q = k = jnp.zeros((2, 7, HEADS, WIDTH // HEADS))
    for scale in (1.0, 0.1):
        eta = layer._finish_projection(x, q, k, q, jnp.arange(7) % 4, scale)[3]
        assert eta.shape == (2, HEADS, 7)
        np.testing.assert_allclose(eta, scale * 0.5 / (WIDTH // HEADS), rtol=1e-7)


def test_fixed_token_scale_is_one_over_i():
    np.testing.assert_allclose(make_layer(learn_token_scale=False)._token_scale(), 1 / np.arange(1, 5), rtol=1e-7)


@pytest.mark.parametrize("inner,backbone", [("linear", "transformer"), ("mlp", "mamba")])
def test_every_switch_off_still_decodes_what_the_forward_computes(inner, backbone):
    """The step form (one token) and the sequence form agree without LN, residual, W0, gate and offset."""
    layer = make_layer(inner, backbone, **ALL_OFF)
    x = inputs(11)
    np.testing.assert_allclose(decode_all(layer, x)[0], forward(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["dual", "primal"])
def test_ops_without_residual_and_ln_are_scaled_causal_linear_attention(form):
    """Linear g, no LN, no residual (f = g, l = 1/2 ||k W + c - v||^2), W0 = 0, c0 = 0, one mini-batch
    holding the whole sequence: every gradient is taken at 0, grad_W = -k_j^T v_j and grad_c = -v_j, so
    theta_t = s_t sum_{j <= t} eta_j (k_j^T v_j, v_j) and

        z_t = g(q_t; theta_t) = s_t * sum_{j <= t} eta_j (q_t . k_j + 1) v_j

    (docs/MATH.md), with the per-position scale s_t and the per-token rates eta_j as given: causal linear
    attention whose keys carry a constant 1 (the bias c), for the sequence form, the extend form from the
    initial state in two pieces, and token by token."""
    seq_len = 10
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(BATCH, HEADS, seq_len, HEAD_DIM)).astype(np.float32) for _ in range(3))
    eta = rng.uniform(0.1, 1.0, size=(BATCH, HEADS, seq_len)).astype(np.float32)
    scale = (1 / np.arange(1, seq_len + 1)).astype(np.float32)
    zeros = {"W": np.zeros((BATCH, HEADS, HEAD_DIM, HEAD_DIM), np.float32),
             "b": np.zeros((BATCH, HEADS, HEAD_DIM), np.float32)}
    scores = np.tril(np.einsum("bhtd,bhsd->bhts", q, k).astype(np.float64) + 1.0) * eta[:, :, None, :]
    expected = scale[:, None] * np.einsum("bhts,bhsd->bhtd", scores, v.astype(np.float64))
    run = dict(mini_batch_size=seq_len, token_scale=scale, residual=False)
    z, _ = ops.ttt_linear(q, k, v, eta, zeros, None, None, form=form, **run)
    assert relative_error(np.asarray(z), expected) < 1e-5
    state = ops.init_decode_state(zeros)
    first, state = ops.ttt_linear_extend(q[:, :, :3], k[:, :, :3], v[:, :, :3], eta[:, :, :3], state, None, None,
                                         form=form, **run)
    rest, state = ops.ttt_linear_extend(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], eta[:, :, 3:], state, None, None,
                                        form=form, **run)
    assert relative_error(np.concatenate([first, rest], axis=2), expected) < 1e-5
    state, steps = ops.init_decode_state(zeros), []
    for t in range(seq_len):
        z_t, state = ops.ttt_linear_step(q[:, :, t], k[:, :, t], v[:, :, t], eta[:, :, t], state, None, None, **run)
        steps.append(z_t)
    assert relative_error(np.stack(steps, axis=2), expected) < 1e-5


def _rope_half(x, theta):
    """RoPE on (i, i + d/2) pairs at positions 0..T-1, in numpy. x: [batch, seq, heads, d]."""
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def test_layer_with_every_ingredient_off_and_one_mini_batch_is_linear_attention():
    """The first row of Table 1 (Sun et al. 2024, section 2.6, "TTT equivalence"): TTT-Linear with the
    Transformer backbone, no LN or residual in f, W0 = 0 fixed, eta = base_lr / d fixed, s_i = 1/i fixed
    and one mini-batch holding the whole sequence. With q, k (RoPE at their positions) and v the
    projections of x, the layer reads

        z_t = (base_lr / (d t)) * sum_{j <= t} (q_t . k_j + 1) v_j          (per head)
        y_t = o_proj(post_norm(z_t))

    computed here independently in numpy from the layer's parameters. (post_norm, a LayerNorm over all
    heads of a token, cancels the per-token factor base_lr / (d t) up to its epsilon; the factor itself is
    checked by the ops test above.)"""
    seq_len = 12
    config = TTTLayerConfig(WIDTH, HEADS, inner="linear", backbone="transformer", mini_batch_size=seq_len,
                            base_lr=0.5, init_std=0.3, **ALL_OFF)
    layer = ttt.TTTLayer(config, rngs=nnx.Rngs(0))
    x = np.asarray(inputs(seq_len), np.float64)
    project = lambda proj: np.einsum("bte,ehd->bthd", x, np.asarray(proj.kernel[...], np.float64))
    q, k = (_rope_half(project(p), layer.config.rope_theta) for p in (layer.q_proj, layer.k_proj))
    v = project(layer.v_proj)
    head_dim = WIDTH // HEADS
    scores = np.tril(np.einsum("bthd,bshd->bhts", q, k) + 1.0)
    z = np.einsum("bhts,bshd->bthd", scores, v) * (0.5 / head_dim / np.arange(1, seq_len + 1))[None, :, None, None]
    z = z.reshape(*z.shape[:2], WIDTH)
    centred = z - z.mean(-1, keepdims=True)
    normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + layer.config.norm_eps)
    normed = normed * np.asarray(layer.post_norm.scale[...]) + np.asarray(layer.post_norm.bias[...])
    expected = np.einsum("bthd,hde->bte", normed.reshape(*z.shape[:2], HEADS, head_dim),
                         np.asarray(layer.o_proj.kernel[...], np.float64))
    assert relative_error(np.asarray(forward(layer, inputs(seq_len))), expected) < 1e-4


def test_model_config_switches_reach_every_ttt_layer():
    config = configs.get("hybrid-tiny", num_layers=2, ttt=configs.TTTConfig(**ALL_OFF))
    model = LM(config, rngs=nnx.Rngs(0))
    assert all(getattr(config.ttt_layer_config("ttt_linear"), name) is False for name in ALL_OFF)
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any(part in name for name in names for parts in SWITCH_PARAMS.values() for part in parts)
    ids = jnp.zeros((1, 9), jnp.int32)
    assert np.isfinite(model.loss(ids, context=Context(inner_lr_scale=0.5))[0])
