"""Named model presets: the sizes of Sun et al. 2024 (Learning to (Learn at Test Time)) and tiny CPU models.

The paper's size names are nominal: the shapes are the paper's (layers / width / heads, SwiGLU
width, vocabulary 32000, tied embeddings) and the parameter counts are whatever those shapes give
(`ttt-info --config NAME`).
"""

import dataclasses

from ttt.configs.model import ModelConfig

# name -> (num_layers, hidden_size, num_heads, mlp_hidden_size), as in the paper's model table.
PAPER_SIZES = {
    "125m": (12, 768, 12, 2048),
    "350m": (24, 1024, 16, 2736),
    "760m": (24, 1536, 16, 4096),
    "1.3b": (24, 2048, 32, 5504),
}
# Mixer pattern of every hybrid preset: TTT-Linear and sliding-window attention alternate, so the
# attention layers give exact recall inside the window and the TTT layers carry everything older.
HYBRID_PATTERN = "ttt_linear,swa"
HYBRID_WINDOW = 512
TINY_WINDOW = 64
# Families: name prefix -> fields shared by all sizes.
# The TTT families are the paper's `-TTT` configurations (ttt-lm-jax CONFIGS): every block starts
# with the residual pre-convolution, whichever the TTT layer's backbone.
FAMILIES = {
    "transformer": dict(layer_pattern="attention"),
    "ttt-linear": dict(layer_pattern="ttt_linear", backbone="mamba", pre_conv=True),
    "ttt-mlp": dict(layer_pattern="ttt_mlp", backbone="mamba", pre_conv=True),
    "ttt-linear-transformer-backbone": dict(layer_pattern="ttt_linear", backbone="transformer", pre_conv=True),
    "ttt-mlp-transformer-backbone": dict(layer_pattern="ttt_mlp", backbone="transformer", pre_conv=True),
    "hybrid-swa-ttt": dict(layer_pattern=HYBRID_PATTERN, sliding_window=HYBRID_WINDOW, backbone="mamba"),
}
TINY = dict(vocab_size=256, num_layers=4, hidden_size=128, num_heads=4, mlp_hidden_size=384,
            max_seq_len=2048, mini_batch_size=16)
TINY_FAMILIES = {
    "transformer-tiny": dict(layer_pattern="attention"),
    "ttt-linear-tiny": dict(layer_pattern="ttt_linear", pre_conv=True),
    "ttt-mlp-tiny": dict(layer_pattern="ttt_mlp", pre_conv=True),
    "hybrid-tiny": dict(layer_pattern=HYBRID_PATTERN, sliding_window=TINY_WINDOW),
}


def _paper_preset(family: str, size: str) -> ModelConfig:
    num_layers, hidden_size, num_heads, mlp_hidden_size = PAPER_SIZES[size]
    return ModelConfig(vocab_size=32000, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                       mlp_hidden_size=mlp_hidden_size, max_seq_len=2048, tie_embeddings=True,
                       mini_batch_size=16, **FAMILIES[family])


def _all_presets() -> dict[str, ModelConfig]:
    presets = {f"{family}-{size}": _paper_preset(family, size) for family in FAMILIES for size in PAPER_SIZES}
    presets.update({name: ModelConfig(**TINY, **fields) for name, fields in TINY_FAMILIES.items()})
    return presets


PRESETS = _all_presets()


def names() -> list[str]:
    """Every preset name, sorted."""
    return sorted(PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset `name`, with any field replaced by `overrides` (e.g. `dtype="bfloat16"`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {names()}")
    return dataclasses.replace(PRESETS[name], **overrides)
