"""Document starts through the LM: a packed row computes, for every document, the logits of that document
alone, with every mixer kind and the pre-convolution; sliding-window attention stops at a start blockwise."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.models.test_lm import BASE, PATTERNS, make_config
from ttt.context import Context
from ttt.models import LM
from ttt.models.sliding_window import sliding_window_attention

SEQ = 15
# Row 0 packs tokens 0:8 and 8:15; row 1 packs 0:4 and 4:15 (mini-batch 4, window 5).
STARTS = np.zeros((2, SEQ), bool)
STARTS[0, 8] = STARTS[1, 4] = True
SECOND = {0: 8, 1: 4}
IDS = np.asarray(jax.random.randint(jax.random.key(1), (2, SEQ), 0, BASE.vocab_size))


def make_model(name: str) -> LM:
    return LM(dataclasses.replace(make_config(name), pre_conv=True), rngs=nnx.Rngs(0))


forward = nnx.jit(lambda model, ids, starts: model(ids, Context(document_starts=starts)))
extend = nnx.jit(lambda model, ids, cache, starts: model.extend(ids, cache, Context(document_starts=starts)))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_a_packed_row_computes_each_document_alone(name):
    """The first document is a prefix of the row; the second, alone, is the row rolled to start with it (what
    follows a document cannot change it). Same shapes throughout, so one compiled forward serves all."""
    model = make_model(name)
    no_starts = np.zeros_like(STARTS)
    packed = forward(model, IDS, STARTS)
    first_alone = forward(model, IDS, no_starts)
    second_alone = forward(model, np.stack([np.roll(IDS[row], -start) for row, start in SECOND.items()]), no_starts)
    for row, start in SECOND.items():
        np.testing.assert_allclose(packed[row, :start], first_alone[row, :start], atol=2e-5, err_msg=f"row {row}")
        np.testing.assert_allclose(packed[row, start:], second_alone[row, :SEQ - start], atol=2e-5,
                                   err_msg=f"row {row}")
    assert not np.allclose(packed[0, 8:], first_alone[0, 8:], atol=1e-3), "the second document saw the first"
    # All False computes what None computes. They compile to different programs (the scan carries a restart
    # select), which XLA may fuse and round differently: equal to float32 rounding, not bitwise.
    np.testing.assert_allclose(nnx.jit(lambda m, ids: m(ids))(model, IDS), first_alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_reading_in_pieces_from_a_cache_restarts_at_the_same_starts(name):
    """Pieces 0:2, 2:10, 10:15: from a TTT state 2 tokens into a mini-batch, and from convolution histories
    that reach back before row 0's start (they must hold zeros there)."""
    model = make_model(name)
    packed = forward(model, IDS, STARTS)
    cache, pieces = None, []
    for start, end in [(0, 2), (2, 10), (10, SEQ)]:
        logits, cache = extend(model, IDS[:, start:end], cache, STARTS[:, start:end])
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), packed, atol=2e-5)


def test_attention_refuses_document_starts_from_a_cache():
    model = make_model("hybrid")
    _, cache = model.extend(IDS[:, :2])
    with pytest.raises(ValueError, match="only from an empty cache"):
        model.extend(IDS[:, 2:], cache, Context(document_starts=STARTS[:, 2:]))


def test_a_start_inside_a_ttt_mini_batch_is_an_error_and_attention_takes_any_start():
    starts = np.zeros_like(STARTS)
    starts[1, 6] = True
    with pytest.raises(ValueError, match=r"document_starts\[1, 6\] is a document start 2 tokens into a TTT mini-batch"):
        make_model("hybrid")(IDS, Context(document_starts=starts))
    with pytest.raises(ValueError, match=r"expected bool \(2, 15\)"):
        make_model("attention")(IDS, Context(document_starts=starts[:, :-1]))
    assert np.all(np.isfinite(make_model("attention")(IDS, Context(document_starts=starts))))


def test_the_loss_takes_starts_aligned_with_ids_and_gradients_flow():
    model = make_model("hybrid")
    ids = np.concatenate([IDS, IDS[:, :1]], axis=1)  # 16 ids: the forward reads 15, STARTS' shape
    starts = np.concatenate([STARTS, np.zeros((2, 1), bool)], axis=1)

    @nnx.jit
    def loss_and_grads(model, ids, starts):
        return nnx.value_and_grad(lambda m: m.loss(ids, context=Context(document_starts=starts))[0])(model)

    loss, grads = loss_and_grads(model, ids, starts)
    _, per_token = model.loss(ids)
    packed_loss, packed_per_token = model.loss(ids, context=Context(document_starts=starts))
    assert np.isclose(loss, packed_loss) and not np.allclose(packed_per_token, per_token)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert np.any(np.asarray(grads.stages[0].blocks[0].mixer.fast_weights["W"][...]) != 0)


@pytest.mark.parametrize("chunk_size", [512, 8], ids=["blocks", "chunked_scan"])
def test_sliding_window_attention_reads_only_its_own_document(chunk_size):
    """Blocks of 4 (several blocks; with chunk_size 8, a scan over chunks) against dense attention whose mask
    is the window, causality and the document."""
    rng = np.random.default_rng(0)
    query, key, value = (rng.normal(size=(2, 19, 4, 8)).astype(np.float32) for _ in range(3))
    segments = np.cumsum(rng.uniform(size=(2, 19)) < 0.2, axis=1).astype(np.int32)
    window = 6
    out = sliding_window_attention(query, key, value, window, segment_ids=segments, block_size=4,
                                   chunk_size=chunk_size)
    distance = np.arange(19)[:, None] - np.arange(19)[None, :]
    mask = (distance >= 0) & (distance < window) & (segments[:, :, None] == segments[:, None, :])
    expected = jax.nn.dot_product_attention(query, key, value, mask=mask[:, None])
    np.testing.assert_allclose(out, expected, atol=2e-6)
