"""ttt-convert on synthetic checkpoints in ttt-lm-jax's layout (its streaming msgpack format, its parameter names)."""

import dataclasses
import json

import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax.serialization import to_bytes

from ttt.configs import ModelConfig
from ttt.rope import rotary_embedding
from ttt.train import convert

D, H, F, V, B, K, LAYERS = 16, 2, 24, 11, 4, 4, 2
d = D // H
TTT_CONFIG = dict(vocab_size=V, num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=H, intermediate_size=F,
                  max_sequence_length=32, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  seq_modeling_block="ttt_linear", ttt_base_lr=1.0, mini_batch_size=B, remat_mini_batch_group_size=4,
                  rope_theta=10000.0, pre_conv=True, conv_width=K)
ATTENTION_CONFIG = {**TTT_CONFIG, "seq_modeling_block": "self_attention", "pre_conv": False}


def reference_layout(config: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The parameter tree ttt-lm-jax's CausalLM.init gives (written out from running it, not from the rule table)."""
    block = config["seq_modeling_block"]
    per_block = {("seq_norm", "kernel"): (D,), ("ffn_norm", "kernel"): (D,),
                 ("feed_forward", "w1", "kernel"): (D, F), ("feed_forward", "w3", "kernel"): (D, F),
                 ("feed_forward", "w2", "kernel"): (F, D)}
    if config["pre_conv"]:
        per_block.update({("conv", "conv_norm", "kernel"): (D,), ("conv", "conv1", "kernel"): (K, 1, D),
                          ("conv", "conv1", "bias"): (D,)})
    mixer = {("wv", "kernel"): (D, D), ("wo", "kernel"): (D, D), ("wq", "kernel"): (D, D)}
    if block in ("self_attention", "ttt_linear_base", "ttt_mlp_base"):
        mixer[("wk", "kernel")] = (D, D)
    if block != "self_attention":
        mixer.update({("learnable_token_idx",): (B,), ("learnable_ttt_lr/kernel",): (H, D, 1),
                      ("learnable_ttt_lr/bias",): (H, 1), ("ttt_norm/scale",): (H, d), ("ttt_norm/bias",): (H, d),
                      ("post_norm", "scale"): (D,), ("post_norm", "bias"): (D,)})
    if block in ("ttt_linear", "ttt_mlp"):
        mixer.update({("conv_q", "kernel"): (K, 1, D), ("conv_q", "bias"): (D,), ("conv_k", "kernel"): (K, 1, D),
                      ("conv_k", "bias"): (D,), ("wg", "kernel"): (D, D)})
    if block.startswith("ttt_linear"):
        mixer.update({("ttt_dense_0",): (H, d, d), ("ttt_bias_0",): (H, 1, d)})
    if block.startswith("ttt_mlp"):
        mixer.update({("ttt_dense_0",): (H, d, 4 * d), ("ttt_bias_0",): (H, 1, 4 * d),
                      ("ttt_dense_1",): (H, 4 * d, d), ("ttt_bias_1",): (H, 1, d)})
    per_block.update({("seq_modeling_block", *name): shape for name, shape in mixer.items()})
    layout = {("model", "wte", "embedding"): (V, D), ("model", "ln_f", "kernel"): (D,)}
    if not config["tie_word_embeddings"]:
        layout[("lm_head", "kernel")] = (D, V)
    for layer in range(config["num_hidden_layers"]):
        layout.update({("model", "h", str(layer), *name): shape for name, shape in per_block.items()})
    return layout


def random_params(config: dict, seed: int = 0) -> dict[tuple[str, ...], np.ndarray]:
    rng = np.random.default_rng(seed)
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in reference_layout(config).items()}


def write_streaming(path, records: dict, dtype=None) -> str:
    """The reference StreamingCheckpointer's format: msgpack (key path, flax to_bytes(array)) records."""
    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for key, value in records.items():
            value = jnp.asarray(value, dtype) if dtype is not None and value.dtype == np.float32 else value
            f.write(packer.pack((key, to_bytes(value))))
    return str(path)


def flat_names(params: dict) -> dict[str, np.ndarray]:
    return {"/".join(key): value for key, value in params.items()}


def interleaved_rope(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """The reference's RoPE: complex rotation of feature pairs (2i, 2i+1). x: [seq, heads, head_dim]."""
    pairs = x[..., 0::2] + 1j * x[..., 1::2]
    frequencies = theta ** (-np.arange(0, x.shape[-1], 2) / x.shape[-1])
    rotated = pairs * np.exp(1j * positions[:, None, None] * frequencies)
    return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)


@pytest.mark.parametrize("block", ["ttt_linear", "ttt_mlp", "ttt_linear_base", "ttt_mlp_base", "self_attention"])
@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_is_mapped_once_to_the_expected_tree(tmp_path, block, tied):
    config = {**TTT_CONFIG, "seq_modeling_block": block, "tie_word_embeddings": tied,
              "pre_conv": block != "self_attention"}
    path = write_streaming(tmp_path / "streaming_params", random_params(config))
    converted, report = convert.convert_params(convert.read_checkpoint(path), config)
    _, expected = convert.expected_tree(config)
    assert {name: value.shape for name, value in converted.items()} == expected
    assert len(report) == len(expected)
    # Every reference value lands somewhere: the converted values are a rearrangement of the reference's.
    source = np.sort(np.concatenate([v.ravel() for v in random_params(config).values()]))
    target = np.sort(np.concatenate([v.ravel() for v in converted.values()]))
    np.testing.assert_array_equal(source, target)
    assert ("head/kernel" in converted) == (not tied)


def test_values_land_where_the_reference_uses_them(tmp_path):
    params = random_params(TTT_CONFIG)
    converted, _ = convert.convert_params(flat_names(params), TTT_CONFIG, "interleaved")
    block = convert.BLOCK_TARGET
    layer1 = ("model", "h", "1")
    np.testing.assert_array_equal(converted[f"{block}/mixer/qk_proj/kernel"][1],
                                  params[(*layer1, "seq_modeling_block", "wq", "kernel")].reshape(D, H, d))
    np.testing.assert_array_equal(converted[f"{block}/mixer/lr_weight"][1],
                                  params[(*layer1, "seq_modeling_block", "learnable_ttt_lr/kernel")][:, :, 0].T)
    np.testing.assert_array_equal(converted[f"{block}/pre_conv/weight"][0],
                                  params[("model", "h", "0", "conv", "conv1", "kernel")][:, 0, :])
    np.testing.assert_array_equal(converted[f"{block}/mlp/up/kernel"][0],
                                  params[("model", "h", "0", "feed_forward", "w3", "kernel")])
    np.testing.assert_array_equal(converted[f"{block}/mixer/fast_weights/b"][1],
                                  params[(*layer1, "seq_modeling_block", "ttt_bias_0")][:, 0, :])


def test_half_pairing_gives_the_reference_attention_scores():
    """Reordered head features under this project's RoPE give the scores of the reference's interleaved RoPE."""
    params = random_params(ATTENTION_CONFIG, seed=1)
    converted, _ = convert.convert_params(flat_names(params), ATTENTION_CONFIG, "half")
    x, positions = np.random.default_rng(2).normal(size=(7, D)).astype(np.float32), np.arange(7)
    block = ("model", "h", "0", "seq_modeling_block")

    def reference_projection(name):
        return interleaved_rope((x @ params[(*block, name, "kernel")]).reshape(7, H, d), positions)

    def project(name):
        kernel = converted[f"{convert.BLOCK_TARGET}/mixer/{name}/kernel"][0]
        return np.asarray(rotary_embedding(jnp.einsum("td,dhk->thk", x, kernel)[None], positions, 10000.0))[0]

    expected = np.einsum("qhk,shk->hqs", reference_projection("wq"), reference_projection("wk"))
    scores = np.einsum("qhk,shk->hqs", project("query"), project("key"))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_train_state_files_and_bfloat16_arrays_are_read(tmp_path):
    params = random_params(ATTENTION_CONFIG)
    records = {("params", "params", *key): value for key, value in params.items()}
    records[("opt_state", "1", "0", "mu", "model", "wte", "embedding")] = np.zeros((V, D), np.float32)
    records[("step",)] = np.asarray(7, np.int32)
    read = convert.read_checkpoint(write_streaming(tmp_path / "streaming_train_state", records, jnp.bfloat16))
    assert set(read) == set(flat_names(params))
    rounded = np.asarray(jnp.asarray(params[("model", "wte", "embedding")], jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(read["model/wte/embedding"], np.float32), rounded)


def test_errors_name_the_first_parameter_that_does_not_fit(tmp_path):
    params = flat_names(random_params(TTT_CONFIG))
    missing = dict(params)
    del missing["model/h/1/seq_modeling_block/wg/kernel"]
    with pytest.raises(ValueError, match="model/h/1/seq_modeling_block/wg/kernel"):
        convert.convert_params(missing, TTT_CONFIG)
    with pytest.raises(ValueError, match="model/h/0/seq_modeling_block/wk/kernel.*no rule"):
        convert.convert_params({**params, "model/h/0/seq_modeling_block/wk/kernel": np.zeros((D, D))}, TTT_CONFIG)
    with pytest.raises(ValueError, match=r"model/h/0/conv/conv1/kernel has shape \(3, 1, 16\); expected \(4, 1, 16\)"):
        convert.convert_params({**params, "model/h/0/conv/conv1/kernel": np.zeros((3, 1, D))}, TTT_CONFIG)
    with pytest.raises(ValueError, match="seq_modeling_block='mamba'"):
        convert.model_config({**TTT_CONFIG, "seq_modeling_block": "mamba"})


def test_files_that_are_not_streaming_checkpoints_are_refused(tmp_path):
    path = tmp_path / "pickled"
    path.write_bytes(msgpack.packb({"not": "a record"}) + b"\x80\x04\x95")  # a map, then pickle's opcode bytes
    with pytest.raises(ValueError, match="not a ttt-lm-jax streaming checkpoint"):
        convert.read_checkpoint(str(path))


def test_model_config_of_the_reference_configs():
    config = convert.model_config({**TTT_CONFIG, "seq_modeling_block": "ttt_mlp_base", "ttt_base_lr": 0.1,
                                   "pre_conv": False})
    assert (config.layer_pattern, config.ttt.backbone, config.ttt.mlp_base_lr, config.num_layers) == (
        "ttt_mlp", "transformer", 0.1, LAYERS)
    assert (config.ttt.mini_batch_size, config.mlp_hidden_size, config.tie_embeddings) == (B, F, True)
    assert convert.model_config({**ATTENTION_CONFIG, "tie_word_embeddings": False}).tie_embeddings is False
    if "pre_conv" in {f.name for f in dataclasses.fields(ModelConfig)}:
        assert convert.model_config(TTT_CONFIG).pre_conv


def test_converted_export_loads_and_computes_what_the_converted_model_computes(tmp_path):
    from flax import nnx

    from ttt.models import LM
    from ttt.train import mesh as mesh_lib
    from ttt.train.checkpoint import load_trained_model

    config = {**TTT_CONFIG, "seq_modeling_block": "ttt_linear_base", "pre_conv": True}
    path = write_streaming(tmp_path / "streaming_params", random_params(config))
    (tmp_path / "config.json").write_text(json.dumps(config))
    convert.main([path, str(tmp_path / "export"), "--reference-config", str(tmp_path / "config.json")])
    # 8 rows: one per fake device of the default data-parallel mesh.
    ids = jnp.asarray(np.random.default_rng(3).integers(0, V, (8, 12)), jnp.int32)
    expected_model = LM(convert.model_config(config), rngs=nnx.Rngs(1))
    convert.load_into(expected_model, convert.convert_params(convert.read_checkpoint(path), config)[0])
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    with mesh_lib.activate(mesh):
        model, train_config = load_trained_model(str(tmp_path / "export"), mesh)
        np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(expected_model(ids)), rtol=1e-5, atol=1e-5)
    assert train_config.config_name == "ttt-lm-jax:ttt_linear_base"
