"""LM: reading in pieces and decoding against the full forward, cache sizes, the loss, generation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt.configs import AttentionConfig, ModelConfig, TTTConfig
from ttt.context import Context
from ttt.models import LM, generate

WINDOW, MINI_BATCH = 5, 4
BASE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden_size=48,
                   attention=AttentionConfig(num_kv_heads=2, sliding_window=WINDOW),
                   ttt=TTTConfig(mini_batch_size=MINI_BATCH), max_seq_len=32, loss_chunk_size=5)
PATTERNS = {
    "attention": "attention",
    "swa": "swa",
    "ttt_linear": "ttt_linear",
    "ttt_mlp": "ttt_mlp",
    "hybrid": "ttt_linear,swa",
}
CONSTANT_CACHE = ["swa", "ttt_linear", "ttt_mlp", "hybrid"]


def make_config(name: str) -> ModelConfig:
    """Two repetitions of the pattern, so the layer scan runs over two groups."""
    pattern = PATTERNS[name]
    return dataclasses.replace(BASE, layer_pattern=pattern, num_layers=2 * len(pattern.split(",")))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_reading_and_decoding_match_forward_at_every_position(name):
    """Teacher forcing. Read 6 tokens (inside the second TTT mini-batch of 4, past the window of 5),
    then decode 7 more one at a time; separately decode 4 tokens from an empty cache, then read the
    other 9 in two pieces (3: inside a mini-batch; 6: across one and past the window). Every logit
    equals the full forward's at the same position."""
    model = LM(make_config(name), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 13), 0, BASE.vocab_size)
    forward = nnx.jit(lambda m, ids: m(ids))(model, ids)
    extend = nnx.jit(lambda m, ids, cache: m.extend(ids, cache))
    logits, cache = extend(model, ids[:, :6], None)
    np.testing.assert_allclose(logits, forward[:, :6], atol=2e-5)
    for t in range(6, ids.shape[1]):
        logits, cache = extend(model, ids[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], forward[:, t], atol=2e-5, err_msg=f"position {t}")
    cache = model.init_cache(ids.shape[0])
    for t in range(4):
        logits, cache = extend(model, ids[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], forward[:, t], atol=2e-5, err_msg=f"position {t} from an empty cache")
    for start, end in [(4, 7), (7, 13)]:
        logits, cache = extend(model, ids[:, start:end], cache)
        np.testing.assert_allclose(logits, forward[:, start:end], atol=2e-5, err_msg=f"piece {start}:{end}")


@pytest.mark.parametrize("name", CONSTANT_CACHE)
def test_cache_size_does_not_depend_on_tokens_read(name):
    """Shapes and bytes of the cache after 10 and after 1000 tokens (abstractly, nothing is run)."""
    model = nnx.eval_shape(lambda: LM(make_config(name), rngs=nnx.Rngs(0)))

    def cache_after(num_tokens):
        ids = jax.ShapeDtypeStruct((2, num_tokens), jnp.int32)
        cache = nnx.eval_shape(lambda m, ids: m.extend(ids)[1], model, ids)
        token = jax.ShapeDtypeStruct((2, 1), jnp.int32)
        stepped = nnx.eval_shape(lambda m, token, cache: m.extend(token, cache)[1], model, token, cache)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), stepped) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                   cache)
        return cache

    short, long = cache_after(10), cache_after(1000)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), short) == jax.tree.map(lambda a: (a.shape, a.dtype), long)
    assert sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(long)) < 100_000


def numpy_cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]


def test_loss_is_next_token_cross_entropy_with_mask():
    """Chunked float32 loss (chunk 5, 12 targets: a padded last chunk) against numpy on the logits."""
    model = LM(make_config("attention"), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (2, 13), 0, BASE.vocab_size)
    target_mask = np.zeros((2, 12), np.float32)
    target_mask[0, 3:] = 1
    target_mask[1, :2] = 1
    token_mask = np.concatenate([np.ones((2, 1), np.float32), target_mask], axis=1)
    logits, (loss, per_token), (target_masked, _), (token_masked, _) = nnx.jit(
        lambda m, ids, target_mask, token_mask: (m(ids[:, :-1]), m.loss(ids), m.loss(ids, target_mask),
                                                 m.loss(ids, token_mask)))(model, ids, target_mask, token_mask)
    expected = numpy_cross_entropy(logits, ids[:, 1:])
    assert per_token.shape == (2, 12) and per_token.dtype == jnp.float32
    np.testing.assert_allclose(per_token, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    masked_mean = (expected * target_mask).sum() / target_mask.sum()
    np.testing.assert_allclose(target_masked, masked_mean, rtol=1e-5)
    np.testing.assert_allclose(token_masked, masked_mean, rtol=1e-5)
    with pytest.raises(ValueError, match="mask of shape"):
        model.loss(ids, target_mask[:, :5])


def test_inner_lr_scale_rescales_the_ttt_layers_and_not_attention():
    """loss(ids, context=Context(inner_lr_scale=s)) equals the loss of the model whose TTT-MLP base learning rate is s
    times larger and whose sliding-window attention is unchanged (TTT-Linear: tests/train/test_loop.py)."""
    scale = 0.25
    config = dataclasses.replace(BASE, layer_pattern="ttt_mlp,swa", num_layers=4)
    ttt = dataclasses.replace(config.ttt, mlp_base_lr=scale * config.ttt.mlp_base_lr)
    scaled = dataclasses.replace(config, ttt=ttt)
    ids = jax.random.randint(jax.random.key(3), (2, 11), 0, BASE.vocab_size)
    loss = nnx.jit(lambda model, ids, scale: model.loss(ids, context=Context(inner_lr_scale=scale))[1])
    model = LM(config, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(loss(model, ids, scale), loss(LM(scaled, rngs=nnx.Rngs(0)), ids, 1.0), rtol=1e-5)
    assert not np.allclose(loss(model, ids, scale), loss(model, ids, 1.0), rtol=1e-4)


def test_remat_policy_checkpoints_the_layer_scan():
    """Traced only (nothing compiled): remat puts a checkpoint (`remat` primitive) around the scanned group."""
    ids = jnp.zeros((2, 9), jnp.int32)

    def gradient_jaxpr(remat):
        config = dataclasses.replace(make_config("attention"), remat=remat)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))))
        loss = lambda state: nnx.merge(graphdef, state).loss(ids)[0]
        return str(jax.make_jaxpr(loss)(state))

    plain, rematerialised = gradient_jaxpr(False), gradient_jaxpr("dots_saveable")
    # The loss chunks are always checkpointed; remat adds one checkpoint per scanned group.
    assert rematerialised.count("remat") == plain.count("remat") + 1


def test_bfloat16_compute_keeps_float32_parameters_and_loss():
    config = make_config("attention")
    ids = jax.random.randint(jax.random.key(3), (2, 9), 0, BASE.vocab_size)
    model = LM(config, rngs=nnx.Rngs(0))
    bf16_model = LM(dataclasses.replace(config, dtype="bfloat16"), rngs=nnx.Rngs(0))
    losses = nnx.jit(lambda a, b: (a.loss(ids), b.loss(ids), b(ids)))
    (loss, _), (bf16_loss, bf16_per_token), bf16_logits = losses(model, bf16_model)
    assert bf16_logits.dtype == jnp.bfloat16 and bf16_per_token.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16_model, nnx.Param)))
    np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)


def test_untied_embeddings_add_an_output_matrix():
    def count(config):
        params = nnx.state(nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0))), nnx.Param)
        return sum(a.size for a in jax.tree.leaves(params))

    config = make_config("attention")
    assert count(dataclasses.replace(config, tie_embeddings=False)) - count(config) == BASE.vocab_size * BASE.hidden_size


def test_greedy_generation_equals_repeated_argmax_of_the_forward():
    model = LM(make_config("swa"), rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(4), (2, 3), 0, BASE.vocab_size)
    generated = generate(model, prompt, 8, temperature=0.0)
    assert generated.shape == (2, 11) and generated.dtype == jnp.int32
    # The forward is causal: the logits at t ignore the (still zero) tokens after t.
    expected = np.zeros((2, 11), np.int32)
    expected[:, :3] = prompt
    forward = nnx.jit(lambda m, ids: m(ids))
    for t in range(2, 10):
        expected[:, t + 1] = np.argmax(forward(model, jnp.asarray(expected))[:, t], axis=-1)
    np.testing.assert_array_equal(generated, expected)


def test_generation_past_the_full_attention_cache_is_rejected():
    model = nnx.eval_shape(lambda: LM(make_config("attention"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(model, jnp.zeros((1, 30), jnp.int32), 3)


def test_stacked_parameters_carry_the_layers_axis_under_a_mesh():
    """Built abstractly under a mesh with logical axis rules: every parameter is sharded by its
    names, stacked ones with the leading "layers" axis; the loss traces with its activation constraints."""
    rules = (("batch", "data"), ("seq", None), ("embed", None), ("heads", "tensor"), ("kv_heads", "tensor"),
             ("head_dim", None), ("mlp", "tensor"), ("vocab", "tensor"), ("layers", None))
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = nnx.eval_shape(lambda: LM(make_config("hybrid"), rngs=nnx.Rngs(0)))
        query = model.stages[0].blocks[1].mixer.query.kernel
        assert query.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
        assert tuple(query.get_value().sharding.spec)[:3] == (None, None, "tensor")
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = variable.get_metadata()["out_sharding"]
            assert len(names) == len(variable.get_value().shape), path
            assert (names[0] == "layers") == (path[0] == "stages"), path
        loss = nnx.eval_shape(lambda m, ids: m.loss(ids)[0], model, jax.ShapeDtypeStruct((4, 8), jnp.int32))
    assert loss.shape == () and loss.dtype == jnp.float32


@pytest.mark.parametrize("field, value, message", [
    ("layer_pattern", "attention,mamba", "unknown mixers"),
    ("layer_pattern", "attention,swa,swa", "not a multiple"),
    ("attention", AttentionConfig(num_kv_heads=2), "positive window"),
    ("attention", AttentionConfig(num_kv_heads=3, sliding_window=WINDOW), "multiple of attention.num_kv_heads"),
    ("remat", "sometimes", "remat="),
])
def test_bad_config_is_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(make_config("swa"), **{field: value})


@pytest.mark.parametrize("ids, message", [
    (np.array([[1, 2, 64]]), "token id"),          # >= vocab_size (64): NaN logits without the check
    (np.array([[1, -1, 2]]), "token id"),          # negative: silently the end of the table without it
    (np.array([1, 2, 3]), r"expected \[batch, seq\]"),
    (np.array([[1.0, 2.0]]), "integer"),
])
def test_bad_token_ids_are_errors_at_every_entry_point(ids, message):
    """Checked before any computation (an abstract model suffices): the forward, the one forward
    from a cache, the loss and generation."""
    model = nnx.eval_shape(lambda: LM(make_config("ttt_linear"), rngs=nnx.Rngs(0)))
    for entry in (model, model.extend, model.loss, lambda ids: generate(model, ids, 2)):
        with pytest.raises(ValueError, match=message):
            entry(ids)
