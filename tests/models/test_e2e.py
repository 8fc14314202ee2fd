"""TTT-E2E: the inner step, the outer gradient through it, and its limits, on a tiny model.

References: the same parameters in the ordinary model (`e2e=None`, one pass over the
sequence, no inner loop) and its `jax.grad`, and central differences of the loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt.configs import AttentionConfig, E2EConfig, ModelConfig
from ttt.configs.model import StageConfig
from ttt.configs.train import TrainConfig, DataConfig
from ttt.context import Context
from ttt.models import LM, generate
from ttt.models.e2e import fast_filter

BATCH, CHUNK = 2, 4


def make_config(e2e: dict | None = None, **overrides) -> ModelConfig:
    """Two sliding-window blocks, the second with a prime MLP (the suffix); chunks of 4 through a window of 8.
    `e2e` replaces fields of the E2EConfig, the other overrides fields of the ModelConfig."""
    fields = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, mlp_hidden_size=24,
                  stages=(StageConfig("swa", 1), StageConfig("swa", 1, prime_mlp=True)),
                  attention=AttentionConfig(sliding_window=8, qk_norm=True), post_norm=True,
                  rope_pairing="interleaved", init_std=0.2,
                  e2e=E2EConfig(**{**dict(chunk_size=CHUNK, inner_lr=1.0, inner_clip=0.5), **(e2e or {})}))
    return ModelConfig(**{**fields, **overrides})


def make_ids(num_chunks: int, seed: int = 0) -> jax.Array:
    """[BATCH, num_chunks * CHUNK + 1]: inputs of whole chunks and their targets."""
    return jax.random.randint(jax.random.key(seed), (BATCH, num_chunks * CHUNK + 1), 0, 32)


def ordinary_twin(model: LM) -> LM:
    """The same parameters in the model without the inner loop."""
    twin = LM(dataclasses.replace(model.config, e2e=None), rngs=nnx.Rngs(1))
    nnx.update(twin, nnx.state(model, nnx.Param))
    return twin


# Module-level jitted functions, so that tests of the same config and shapes compile them once.
_per_token_losses = nnx.jit(lambda model, ids, scale: model.loss(ids, context=Context(inner_lr_scale=scale))[1])
_read_fast_weights = nnx.jit(lambda model, ids, mask=None: model.read_fast_weights(ids, mask))
_extend = nnx.jit(lambda model, ids, cache: model.extend(ids, cache))
_forward = nnx.jit(lambda model, ids: model(ids))


def per_token_losses(model: LM, ids: jax.Array, inner_lr_scale: float = 1.0) -> np.ndarray:
    return np.asarray(_per_token_losses(model, ids, jnp.float32(inner_lr_scale)))


@pytest.mark.parametrize("masked", [False, True])
def test_inner_step_is_a_clipped_gradient_step_that_lowers_the_chunks_loss(masked):
    """After one chunk, each sequence's fast weights are W0 - lr * clip(grad of that sequence's chunk loss),
    the gradient taken by jax.grad of the ordinary model; and the chunk's loss is lower with them. With
    a loss mask, the chunk loss is the mean over the targets the mask keeps (both rows lose a different
    two)."""
    model = LM(make_config(), rngs=nnx.Rngs(0))
    ids = make_ids(1)
    mask = np.ones((BATCH, CHUNK), np.float32)
    if masked:
        mask[0, :2] = mask[1, 1:3] = 0
    after = _read_fast_weights(model, ids, jnp.asarray(mask))
    twin = ordinary_twin(model)
    graphdef, fast, rest = nnx.split(twin, fast_filter(model.config.e2e.fast_params), ...)
    loss_of = jax.jit(lambda fast, rest, row, mask: nnx.merge(graphdef, fast, rest).loss(row, mask)[0])
    for row in range(BATCH):
        chunk_loss = lambda fast: loss_of(fast, rest, ids[row:row + 1], mask[row:row + 1])
        grads = jax.grad(chunk_loss)(fast)
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
        assert norm > 0.5, "the test needs the clipping to act"
        expected = jax.tree.map(lambda w, g: w - 1.0 * g * 0.5 / norm, fast, grads)
        stepped = jax.tree.map(lambda w: w[row], after)
        for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(stepped)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert chunk_loss(stepped) < chunk_loss(fast)


def test_a_chunk_without_known_targets_takes_no_step():
    """Loss-masked targets are unknown to the inner loss: a chunk whose every target is masked (padding)
    leaves the fast weights where they were, while the next chunk, its targets kept, moves them; the
    outer gradient through both stays finite (the clipping's norm of a zero gradient has none)."""
    model = LM(make_config(), rngs=nnx.Rngs(0))
    ids = make_ids(2)
    mask = jnp.concatenate([jnp.zeros((BATCH, CHUNK)), jnp.ones((BATCH, CHUNK))], axis=1)
    initial = nnx.state(model, fast_filter(model.config.e2e.fast_params))
    first = _read_fast_weights(model, ids[:, :CHUNK + 1], mask[:, :CHUNK])
    both = _read_fast_weights(model, ids, mask)
    for start, after_first, after_both in zip(jax.tree.leaves(initial), jax.tree.leaves(first), jax.tree.leaves(both)):
        np.testing.assert_array_equal(after_first, np.broadcast_to(start, after_first.shape))
        assert not np.allclose(after_both, after_first)
    graphdef, params = nnx.split(model, nnx.Param)
    grads = jax.jit(jax.grad(lambda params: nnx.merge(graphdef, params).loss(ids, mask)[0]))(params)
    assert all(np.all(np.isfinite(grad)) for grad in jax.tree.leaves(grads))


def test_inner_lr_zero_is_the_sliding_window_transformer_with_frozen_prime_mlps():
    """Inner LR 0 (or an inner-LR scale of 0, training's warmup path): every position's loss equals the
    ordinary model's. With the inner LR on, the first chunk (scored before any step) still does and
    the later chunks do not."""
    ids = make_ids(3)
    learning = LM(make_config(), rngs=nnx.Rngs(0))
    reference = per_token_losses(ordinary_twin(learning), ids)
    np.testing.assert_allclose(per_token_losses(learning, ids, inner_lr_scale=0.0), reference, rtol=1e-5, atol=1e-6)
    frozen = nnx.jit(lambda model, ids: model.loss(ids)[1])(LM(make_config(e2e=dict(inner_lr=0.0)), rngs=nnx.Rngs(0)),
                                                           ids[:, :CHUNK + 2])
    np.testing.assert_allclose(frozen, reference[:, :CHUNK + 1], rtol=1e-5, atol=1e-6)
    losses = per_token_losses(learning, ids)
    np.testing.assert_allclose(losses[:, :CHUNK], reference[:, :CHUNK], rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(losses[:, CHUNK:] - reference[:, CHUNK:]).max(axis=1) > 1e-3)


def test_outer_gradient_through_the_inner_steps_equals_finite_differences():
    """Directional derivative of the loss over two chunks (the second scored after an inner step) along
    a unit direction in the fast weights' starting values and two slow parameters: reverse-mode
    through the inner step (second order) against float32 central differences. At eps 1e-2 the
    difference's truncation error is O(eps^2) and its rounding about 1e-7 / eps = 1e-5 absolute; the
    derivative is about 0.04 and the two agreed to 1e-4 relative, so 1% leaves margin, while
    dropping the second-order term (stop_gradient on the inner gradient) moves it by 7.5%."""
    model = LM(make_config(), rngs=nnx.Rngs(0))
    ids = make_ids(2, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    chosen = ("stages/1/blocks/0/prime_mlp/", "stages/1/blocks/0/mixer/value/", "stages/0/blocks/0/mlp/down/")
    path_of = lambda keys: "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)
    direction = jax.tree_util.tree_map_with_path(
        lambda keys, p: rng.normal(size=p.shape) * path_of(keys).startswith(chosen), params)
    scale = np.sqrt(sum(np.sum(d * d) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: jnp.asarray(d / scale, jnp.float32), direction)
    loss = jax.jit(lambda params: nnx.merge(graphdef, params).loss(ids)[0])
    grads = jax.grad(loss)(params)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-2
    shifted = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
    numeric = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * eps)
    assert abs(numeric) > 0.02, "the direction must move the loss"
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("prompt, piece", [(CHUNK + 2, 1), (2 * CHUNK, 1), (CHUNK - 1, 2 * CHUNK + 1), (0, CHUNK + 1)])
def test_reading_from_the_cache_equals_the_forward_at_every_position(prompt, piece):
    """Read a prompt (ending inside a chunk, at a chunk boundary, or none: from `init_cache`), then the
    rest in pieces of `piece` tokens: one at a time (decoding), or pieces spanning whole chunks (scored
    and stepped through the chunk path) and ending inside one. The logits at every position equal the
    training forward's over the whole sequence, and the cache keeps its size."""
    model = LM(make_config(), rngs=nnx.Rngs(0))
    ids = make_ids(3)[:, :3 * CHUNK + 1]
    cache = model.init_cache(BATCH)
    size = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    pieces = []
    if prompt:
        logits, cache = _extend(model, ids[:, :prompt], None)
        pieces.append(logits)
    for position in range(prompt, ids.shape[1], piece):
        logits, cache = _extend(model, ids[:, position:position + piece], cache)
        pieces.append(logits)
        assert sum(leaf.nbytes for leaf in jax.tree.leaves(cache)) == size
    forward = _forward(model, ids)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), forward, rtol=1e-5, atol=1e-5)


def test_generate_predicts_what_the_forward_predicts_at_every_position():
    """Greedy generation on an E2E model (prompt ending inside a chunk, new tokens across chunks): every
    new token is the argmax of the training forward's logits at the position before it."""
    model = LM(make_config(), rngs=nnx.Rngs(0))
    prompt = make_ids(1)[:, :CHUNK + 2]
    out = generate(model, prompt, 2 * CHUNK - 1, temperature=0.0)  # the length of the decoding test: one compile
    logits = _forward(model, out)
    np.testing.assert_array_equal(np.argmax(logits[:, CHUNK + 1:-1], axis=-1), out[:, CHUNK + 2:])


def test_reading_changes_only_the_fast_weights_and_leaves_the_model_bitwise_unchanged():
    model = LM(make_config(), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(model))
    after = _read_fast_weights(model, make_ids(1))
    per_token_losses(model, make_ids(3))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model)), before)
    fast_paths = sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(after))
    assert fast_paths == [f"stages/1/blocks/0/prime_mlp/{name}/kernel" for name in ("down", "gate", "up")]
    initial = nnx.state(model, fast_filter(model.config.e2e.fast_params))
    for start, read in zip(jax.tree.leaves(initial), jax.tree.leaves(after)):
        assert read.shape == (BATCH, *start.shape) and not np.allclose(read, start)


@pytest.mark.parametrize("overrides, message", [
    (dict(attention=AttentionConfig(sliding_window=2, qk_norm=True)), "smaller than e2e.chunk_size"),
    (dict(e2e=dict(fast_params="no_such_parameter")), "matches no parameter"),
    (dict(e2e=dict(fast_params="embed")), "outside the stages"),
    (dict(stages=(StageConfig("swa", 1), StageConfig("swa", 1))), "matches no parameter"),  # no prime MLP
    (dict(e2e=dict(fast_params="prime_mlp(")), "not a regular expression"),
    (dict(e2e=dict(inner_lr=-1.0)), "expected >= 0"),
    (dict(e2e=dict(chunk_size=0)), "expected >= 1"),
])
def test_bad_e2e_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        LM(make_config(**overrides), rngs=nnx.Rngs(0))


def test_training_rows_must_be_whole_chunks():
    with pytest.raises(ValueError, match="multiple of the model's e2e.chunk_size=4"):
        TrainConfig(model=make_config(), data=DataConfig(seq_len=10))
