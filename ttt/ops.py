"""Public entry points of the TTT inner loop: pure functions, no module state.

Every function computes the inner loop of docs/MATH.md exactly, for any sequence length (a partial last
mini-batch included), in float32 whatever the input dtype, and is jit-able (keyword arguments
static), vmap-able and differentiable with respect to every array argument.

Shapes (B batch, H heads, T seq, d head_dim, b mini_batch_size):
  q, k, v: [B, H, T, d]        eta: [B, H, T]        token_scale: [b] (default 1/i)
  ln_weight, ln_bias: [H, d], or both None for no LayerNorm (f(x) = x + g(x))
  residual: True (default): f(x) = x + LN(g(x)) and the inner loss reconstructs v - k; False:
    f(x) = LN(g(x)) and it reconstructs v (with no LN either: f = g, the linear-attention limit)
  linear params: {"W": [B, H, d, d], "b": [B, H, d]}
  MLP params: {"W1": [B, H, d, 4d], "b1": [B, H, 4d], "W2": [B, H, 4d, d], "b2": [B, H, d]}
The step functions take one token: q, k, v: [B, H, d], eta: [B, H].
document_starts: bool [B, T] or None (ttt/documents.py): True where a packed document begins; the
fast weights restart there from the initial ones (the sequence functions' `params`, the extend
functions' `initial_params`) with an empty gradient sum. A start must fall where a mini-batch begins
(checked when concrete; when traced, a start inside a mini-batch restarts nothing).
A decode state is `{"params": fast weights at the start of the current mini-batch, "grad_sum": the
eta-weighted inner-gradient sum of its tokens so far, "position": int32 [] inside it}`; the extend
functions continue one from any position (traced or not) over any number of tokens.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from ttt import continuation, documents, mini_batch
from ttt import step as step_form
from ttt.inner_models import LINEAR, MLP, InnerModel
from ttt.layer_norm import layer_norm

Form = Literal["dual", "primal"]


def ttt_linear(q, k, v, eta, params, ln_weight, ln_bias, *, mini_batch_size: int, token_scale=None,
               form: Form = "dual", remat_group_size: int = 4, residual: bool = True, document_starts=None):
    """TTT-Linear over a sequence: `z_t = q_t + LN(q_t W_t + b_t)` (without `residual`: no `q_t +`).

    Returns:
      z: [B, H, T, d] in the dtype of q.
      final_params: float32 fast weights after the last token, same structure as `params`.
    """
    return _sequence(LINEAR, q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size, token_scale, form,
                     remat_group_size, residual, document_starts)


def ttt_mlp(q, k, v, eta, params, ln_weight, ln_bias, *, mini_batch_size: int, token_scale=None,
            form: Form = "dual", remat_group_size: int = 4, residual: bool = True, document_starts=None):
    """TTT-MLP over a sequence: `z_t = q_t + LN(gelu(q_t W1_t + b1_t) W2_t + b2_t)`. Returns (z, final_params)."""
    return _sequence(MLP, q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size, token_scale, form,
                     remat_group_size, residual, document_starts)


def init_decode_state(params):
    """Decode state before any token: `{"params", "grad_sum", "position"}` from fast weights `[B, H, ...]`."""
    return step_form.init_state(params)


def ttt_linear_step(q, k, v, eta, state, ln_weight, ln_bias, *, mini_batch_size: int, token_scale=None,
                    residual: bool = True):
    """One token of TTT-Linear. `q, k, v: [B, H, d]`, `eta: [B, H]`. Returns (z [B, H, d], state)."""
    return _step(LINEAR, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, token_scale, residual)


def ttt_mlp_step(q, k, v, eta, state, ln_weight, ln_bias, *, mini_batch_size: int, token_scale=None,
                 residual: bool = True):
    """One token of TTT-MLP. `q, k, v: [B, H, d]`, `eta: [B, H]`. Returns (z [B, H, d], state)."""
    return _step(MLP, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, token_scale, residual)


def ttt_linear_extend(q, k, v, eta, state, ln_weight, ln_bias, *, mini_batch_size: int, token_scale=None,
                      form: Form = "dual", remat_group_size: int = 4, residual: bool = True, document_starts=None,
                      initial_params=None):
    """TTT-Linear over T tokens read from a decode state. Returns (z [B, H, T, d], state after them).

    From `init_decode_state(params)` the outputs are those of `ttt_linear(..., params)`; reading a
    then b equals reading a + b, wherever the split falls inside a mini-batch. With `document_starts`,
    `initial_params` (the structure of the state's params) are the weights a document starts from.
    """
    return _extend(LINEAR, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, token_scale, form,
                   remat_group_size, residual, document_starts, initial_params)


def ttt_mlp_extend(q, k, v, eta, state, ln_weight, ln_bias, *, mini_batch_size: int, token_scale=None,
                   form: Form = "dual", remat_group_size: int = 4, residual: bool = True, document_starts=None,
                   initial_params=None):
    """TTT-MLP over T tokens read from a decode state. Returns (z [B, H, T, d], state after them)."""
    return _extend(MLP, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, token_scale, form,
                   remat_group_size, residual, document_starts, initial_params)


def _extend(model: InnerModel, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, token_scale, form,
            remat_group_size, residual, document_starts, initial_params):
    _check_sequence(q, k, v, eta, form, remat_group_size)
    batch, heads, seq_len, head_dim = q.shape
    ln_weight, ln_bias, token_scale, state = _check_state(model, state, batch, heads, head_dim, ln_weight, ln_bias,
                                                          mini_batch_size, token_scale)
    if document_starts is not None:
        documents.check_document_starts(document_starts, (batch, seq_len), mini_batch_size, state["position"])
        if initial_params is None:
            raise ValueError("document_starts needs initial_params: the fast weights a document starts from")
        _check_params(model, initial_params, batch, heads, head_dim)
        initial_params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), initial_params)
    q32, k32, v32, eta32 = _float32_inputs(q, k, v, eta, residual)
    inner_out, state = continuation.extend(model, q32, k32, v32, eta32, state, ln_weight, ln_bias,
                                           mini_batch_size=mini_batch_size, token_scale=token_scale, form=form,
                                           remat_group_size=remat_group_size, document_starts=document_starts,
                                           initial_params=initial_params)
    return _sequence_output(q, q32, inner_out, ln_weight, ln_bias, residual), state


def _sequence(model: InnerModel, q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size, token_scale, form,
              remat_group_size, residual, document_starts):
    _check_positive("mini_batch_size", mini_batch_size)
    _check_sequence(q, k, v, eta, form, remat_group_size)
    batch, heads, seq_len, head_dim = q.shape
    _check_params(model, params, batch, heads, head_dim)
    if document_starts is not None:
        documents.check_document_starts(document_starts, (batch, seq_len), mini_batch_size)
    ln_weight, ln_bias = _layer_norm_params(ln_weight, ln_bias, heads, head_dim)
    token_scale = _token_scale(token_scale, mini_batch_size)

    q32, k32, v32, eta32 = _float32_inputs(q, k, v, eta, residual)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    real, padded = mini_batch.num_mini_batches(seq_len, mini_batch_size, remat_group_size)
    q_mb, k_mb, v_mb = (mini_batch.split_tokens(x, mini_batch_size, padded) for x in (q32, k32, v32))
    eta_mb = mini_batch.split(eta32, mini_batch_size, padded)
    update = mini_batch.update_coefficients(eta_mb, token_scale, seq_len)

    restart_flags = None if document_starts is None else mini_batch.restarts(document_starts, mini_batch_size, padded)
    final_params, inner_out = mini_batch.scan_form(model, form, params, q_mb, k_mb, v_mb, eta_mb, token_scale,
                                                   update, ln_weight, ln_bias, min(remat_group_size, real),
                                                   restart_flags, params)
    inner_out = mini_batch.merge_tokens(inner_out, seq_len)
    return _sequence_output(q, q32, inner_out, ln_weight, ln_bias, residual), final_params


def _float32_inputs(q, k, v, eta, residual):
    """q, k, v, eta in float32, v shifted by k without the residual: the forms reconstruct `v - k`
    (the residual's target), and without the residual the target is v itself."""
    q32, k32, v32, eta32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v, eta))
    return q32, k32, v32 if residual else v32 + k32, eta32


def _layer_output(q, q32, inner_out, ln_weight, ln_bias, residual):
    """z = q + LN(g(q)) (without the residual: LN(g(q))) in q's dtype, from arrays whose last two axes are
    [heads, d] (one token [B, H, d], or a token-major sequence [B, T, H, d]) and LN parameters [heads, d]."""
    normalised = layer_norm(inner_out, ln_weight, ln_bias)
    return (q32 + normalised if residual else normalised).astype(q.dtype)


def _sequence_output(q, q32, inner_out, ln_weight, ln_bias, residual):
    """The layer output [B, H, T, d] from token-major inner outputs [B, T, H, d]. It is computed token-major,
    where a layer's projections are: the transposes here cancel the layer's instead of being repeated
    in every fusion of the backward that reads z. Batch and tokens are one axis for the LN: the gradients
    of its parameters then reduce over one axis, not over [batch, seq] with a batch of 1 kept, which
    XLA:CPU's default reductions run many times slower (benchmarks/xla_cpu.py)."""
    batch, seq_len, heads, head_dim = inner_out.shape
    rows = lambda x: x.reshape(batch * seq_len, heads, head_dim)
    z = _layer_output(q, rows(jnp.swapaxes(q32, 1, 2)), rows(inner_out), ln_weight, ln_bias, residual)
    return jnp.swapaxes(z.reshape(batch, seq_len, heads, head_dim), 1, 2)


def _step(model: InnerModel, q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size, token_scale, residual):
    _check_tokens(q, k, v, eta, ndim=3)
    batch, heads, head_dim = q.shape
    ln_weight, ln_bias, token_scale, state = _check_state(model, state, batch, heads, head_dim, ln_weight, ln_bias,
                                                          mini_batch_size, token_scale)
    q32, k32, v32, eta32 = _float32_inputs(q, k, v, eta, residual)
    inner_out, state = step_form.step(model, q32, k32, v32, eta32, state, ln_weight, ln_bias,
                                      mini_batch_size=mini_batch_size, token_scale=token_scale)
    return _layer_output(q, q32, inner_out, ln_weight, ln_bias, residual), state


def _check_state(model: InnerModel, state, batch, heads, head_dim, ln_weight, ln_bias, mini_batch_size, token_scale):
    """Checks a decode state and the per-head parameters beside it; returns them in float32."""
    _check_positive("mini_batch_size", mini_batch_size)
    if not isinstance(state, dict) or set(state) != {"params", "grad_sum", "position"}:
        raise ValueError("state must be the dict returned by init_decode_state, a step or an extend function")
    _check_params(model, state["params"], batch, heads, head_dim)
    _check_params(model, state["grad_sum"], batch, heads, head_dim)
    ln_weight, ln_bias = _layer_norm_params(ln_weight, ln_bias, heads, head_dim)
    # The position keeps its type: a concrete 0 lets the extend functions skip the mini-batch head.
    state = {**jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), {"params": state["params"],
                                                                   "grad_sum": state["grad_sum"]}),
             "position": state["position"]}
    return ln_weight, ln_bias, _token_scale(token_scale, mini_batch_size), state


def _check_sequence(q, k, v, eta, form, remat_group_size):
    """The checks shared by the sequence and extend functions: tokens [B, H, T >= 1, d], form, group size."""
    _check_positive("remat_group_size", remat_group_size)
    if form not in ("dual", "primal"):
        raise ValueError(f"form={form!r}; expected 'dual' or 'primal'")
    _check_tokens(q, k, v, eta, ndim=4)
    if q.shape[2] < 1:
        raise ValueError(f"q has seq length 0 (shape {q.shape}); expected at least one token")


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}; expected an int >= 1")


def _check_tokens(q, k, v, eta, ndim):
    """q: `ndim` dimensions, k and v its shape, eta its shape without head_dim; all floating."""
    _check_float_shape("q", q, None, ndim=ndim)
    _check_float_shape("k", k, q.shape)
    _check_float_shape("v", v, q.shape)
    _check_float_shape("eta", eta, q.shape[:-1])


def _check_float_shape(name, x, shape, ndim=None):
    x_shape = jnp.shape(x)
    if ndim is not None and len(x_shape) != ndim:
        raise ValueError(f"{name} has shape {x_shape}; expected {ndim} dimensions")
    if shape is not None and tuple(x_shape) != tuple(shape):
        raise ValueError(f"{name} has shape {x_shape}; expected {tuple(shape)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} has dtype {jnp.result_type(x)}; expected a floating dtype")


def _check_params(model: InnerModel, params, batch, heads, head_dim):
    expected = {name: (batch, heads, *shape) for name, shape in model.param_shapes(head_dim).items()}
    if not isinstance(params, dict) or set(params) != set(expected):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{model.name} params must have keys {sorted(expected)}; got {got}")
    for name, shape in expected.items():
        _check_float_shape(f"params[{name!r}]", params[name], shape)


def _layer_norm_params(ln_weight, ln_bias, heads, head_dim):
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must both be arrays or both be None")
    if ln_weight is None:
        return None, None
    _check_float_shape("ln_weight", ln_weight, (heads, head_dim))
    _check_float_shape("ln_bias", ln_bias, (heads, head_dim))
    return jnp.asarray(ln_weight, jnp.float32), jnp.asarray(ln_bias, jnp.float32)


def _token_scale(token_scale, mini_batch_size):
    if token_scale is None:
        return mini_batch.default_token_scale(mini_batch_size)
    _check_float_shape("token_scale", token_scale, (mini_batch_size,))
    return jnp.asarray(token_scale, jnp.float32)
