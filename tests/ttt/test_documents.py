"""Document starts in packed rows: the inner loop restarts from its initial weights, so a packed row computes,
for every document, what each document computes alone; the convolution reads nothing across a start."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ttt.test_ops import EXTEND_FNS, SEQUENCE_FNS, make_inputs
from ttt import ops
from ttt.conv import causal_depthwise_conv, next_history

MINI_BATCH, SEQ = 4, 15
# Row 0 packs tokens 0:8 and 8:15 (a partial last mini-batch); row 1 packs 0:4 and 4:15.
STARTS = np.zeros((2, SEQ), bool)
STARTS[0, 8] = STARTS[1, 4] = True
DOCUMENTS = {0: [(0, 8), (8, SEQ)], 1: [(0, 4), (4, SEQ)]}


def sequence(kind, form, inputs, document_starts=None):
    q, k, v, eta, params, ln_weight, ln_bias = inputs
    return SEQUENCE_FNS[kind](q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=MINI_BATCH, form=form,
                              document_starts=document_starts)


def piece(inputs, start, end):
    q, k, v, eta, params, ln_weight, ln_bias = inputs
    return (*(x[:, :, start:end] for x in (q, k, v, eta)), params, ln_weight, ln_bias)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["dual", "primal"])
def test_a_packed_row_computes_each_document_alone(kind, form):
    inputs = make_inputs(kind, SEQ)
    z, final = sequence(kind, form, inputs, STARTS)
    for row, spans in DOCUMENTS.items():
        for start, end in spans:
            alone, alone_final = sequence(kind, form, piece(inputs, start, end))
            np.testing.assert_allclose(z[row, :, start:end], alone[row], rtol=1e-5, atol=1e-5,
                                       err_msg=f"row {row}, document {start}:{end}")
        for name in final:  # the last document's weights
            np.testing.assert_allclose(final[name][row], alone_final[name][row], rtol=1e-5, atol=1e-5)
    unpacked, _ = sequence(kind, form, inputs)
    assert not np.allclose(z[0, :, 8:], unpacked[0, :, 8:], atol=1e-3), "without the restart B would differ"


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["dual", "primal"])
def test_reading_in_pieces_from_traced_states_restarts_at_the_same_starts(kind, form):
    """Pieces 0:2, 2:8, 8:15, each from a state passed into jit (a traced position): row 0's start opens the
    last piece (the restart of the current mini-batch), row 1's falls inside the second (a restart in the scan)."""
    inputs = make_inputs(kind, SEQ)
    q, k, v, eta, params, ln_weight, ln_bias = inputs
    z_packed, final = sequence(kind, form, inputs, STARTS)

    @jax.jit
    def extend(q, k, v, eta, state, starts):
        return EXTEND_FNS[kind](q, k, v, eta, state, ln_weight, ln_bias, mini_batch_size=MINI_BATCH, form=form,
                                document_starts=starts, initial_params=params)

    state, outputs = ops.init_decode_state(params), []
    for start, end in [(0, 2), (2, 8), (8, SEQ)]:
        z, state = extend(*piece(inputs, start, end)[:4], state, STARTS[:, start:end])
        outputs.append(z)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=2), z_packed, rtol=1e-5, atol=1e-5)
    assert int(state["position"]) == SEQ % MINI_BATCH
    for name in final:  # the weights at the start of the partial mini-batch, the last restart's
        _, alone = sequence(kind, form, piece(inputs, 8, 12))
        np.testing.assert_allclose(state["params"][name][0], alone[name][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_without_starts_the_outputs_are_bitwise_unchanged(kind):
    inputs = make_inputs(kind, SEQ)
    z, final = sequence(kind, "dual", inputs)
    z_false, final_false = sequence(kind, "dual", inputs, np.zeros((2, SEQ), bool))
    np.testing.assert_array_equal(z_false, z)
    for name in final:
        np.testing.assert_array_equal(final_false[name], final[name])


def test_a_start_inside_a_mini_batch_is_an_error():
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs("linear", SEQ)
    starts = np.zeros((2, SEQ), bool)
    starts[1, 6] = True
    with pytest.raises(ValueError, match=r"document_starts\[1, 6\] is a document start 2 tokens into a TTT "
                                         r"mini-batch of 4"):
        ops.ttt_linear(q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=MINI_BATCH, document_starts=starts)
    # From a state 2 tokens into its mini-batch, token 2 is a boundary and token 1 is not.
    state = ops.ttt_linear_extend(*(x[:, :, :2] for x in (q, k, v, eta)), ops.init_decode_state(params), ln_weight,
                                  ln_bias, mini_batch_size=MINI_BATCH)[1]
    rest = tuple(x[:, :, 2:] for x in (q, k, v, eta))
    with pytest.raises(ValueError, match=r"document_starts\[1, 4\] is a document start 2 tokens into"):
        ops.ttt_linear_extend(*rest, state, ln_weight, ln_bias, mini_batch_size=MINI_BATCH, document_starts=starts[:, 2:],
                              initial_params=params)
    with pytest.raises(ValueError, match="needs initial_params"):
        ops.ttt_linear_extend(*rest, state, ln_weight, ln_bias, mini_batch_size=MINI_BATCH,
                              document_starts=np.zeros((2, SEQ - 2), bool))
    with pytest.raises(ValueError, match=r"expected bool \(2, 15\)"):
        ops.ttt_linear(q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=MINI_BATCH,
                       document_starts=starts.astype(np.int32))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradients_flow_through_the_restart(kind):
    q, k, v, eta, params, ln_weight, ln_bias = make_inputs(kind, SEQ)

    @functools.partial(jax.jit, static_argnames="form")
    def grads(params, q, form):
        def loss(params, q):
            z, _ = SEQUENCE_FNS[kind](q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size=MINI_BATCH,
                                      form=form, document_starts=STARTS)
            return jnp.sum(z ** 2)

        return jax.grad(loss, argnums=(0, 1))(params, q)

    for form in ("dual", "primal"):
        grad_params, grad_q = grads(params, q, form)
        for leaf in (*jax.tree.leaves(grad_params), grad_q):
            assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), form


def test_the_convolution_reads_nothing_before_a_start():
    rng = np.random.default_rng(0)
    x, weight, bias = rng.normal(size=(2, 10, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3,))
    history = rng.normal(size=(2, 3, 3))
    starts = np.zeros((2, 10), bool)
    starts[0, 5] = starts[1, 1] = True
    y = causal_depthwise_conv(x, weight, bias, history, starts)
    zeros = np.zeros_like(history)
    np.testing.assert_allclose(y[0, :5], causal_depthwise_conv(x[:1, :5], weight, bias, history[:1])[0])
    np.testing.assert_allclose(y[0, 5:], causal_depthwise_conv(x[:1, 5:], weight, bias, zeros[:1])[0])
    np.testing.assert_allclose(y[1, 1:], causal_depthwise_conv(x[1:, 1:], weight, bias, zeros[1:])[0])
    # The history after x holds only the last document's inputs: row 1's reaches back before its start.
    short = starts.copy()
    short[1, 8] = True
    after = next_history(history, x, short)
    np.testing.assert_allclose(after[0], x[0, -3:])
    np.testing.assert_allclose(after[1], np.concatenate([np.zeros((1, 3)), x[1, -2:]]))
    np.testing.assert_array_equal(causal_depthwise_conv(x, weight, bias, history, np.zeros((2, 10), bool)),
                                  causal_depthwise_conv(x, weight, bias, history))
