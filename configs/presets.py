"""Named model presets: the sizes of Sun et al. 2024 (Learning to (Learn at Test Time)), of Tandon et al.
2025 (TTT-E2E) and tiny CPU models.

The papers' size names are nominal: the shapes are the papers' (layers / width / heads, SwiGLU
width, vocabulary, tied embeddings) and the parameter counts are whatever those shapes give
(`ttt-info --config NAME`).
"""

import dataclasses

from ttt.configs.attention import AttentionConfig
from ttt.configs.e2e import E2EConfig
from ttt.configs.model import ModelConfig, StageConfig
from ttt.configs.ttt import TTTConfig

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
# The TTT layers of the paper's configurations: mini-batch 16, Mamba backbone (or the Transformer one).
PAPER_TTT = TTTConfig(mini_batch_size=16, backbone="mamba")
TRANSFORMER_BACKBONE_TTT = dataclasses.replace(PAPER_TTT, backbone="transformer")
# Families: name prefix -> fields shared by all sizes.
# The TTT families are the paper's `-TTT` configurations (ttt-lm-jax CONFIGS): every block starts
# with the residual pre-convolution, whichever the TTT layer's backbone.
FAMILIES = {
    "transformer": dict(layer_pattern="attention"),
    "ttt-linear": dict(layer_pattern="ttt_linear", ttt=PAPER_TTT, pre_conv=True),
    "ttt-mlp": dict(layer_pattern="ttt_mlp", ttt=PAPER_TTT, pre_conv=True),
    "ttt-linear-transformer-backbone": dict(layer_pattern="ttt_linear", ttt=TRANSFORMER_BACKBONE_TTT, pre_conv=True),
    "ttt-mlp-transformer-backbone": dict(layer_pattern="ttt_mlp", ttt=TRANSFORMER_BACKBONE_TTT, pre_conv=True),
    "hybrid-swa-ttt": dict(layer_pattern=HYBRID_PATTERN, attention=AttentionConfig(sliding_window=HYBRID_WINDOW),
                           ttt=PAPER_TTT),
}
TINY = dict(vocab_size=256, num_layers=4, hidden_size=128, num_heads=4, mlp_hidden_size=384,
            max_seq_len=2048, ttt=PAPER_TTT)
TINY_FAMILIES = {
    "transformer-tiny": dict(layer_pattern="attention"),
    "ttt-linear-tiny": dict(layer_pattern="ttt_linear", pre_conv=True),
    "ttt-mlp-tiny": dict(layer_pattern="ttt_mlp", pre_conv=True),
    "hybrid-tiny": dict(layer_pattern=HYBRID_PATTERN, attention=AttentionConfig(sliding_window=TINY_WINDOW)),
}


# TTT-E2E (Tandon et al. 2025, configs of test-time-training/e2e): name -> (num_layers, hidden_size,
# num_heads, mlp_hidden_size of the baselines, mlp_hidden_size of the E2E model, blocks with a prime
# MLP). The E2E model shrinks every MLP (its own and the prime ones) so that its parameter count
# matches the baselines'; the last quarter of the blocks carry the prime MLP.
E2E_SIZES = {
    "125m": (12, 768, 12, 2048, 1664, 3),
    "350m": (24, 1024, 16, 2816, 2304, 6),
    "760m": (24, 1536, 16, 4096, 3328, 6),
    "1b": (24, 2048, 32, 5376, 4352, 6),
    "3b": (32, 2560, 32, 6912, 5632, 8),
}
# Fields of every E2E-family preset: Llama-3 vocabulary, QK-norm, pre- and post-norms, RoPE base 5e5
# rotating interleaved pairs (complex multiplication, as the paper's code does), 8K training length.
E2E_COMMON = dict(vocab_size=128256, tie_embeddings=True, attention=AttentionConfig(sliding_window=8192, qk_norm=True),
                  post_norm=True, rope_theta=500000.0, rope_pairing="interleaved", max_seq_len=8192)
E2E_CHUNK = 1024
# Tiny E2E family for CPU: 256-token rows read in 8 chunks of 32 through a window of 64; the MLP
# shrunk from 384 as the paper does (4 MLPs' worth of parameters over 5 MLPs, rounded up to 32).
E2E_TINY = dict(vocab_size=256, num_layers=4, hidden_size=128, num_heads=4, max_seq_len=2048,
                tie_embeddings=True, attention=AttentionConfig(sliding_window=64, qk_norm=True), post_norm=True,
                rope_theta=500000.0, rope_pairing="interleaved")
E2E_TINY_MLP, E2E_TINY_SHRUNK_MLP, E2E_TINY_CHUNK, E2E_TINY_FAST_BLOCKS = 384, 320, 32, 1


def e2e_stages(num_layers: int, fast_blocks: int) -> tuple[StageConfig, ...]:
    """Sliding-window blocks: a prefix, then `fast_blocks` blocks with a prime MLP (the suffix)."""
    return (StageConfig("swa", num_layers - fast_blocks), StageConfig("swa", fast_blocks, prime_mlp=True))


def _e2e_family(suffix: str, common: dict, num_layers: int, mlp: int, shrunk_mlp: int, fast_blocks: int,
                chunk: int) -> dict[str, ModelConfig]:
    """`e2e-SUFFIX` and its baselines of the same shapes, `e2e-swa-SUFFIX` and `e2e-fa-SUFFIX`."""
    return {
        f"e2e-{suffix}": ModelConfig(**common, num_layers=num_layers, mlp_hidden_size=shrunk_mlp,
                                     stages=e2e_stages(num_layers, fast_blocks), e2e=E2EConfig(chunk_size=chunk)),
        f"e2e-swa-{suffix}": ModelConfig(**common, num_layers=num_layers, mlp_hidden_size=mlp, layer_pattern="swa"),
        f"e2e-fa-{suffix}": ModelConfig(**common, num_layers=num_layers, mlp_hidden_size=mlp,
                                        layer_pattern="attention"),
    }


def _paper_preset(family: str, size: str) -> ModelConfig:
    num_layers, hidden_size, num_heads, mlp_hidden_size = PAPER_SIZES[size]
    return ModelConfig(vocab_size=32000, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                       mlp_hidden_size=mlp_hidden_size, max_seq_len=2048, tie_embeddings=True,
                       **FAMILIES[family])


def _all_presets() -> dict[str, ModelConfig]:
    presets = {f"{family}-{size}": _paper_preset(family, size) for family in FAMILIES for size in PAPER_SIZES}
    presets.update({name: ModelConfig(**TINY, **fields) for name, fields in TINY_FAMILIES.items()})
    for size, (num_layers, hidden_size, num_heads, mlp, shrunk_mlp, fast_blocks) in E2E_SIZES.items():
        common = dict(E2E_COMMON, hidden_size=hidden_size, num_heads=num_heads)
        presets.update(_e2e_family(size, common, num_layers, mlp, shrunk_mlp, fast_blocks, E2E_CHUNK))
    tiny = {key: value for key, value in E2E_TINY.items() if key != "num_layers"}
    presets.update(_e2e_family("tiny", tiny, E2E_TINY["num_layers"], E2E_TINY_MLP, E2E_TINY_SHRUNK_MLP,
                               E2E_TINY_FAST_BLOCKS, E2E_TINY_CHUNK))
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
