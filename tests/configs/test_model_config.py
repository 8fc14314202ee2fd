"""ModelConfig read back from JSON: the nested form it is saved in, and the flat form of older checkpoints."""

import dataclasses
import json

import pytest

from ttt import configs
from ttt.configs import AttentionConfig, TTTConfig
from ttt.configs.model import from_json
from ttt.configs.train import TrainConfig
from ttt.train import checkpoint

# `dataclasses.asdict` of the e2e-tiny and ttt-mlp-tiny presets as checkpoints stored them before the attention,
# TTT and TTT-E2E fields were nested (printed by that version of the code); ttt-mlp-tiny with three TTT fields
# changed.
FLAT_E2E_TINY = json.loads("""{"vocab_size": 256, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
  "mlp_hidden_size": 320, "num_kv_heads": null, "layer_pattern": "attention", "stages": [{"layer_pattern": "swa",
  "repeats": 3, "prime_mlp": false}, {"layer_pattern": "swa", "repeats": 1, "prime_mlp": true}],
  "sliding_window": 64, "max_seq_len": 2048, "tie_embeddings": true, "mini_batch_size": 16, "backbone": "mamba",
  "ttt_linear_base_lr": 1.0, "ttt_mlp_base_lr": 0.1, "ttt_form": "dual", "ttt_remat_group_size": 4,
  "conv_kernel": 4, "rope_theta": 500000.0, "rope_pairing": "interleaved", "pre_conv": false, "qk_norm": true,
  "post_norm": true, "e2e_chunk_size": 32, "e2e_inner_lr": 1.0, "e2e_inner_clip": 1.0,
  "e2e_fast_params": "(^|/)prime_mlp/", "e2e_remat": true, "norm_eps": 1e-06, "init_std": 0.02,
  "loss_chunk_size": 1024, "dtype": "float32", "param_dtype": "float32", "remat": false}""")
FLAT_TTT_MLP_TINY = json.loads("""{"vocab_size": 256, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
  "mlp_hidden_size": 384, "num_kv_heads": null, "layer_pattern": "ttt_mlp", "stages": [], "sliding_window": null,
  "max_seq_len": 2048, "tie_embeddings": true, "mini_batch_size": 8, "backbone": "transformer",
  "ttt_linear_base_lr": 1.0, "ttt_mlp_base_lr": 0.05, "ttt_form": "dual", "ttt_remat_group_size": 4,
  "conv_kernel": 4, "rope_theta": 10000.0, "rope_pairing": "half", "pre_conv": true, "qk_norm": false,
  "post_norm": false, "e2e_chunk_size": null, "e2e_inner_lr": 1.0, "e2e_inner_clip": 1.0,
  "e2e_fast_params": "(^|/)prime_mlp/", "e2e_remat": true, "norm_eps": 1e-06, "init_std": 0.02,
  "loss_chunk_size": 1024, "dtype": "float32", "param_dtype": "float32", "remat": false}""")
# hybrid-tiny with its three attention fields changed, as stored after the TTT and TTT-E2E fields were nested
# and before the attention fields were (printed by that version of the code).
FLAT_ATTENTION_HYBRID_TINY = json.loads("""{"vocab_size": 256, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
  "mlp_hidden_size": 384, "num_kv_heads": 2, "layer_pattern": "ttt_linear,swa", "stages": [], "sliding_window": 32,
  "max_seq_len": 2048, "tie_embeddings": true, "ttt": {"mini_batch_size": 16, "backbone": "mamba",
  "linear_base_lr": 1.0, "mlp_base_lr": 0.1, "form": "dual", "remat_group_size": 4, "conv_kernel": 4,
  "inner_norm": true, "learn_initial_weights": true, "learn_inner_lr": true, "learn_token_scale": true},
  "rope_theta": 10000.0, "rope_pairing": "half", "pre_conv": false, "qk_norm": true, "post_norm": false,
  "e2e": null, "norm_eps": 1e-06, "init_std": 0.02, "loss_chunk_size": 1024, "dtype": "float32",
  "param_dtype": "float32", "remat": false}""")
HYBRID_TINY_CHANGED = configs.get("hybrid-tiny", attention=AttentionConfig(num_kv_heads=2, sliding_window=32,
                                                                           qk_norm=True))
TTT_MLP_TINY_CHANGED = configs.get("ttt-mlp-tiny", ttt=TTTConfig(mini_batch_size=8, backbone="transformer",
                                                                 mlp_base_lr=0.05))


@pytest.mark.parametrize("name", ["e2e-tiny", "ttt-mlp-tiny", "hybrid-tiny"])
def test_saved_config_reads_back_equal(name):
    config = configs.get(name, ttt=TTTConfig(learn_inner_lr=False, inner_norm=False),
                         attention=dataclasses.replace(configs.get(name).attention, num_kv_heads=2))
    assert from_json(json.loads(json.dumps(dataclasses.asdict(config)))) == config


@pytest.mark.parametrize("flat, expected", [(FLAT_E2E_TINY, configs.get("e2e-tiny")),
                                            (FLAT_TTT_MLP_TINY, TTT_MLP_TINY_CHANGED),
                                            (FLAT_ATTENTION_HYBRID_TINY, HYBRID_TINY_CHANGED)])
def test_config_saved_with_the_old_flat_names_reads_back_nested(flat, expected):
    assert from_json(flat) == expected
    stored = {**checkpoint.config_to_json(TrainConfig(model=expected)), "model": flat}
    assert checkpoint.config_from_json(stored).model == expected


def test_old_flat_attention_fields_land_in_the_nested_attention_config():
    config = from_json(FLAT_ATTENTION_HYBRID_TINY)
    assert config.attention == AttentionConfig(num_kv_heads=2, sliding_window=32, qk_norm=True)
    assert config.kv_heads == 2


@pytest.mark.parametrize("field, value", [("num_kv_heads", 0), ("sliding_window", 0), ("sliding_window", -4)])
def test_attention_config_rejects_nonpositive_sizes(field, value):
    with pytest.raises(ValueError, match=f"attention.{field}={value}; expected >= 1"):
        AttentionConfig(**{field: value})


def test_unknown_field_is_still_an_error():
    with pytest.raises(ValueError, match="does not match this version's TrainConfig"):
        stored = checkpoint.config_to_json(TrainConfig(model=configs.get("e2e-tiny")))
        checkpoint.config_from_json({**stored, "model": {**FLAT_E2E_TINY, "x": 1}})
