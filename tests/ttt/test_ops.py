"""ttt.ops against the float64 reference of docs/MATH.md: every form, both inner models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ttt import reference
from ttt import ops
from ttt.inner_models import LINEAR, MLP

BATCH, HEADS, HEAD_DIM = 2, 2, 8
MODELS = {"linear": LINEAR, "mlp": MLP}
_STATIC = ("mini_batch_size", "form", "remat_group_size")
SEQUENCE_FNS = {"linear": jax.jit(ops.ttt_linear, static_argnames=_STATIC), "mlp": jax.jit(ops.ttt_mlp, static_argnames=_STATIC)}
STEP_FNS = {"linear": ops.ttt_linear_step, "mlp": ops.ttt_mlp_step}


def make_inputs(kind, seq_len, seed=0, layer_norm=True):
    """Random inputs on the scale the layer uses: unit q/k/v, eta in (0, 2 / head_dim)."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, HEADS, seq_len, HEAD_DIM)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
    eta = (rng.uniform(0.1, 2.0, size=shape[:3]) / HEAD_DIM).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), BATCH * HEADS)
    per_head = [MODELS[kind].init(key, HEAD_DIM) for key in keys]
    # Larger than the 0.02 init so that the fast weights matter to the output.
    params = {
        name: 10.0 * np.stack([np.asarray(p[name]) for p in per_head]).reshape(BATCH, HEADS, *per_head[0][name].shape)
        for name in per_head[0]
    }
    for name in params:
        if name.startswith("b"):
            params[name] = rng.normal(scale=0.1, size=params[name].shape).astype(np.float32)
    if layer_norm:
        ln_weight = (1.0 + 0.2 * rng.normal(size=(HEADS, HEAD_DIM))).astype(np.float32)
        ln_bias = (0.2 * rng.normal(size=(HEADS, HEAD_DIM))).astype(np.float32)
    else:
        ln_weight = ln_bias = None
    return q, k, v, eta, params, ln_weight, ln_bias


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@functools.cache
def reference_output(kind, seq_len, mini_batch_size, layer_norm):
    return reference.ttt(kind, *make_inputs(kind, seq_len, layer_norm=layer_norm), mini_batch_size)


def run_steps(kind, q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size):
    """All tokens through the step function under one jitted scan; returns (z [B,H,T,d], final state)."""

    @jax.jit
    def scan(q, k, v, eta, params, ln_weight, ln_bias):
        def body(state, token):
            qt, kt, vt, et = token
            return STEP_FNS[kind](qt, kt, vt, et, state, ln_weight, ln_bias, mini_batch_size=mini_batch_size)[::-1]

        tokens = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, eta))
        state, z = jax.lax.scan(body, ops.init_decode_state(params), tokens)
        return jnp.moveaxis(z, 0, 2), state

    return scan(q, k, v, eta, params, ln_weight, ln_bias)


CASES = [(16, 16), (37, 8), (5, 16), (11, 1)]  # (seq, mini_batch_size): exact, partial, shorter than b, b = 1


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "no_ln"])
@pytest.mark.parametrize("seq_len,mini_batch_size", CASES)
def test_sequence_forms_match_float64_reference(kind, layer_norm, seq_len, mini_batch_size):
    z_ref, final_ref = reference_output(kind, seq_len, mini_batch_size, layer_norm)
    inputs = make_inputs(kind, seq_len, layer_norm=layer_norm)
    for form in ("dual", "primal"):
        z, final = SEQUENCE_FNS[kind](*inputs, mini_batch_size=mini_batch_size, form=form)
        assert z.dtype == jnp.float32
        assert relative_error(z, z_ref) < 1e-4, form
        for name in final_ref:
            assert final[name].dtype == jnp.float32
            assert relative_error(final[name], final_ref[name]) < 1e-4, (form, name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "no_ln"])
def test_inputs_make_the_inner_updates_matter(kind, layer_norm):
    """Guards the tests above against passing trivially: learning must change the outputs."""
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs(kind, 37, layer_norm=layer_norm)
    z_learning, _ = reference_output(kind, 37, 8, layer_norm)
    z_frozen, _ = reference.ttt(kind, q, k, v, 0 * eta, params, ln_weight, ln_bias, 8)
    assert relative_error(z_learning, z_frozen) > 0.05


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "no_ln"])
@pytest.mark.parametrize("seq_len,mini_batch_size", CASES)
def test_step_form_matches_float64_reference(kind, layer_norm, seq_len, mini_batch_size):
    z_ref, final_ref = reference_output(kind, seq_len, mini_batch_size, layer_norm)
    z, state = run_steps(kind, *make_inputs(kind, seq_len, layer_norm=layer_norm), mini_batch_size)
    assert relative_error(z, z_ref) < 1e-4
    position = seq_len % mini_batch_size
    assert int(state["position"]) == position
    # Mid-mini-batch the state holds the start weights and the gradient sum; the weights of
    # the last token are start - s_i * grad_sum.
    scale = 1.0 / max(position, 1)
    for name in final_ref:
        last = state["params"][name] - (scale if position else 0.0) * state["grad_sum"][name]
        assert relative_error(last, final_ref[name]) < 1e-4, name


EXTEND_FNS = {"linear": ops.ttt_linear_extend, "mlp": ops.ttt_mlp_extend}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["dual", "primal"])
def test_reading_in_pieces_from_decode_states_matches_float64_reference(kind, form):
    """11 tokens read in pieces of 3, 3, 3, 2 (mini-batch 4): from the initial state, from states inside
    a mini-batch (3, 6, 9) and across boundaries. Outputs match the reference; the final state is the
    one the step form reaches (start weights and gradient sum of the partial mini-batch)."""
    seq_len, mini_batch_size = 11, 4
    inputs = make_inputs(kind, seq_len)
    q, k, v, eta, params, ln_weight, ln_bias = inputs
    z_ref, _ = reference_output(kind, seq_len, mini_batch_size, True)

    @jax.jit
    def read_in_pieces(q, k, v, eta, params):
        state, outputs = ops.init_decode_state(params), []
        for start in range(0, seq_len, 3):
            piece = (x[:, :, start:start + 3] for x in (q, k, v, eta))
            z, state = EXTEND_FNS[kind](*piece, state, ln_weight, ln_bias, mini_batch_size=mini_batch_size, form=form)
            outputs.append(z)
        return jnp.concatenate(outputs, axis=2), state

    z, state = read_in_pieces(q, k, v, eta, params)
    assert relative_error(z, z_ref) < 1e-4
    _, stepped = run_steps(kind, *inputs, mini_batch_size)
    assert int(state["position"]) == int(stepped["position"]) == seq_len % mini_batch_size
    for part in ("params", "grad_sum"):
        for name in stepped[part]:
            assert relative_error(state[part][name], stepped[part][name]) < 1e-4, (part, name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_reference_gradient_matches_finite_differences(kind):
    """The reference's hand-derived inner gradient is itself checked numerically."""
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs(kind, 1)
    theta = {n: np.asarray(p[0, 0], np.float64) for n, p in params.items()}
    args = (k[0, 0, 0].astype(np.float64), v[0, 0, 0].astype(np.float64), ln_weight[0], ln_bias[0])
    analytic = reference.grad(kind, theta, *args)
    rng = np.random.default_rng(1)
    for name in theta:
        direction = rng.normal(size=theta[name].shape)
        eps = 1e-6
        plus = {**theta, name: theta[name] + eps * direction}
        minus = {**theta, name: theta[name] - eps * direction}
        numeric = (reference.loss(kind, plus, *args) - reference.loss(kind, minus, *args)) / (2 * eps)
        assert np.isclose(np.sum(analytic[name] * direction), numeric, rtol=1e-6, atol=1e-9), name


def test_linear_attention_limit():
    """Linear g, no LN, W0 = 0, one mini-batch, s_i = eta = 1: causal linear attention.

    The ops keep the residual (f = x + g, target v - k) and train the bias c too, which is the
    theorem applied to inputs augmented with a constant 1 ([x, 1] @ [W; c]). So g(q_t) = z_t - q_t
    must equal sum_{j <= t} (q_t . k_j + 1)(v_j - k_j): linear attention with values v - k.
    """
    seq_len = 24
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(BATCH, HEADS, seq_len, HEAD_DIM)).astype(np.float32) for _ in range(3))
    zeros = {"W": np.zeros((BATCH, HEADS, HEAD_DIM, HEAD_DIM), np.float32), "b": np.zeros((BATCH, HEADS, HEAD_DIM), np.float32)}
    ones = np.ones((BATCH, HEADS, seq_len), np.float32)
    scores = np.tril(np.einsum("bhtd,bhsd->bhts", q.astype(np.float64), k.astype(np.float64)) + 1.0)
    expected = np.einsum("bhts,bhsd->bhtd", scores, (v - k).astype(np.float64))
    for form in ("dual", "primal"):
        z, _ = ops.ttt_linear(q, k, v, ones, zeros, None, None, mini_batch_size=seq_len,
                              token_scale=np.ones(seq_len, np.float32), form=form)
        assert relative_error(np.asarray(z) - q, expected) < 1e-5, form


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["dual", "primal"])
def test_outer_gradients_match_finite_differences_of_reference(kind, form):
    """jax.grad through the inner loop (float32) vs central differences of the float64 reference."""
    seq_len, mini_batch_size = 11, 4
    inputs = list(make_inputs(kind, seq_len))
    names = ["q", "k", "v", "eta", "params", "ln_weight", "ln_bias"]
    rng = np.random.default_rng(7)
    probe = rng.normal(size=(BATCH, HEADS, seq_len, HEAD_DIM))

    def ours(*args):
        z, final = SEQUENCE_FNS[kind](*args, mini_batch_size=mini_batch_size, form=form)
        return jnp.sum(z * probe) + sum(jnp.sum(p) for p in final.values())

    def theirs(*args):
        z, final = reference.ttt(kind, *args, mini_batch_size)
        return np.sum(z * probe) + sum(np.sum(p) for p in final.values())

    grads = jax.grad(ours, argnums=tuple(range(7)))(*inputs)
    for index, name in enumerate(names):
        direction = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), inputs[index])
        eps = 1e-5
        shifted = [jax.tree.map(lambda x, d: np.asarray(x, np.float64) + sign * eps * d, inputs[index], direction) for sign in (1, -1)]
        numeric = (theirs(*inputs[:index], shifted[0], *inputs[index + 1:]) - theirs(*inputs[:index], shifted[1], *inputs[index + 1:])) / (2 * eps)
        analytic = sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(jax.tree.leaves(grads[index]), jax.tree.leaves(direction)))
        assert abs(analytic - numeric) <= 1e-3 * max(abs(numeric), 1.0), (name, analytic, numeric)


def test_jit_matches_eager_and_vmap_matches_a_loop():
    inputs = make_inputs("linear", 6)
    eager, eager_final = ops.ttt_linear(*inputs, mini_batch_size=4)
    jitted, jitted_final = SEQUENCE_FNS["linear"](*inputs, mini_batch_size=4)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted_final["W"], eager_final["W"], rtol=1e-5, atol=1e-6)

    # vmap over a leading ensemble axis of every input == a loop over it.
    single = [make_inputs("mlp", 13, seed=seed) for seed in (0, 1)]
    stacked = jax.tree.map(lambda a, b: np.stack([a, b]), *single)
    batched, batched_final = jax.jit(jax.vmap(functools.partial(ops.ttt_mlp, mini_batch_size=4)))(*stacked)
    for i, inputs in enumerate(single):
        z, final = SEQUENCE_FNS["mlp"](*inputs, mini_batch_size=4)
        np.testing.assert_allclose(batched[i], z, rtol=1e-5, atol=1e-5)
        for name in final:
            np.testing.assert_allclose(batched_final[name][i], final[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bfloat16_inputs_run_the_inner_loop_in_float32(kind):
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs(kind, 19)
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, eta)]
    z, final = SEQUENCE_FNS[kind](*as_bf16, params, ln_weight, ln_bias, mini_batch_size=8)
    assert z.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in final.values())
    # Same computation on the bf16 values upcast: only the output rounding may differ.
    z32, final32 = SEQUENCE_FNS[kind](*[x.astype(jnp.float32) for x in as_bf16], params, ln_weight, ln_bias, mini_batch_size=8)
    assert relative_error(z, z32) < 1e-2
    for name in final:
        np.testing.assert_array_equal(final[name], final32[name])


def test_bad_inputs_raise_clear_errors():
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs("linear", 8)
    with pytest.raises(ValueError, match="mini_batch_size=0"):
        ops.ttt_linear(q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=0)
    with pytest.raises(ValueError, match="k has shape"):
        ops.ttt_linear(q, k[:, :, :4], v, eta, params, ln_weight, ln_bias, mini_batch_size=4)
    with pytest.raises(ValueError, match="eta has shape"):
        ops.ttt_linear(q, k, v, eta[..., None], params, ln_weight, ln_bias, mini_batch_size=4)
    with pytest.raises(ValueError, match="floating"):
        ops.ttt_linear(q.astype(np.int32), k, v, eta, params, ln_weight, ln_bias, mini_batch_size=4)
    with pytest.raises(ValueError, match="keys"):
        ops.ttt_mlp(q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=4)
    with pytest.raises(ValueError, match="ln_weight has shape"):
        ops.ttt_linear(q, k, v, eta, params, ln_weight[0], ln_bias, mini_batch_size=4)
    with pytest.raises(ValueError, match="token_scale has shape"):
        ops.ttt_linear(q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=4, token_scale=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="form="):
        ops.ttt_linear(q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=4, form="fast")
    with pytest.raises(ValueError, match="4 dimensions"):
        ops.ttt_linear(q[0], k, v, eta, params, ln_weight, ln_bias, mini_batch_size=4)
    state = ops.init_decode_state(params)
    with pytest.raises(ValueError, match="eta has shape"):
        ops.ttt_linear_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], eta, state, ln_weight, ln_bias, mini_batch_size=4)
