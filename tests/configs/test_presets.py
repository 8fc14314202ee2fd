"""Presets: names, lookup errors, and parameter counts of every preset from its abstract model."""

import dataclasses
import math

import pytest
from flax import nnx

import ttt
from ttt import configs
from ttt.models import info
from ttt.models.attention import Attention
from ttt.models.layers import SwiGLU

PAPER_SIZES = {"125m": (12, 768, 12), "350m": (24, 1024, 16), "760m": (24, 1536, 16), "1.3b": (24, 2048, 32)}
TINY = ["transformer-tiny", "ttt-linear-tiny", "ttt-mlp-tiny", "hybrid-tiny"]


def abstract_count(make) -> int:
    params = nnx.state(nnx.eval_shape(make), nnx.Param)
    return sum(math.prod(variable.shape) for _, variable in nnx.to_flat_state(params))


def transformer_count(config) -> int:
    """Llama-style decoder from the formula: tied embedding, per layer q/k/v/o + SwiGLU + 2 RMSNorms, final norm."""
    width, head_dim = config.hidden_size, config.head_dim
    attention = width * head_dim * (2 * config.num_heads + 2 * config.kv_heads)
    per_layer = attention + 3 * width * config.mlp_hidden_size + 2 * width
    return config.vocab_size * width + config.num_layers * per_layer + width


def test_preset_names():
    expected = {f"{family}-{size}" for family in ("transformer", "ttt-linear", "ttt-mlp", "hybrid-swa-ttt")
                for size in PAPER_SIZES} | set(TINY)
    assert expected <= set(configs.names())
    assert configs.names() == sorted(configs.names())


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_paper_sizes_are_exact(size):
    for family in ("transformer", "ttt-linear", "ttt-mlp", "hybrid-swa-ttt"):
        config = configs.get(f"{family}-{size}")
        assert (config.num_layers, config.hidden_size, config.num_heads) == PAPER_SIZES[size]
        assert config.vocab_size == 32000 and config.tie_embeddings
    assert configs.get(f"ttt-linear-{size}").ttt.backbone == "mamba"
    assert configs.get(f"ttt-linear-transformer-backbone-{size}").ttt.backbone == "transformer"
    assert configs.get(f"ttt-mlp-{size}").ttt_layer_config("ttt_mlp").base_lr == 0.1
    assert configs.get(f"ttt-linear-{size}").ttt_layer_config("ttt_linear").base_lr == 1.0


@pytest.mark.parametrize("name", [name for name in configs.names() if name.startswith("transformer")])
def test_transformer_parameter_count_matches_the_formula(name):
    config = configs.get(name)
    assert info.count_parameters(config) == transformer_count(config)


def test_125m_transformer_is_about_110m():
    assert 109e6 < info.count_parameters(configs.get("transformer-125m")) < 110e6


@pytest.mark.parametrize("name", configs.names())
def test_every_preset_counts_as_the_sum_of_its_layers(name):
    """`ttt-info` on the abstract LM (nnx.eval_shape) reports embedding + each layer's mixer, MLP
    and norms counted on standalone modules (+ the pre-convolution's kernel, bias and norm; + a prime
    MLP and its norms in the stages that have one; post-norms double the norms) + final norm, and
    the layer pattern of every stage."""
    config = configs.get(name)
    mixer_counts = {
        "attention": lambda: Attention(config, window=None, rngs=nnx.Rngs(0)),
        "swa": lambda: Attention(config, window=config.attention.sliding_window, rngs=nnx.Rngs(0)),
        "ttt_linear": lambda: ttt.TTTLayer(config.ttt_layer_config("ttt_linear"), rngs=nnx.Rngs(0)),
        "ttt_mlp": lambda: ttt.TTTLayer(config.ttt_layer_config("ttt_mlp"), rngs=nnx.Rngs(0)),
    }
    mlp = abstract_count(lambda: SwiGLU(config, rngs=nnx.Rngs(0)))
    mixer_count = {mixer: abstract_count(mixer_counts[mixer]) for mixer in set(config.mixers)}
    pre_conv = (config.ttt.conv_kernel + 2) * config.hidden_size if config.pre_conv else 0
    norms = (2 + 2 * config.post_norm) * config.hidden_size
    layers = sum(mixer_count[mixer] + mlp + norms + pre_conv for mixer in config.mixers)
    prime = (mlp + (1 + config.post_norm) * config.hidden_size) * sum(
        stage.num_layers for stage in config.model_stages if stage.prime_mlp)
    count = config.vocab_size * config.hidden_size + layers + prime + config.hidden_size
    description = info.describe(name)  # what `ttt-info --config NAME` prints
    assert f"parameters:      {count:,} " in description
    assert all(f"({stage.layer_pattern}" in description for stage in config.model_stages)
    if name in TINY:
        assert count < 5_000_000


def test_untied_override():
    config = configs.get("transformer-tiny", tie_embeddings=False, dtype="bfloat16")
    assert not config.tie_embeddings and config.dtype == "bfloat16"
    assert info.count_parameters(config) == transformer_count(config) + config.vocab_size * config.hidden_size


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="unknown model preset 'ttt-linear-7b'"):
        configs.get("ttt-linear-7b")


def test_bad_override_is_rejected():
    with pytest.raises(ValueError, match="layer_pattern='ttt_linear,gru'"):
        configs.get("hybrid-tiny", layer_pattern="ttt_linear,gru")
    with pytest.raises(TypeError):
        configs.get("hybrid-tiny", num_experts=8)


def test_ttt_info_prints_count_and_pattern(capsys):
    info.main(["--config", "hybrid-tiny"])
    out = capsys.readouterr().out
    assert f"{info.count_parameters(configs.get('hybrid-tiny')):,}" in out
    assert "ttt_linear,swa" in out
    with pytest.raises(SystemExit):
        info.main(["--config", "nope"])


def test_config_is_hashable_and_frozen():
    config = configs.get("ttt-mlp-tiny")
    assert hash(config) == hash(dataclasses.replace(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 1


# TTT-E2E shapes of the paper's configs (test-time-training/e2e): layers, width, heads, baseline MLP,
# shrunk MLP, blocks with a prime MLP.
E2E_SHAPES = {"125m": (12, 768, 12, 2048, 1664, 3), "350m": (24, 1024, 16, 2816, 2304, 6),
              "760m": (24, 1536, 16, 4096, 3328, 6), "1b": (24, 2048, 32, 5376, 4352, 6),
              "3b": (32, 2560, 32, 6912, 5632, 8)}


@pytest.mark.parametrize("size", [*E2E_SHAPES, "tiny"])
def test_e2e_presets_count_and_match_their_baselines(size):
    """Counts from the formula (QK-norm and post-norms add 2 head_dim + 2 width per block, a prime MLP
    3 width x MLP + 2 width); the last quarter carries the prime MLP; the E2E model is within 3% of the
    baselines' count; the paper's shapes, window 8192, chunk 1024 and vocabulary 128256."""
    e2e, swa, full = (configs.get(f"e2e{kind}-{size}") for kind in ("", "-swa", "-fa"))
    extra_norms = lambda c: c.num_layers * (2 * c.head_dim + 2 * c.hidden_size)
    fast_blocks = e2e.model_stages[-1].num_layers
    prime = fast_blocks * (3 * e2e.hidden_size * e2e.mlp_hidden_size + 2 * e2e.hidden_size)
    assert info.count_parameters(e2e) == transformer_count(e2e) + extra_norms(e2e) + prime
    for baseline in (swa, full):
        assert info.count_parameters(baseline) == transformer_count(baseline) + extra_norms(baseline)
    assert 4 * fast_blocks == e2e.num_layers and e2e.model_stages[-1].prime_mlp
    assert abs(info.count_parameters(e2e) / info.count_parameters(full) - 1) < 0.03
    assert set(e2e.mixers) == set(swa.mixers) == {"swa"} and set(full.mixers) == {"attention"}
    if size != "tiny":
        layers, width, heads, mlp, shrunk, blocks = E2E_SHAPES[size]
        assert (e2e.num_layers, e2e.hidden_size, e2e.num_heads, e2e.mlp_hidden_size, fast_blocks) == (
            layers, width, heads, shrunk, blocks)
        assert (full.mlp_hidden_size, e2e.attention.sliding_window, e2e.e2e.chunk_size, e2e.vocab_size) == (
            mlp, 8192, 1024, 128256)
