"""Configuration of a language model (`ttt.models.LM`): sizes, the per-layer mixer pattern, dtypes."""

import dataclasses
from typing import Literal

from ttt.configs.attention import AttentionConfig
from ttt.configs.e2e import E2EConfig
from ttt.configs.ttt import TTTConfig
from ttt.configs.ttt_layer import TTTLayerConfig

MIXERS = ("attention", "swa", "ttt_linear", "ttt_mlp")
TTT_MIXERS = {"ttt_linear": "linear", "ttt_mlp": "mlp"}
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable", "dots_with_no_batch_dims_saveable")
# Compute and parameter dtypes the model is built and tested with.
SUPPORTED_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A stage: a layer pattern repeated `repeats` times, stacked and scanned (compiled once, whatever the depth).

    Attributes:
      layer_pattern: comma-separated mixers of one repetition, e.g. `"swa,swa,swa,ttt_mlp"`.
      repeats: repetitions of the pattern.
      prime_mlp: every block of the stage carries a second SwiGLU MLP with its own norm(s), between
        the mixer and the MLP (the "prime" MLP of TTT-E2E, the weights it trains while reading).
    """

    layer_pattern: str
    repeats: int
    prime_mlp: bool = False

    @property
    def pattern(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.layer_pattern.split(","))

    @property
    def num_layers(self) -> int:
        return self.repeats * len(self.pattern)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only LM: embeddings, `num_layers` pre-norm residual blocks, final RMSNorm, logits.

    Each block is `x + mixer(norm(x))` then `x + swiglu(norm(x))`; the mixer of layer i is
    `mixers[i]`. The blocks form a sequence of stages, each a pattern repeated and scanned; by
    default one stage, the comma-separated `layer_pattern` repeated to the depth.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: model width D.
      num_layers: number of blocks; a multiple of the pattern length (layers are stacked and
        scanned one pattern repetition at a time).
      num_heads: attention heads, and TTT heads of the TTT mixers.
      mlp_hidden_size: hidden width of the SwiGLU MLP.
      layer_pattern: comma-separated mixers out of `attention` (full causal), `swa` (sliding
        window), `ttt_linear`, `ttt_mlp`, e.g. `"swa,swa,swa,ttt_mlp"`.
      stages: the stages bottom to top, when the model is more than one pattern repeated (then
        `layer_pattern` is unused and `num_layers` must be their total); empty means one stage.
      attention: the attention layers (grouped-query heads, the window of `swa` layers, QK-norm;
        configs/attention.py).
      max_seq_len: length of the preallocated KV cache of full-attention layers (the most tokens a
        model with `attention` layers can decode); TTT and `swa` layers have no such limit.
      tie_embeddings: logits use the transposed input embedding instead of a separate head.
      ttt: the TTT layers (mini-batch size, backbone, inner learning rates, ablation switches;
        configs/ttt.py).
      rope_theta: RoPE base of attention (and of the TTT layers).
      rope_pairing: features RoPE rotates together, `"half"` (i, i + d/2) or `"interleaved"`
        (2i, 2i + 1, as the reference code of Sun et al. 2024 does; for converted checkpoints).
      pre_conv: every block starts with `x + conv(RMSNorm(x))`, a causal depthwise convolution of
        width `ttt.conv_kernel` with bias (the "Mamba backbone" blocks of Sun et al. 2024's configs).
      post_norm: an RMSNorm also on the output of every mixer and MLP before it joins the residual
        (the "sandwich" blocks of the TTT-E2E configs, which set both pre- and post-norms).
      e2e: TTT-E2E (Tandon et al. 2025, configs/e2e.py) when set: the stages from the first one
        holding a fast parameter read the sequence in chunks, one inner step each; None: an
        ordinary model.
      norm_eps: epsilon of every RMSNorm.
      init_std: standard deviation of the normal initialiser of embeddings and projections.
      loss_chunk_size: sequence positions per chunk of the float32 cross-entropy in `LM.loss`.
      dtype: compute dtype (`"float32"`, `"bfloat16"`); norms, softmax and the loss run in float32.
      param_dtype: storage dtype of the parameters.
      remat: rematerialisation of each scanned group of blocks in the training forward: False or
        "none", True or "full" (save nothing), or a `jax.checkpoint_policies` name.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_hidden_size: int
    layer_pattern: str = "attention"
    stages: tuple[StageConfig, ...] = ()
    attention: AttentionConfig = AttentionConfig()
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    ttt: TTTConfig = TTTConfig()
    rope_theta: float = 10000.0
    rope_pairing: Literal["half", "interleaved"] = "half"
    pre_conv: bool = False
    post_norm: bool = False
    e2e: E2EConfig | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02
    loss_chunk_size: int = 1024
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False

    def __post_init__(self):
        # Nested configs read back from JSON (a checkpoint's config) arrive as dicts.
        object.__setattr__(self, "stages", tuple(s if isinstance(s, StageConfig) else StageConfig(**s)
                                                 for s in self.stages))
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        if isinstance(self.ttt, dict):
            object.__setattr__(self, "ttt", TTTConfig(**self.ttt))
        if isinstance(self.e2e, dict):
            object.__setattr__(self, "e2e", E2EConfig(**self.e2e))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_hidden_size",
                     "max_seq_len", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of attention.num_kv_heads="
                             f"{self.attention.num_kv_heads}")
        for stage in self.stages or (StageConfig(self.layer_pattern, 1),):
            unknown = [m for m in stage.pattern if m not in MIXERS]
            if unknown or not stage.pattern:
                raise ValueError(f"layer_pattern={stage.layer_pattern!r} has unknown mixers {unknown}; expected "
                                 f"comma-separated names out of {MIXERS}")
            if stage.repeats < 1:
                raise ValueError(f"a stage has repeats={stage.repeats}; expected >= 1")
        if self.stages and sum(stage.num_layers for stage in self.stages) != self.num_layers:
            raise ValueError(f"num_layers={self.num_layers} differs from the {sum(s.num_layers for s in self.stages)} "
                             "layers of the stages")
        if not self.stages and self.num_layers % len(self.pattern):
            raise ValueError(f"num_layers={self.num_layers} is not a multiple of the {len(self.pattern)} layers of "
                             f"layer_pattern={self.layer_pattern!r}")
        if "swa" in self.mixers and self.attention.sliding_window is None:
            raise ValueError(f"attention.sliding_window=None with layer_pattern={self.layer_pattern!r}; "
                             "a positive window is required for 'swa' layers")
        if self.rope_pairing not in ("half", "interleaved"):
            raise ValueError(f"rope_pairing={self.rope_pairing!r}; expected 'half' or 'interleaved'")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {SUPPORTED_DTYPES}")
        if self.remat_policy_name not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected a bool or one of {REMAT_POLICIES}")
        # A TTT-E2E chunk is scored before its own inner step, so each of its tokens must still see the
        # whole chunk before it through attention (Tandon et al. 2025 require window >= chunk).
        if self.e2e is not None and "swa" in self.mixers and self.attention.sliding_window < self.e2e.chunk_size:
            raise ValueError(f"attention.sliding_window={self.attention.sliding_window} is smaller than "
                             f"e2e.chunk_size={self.e2e.chunk_size}; TTT-E2E needs a window of at least one chunk")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads of attention layers (attention.num_kv_heads, defaulting to num_heads)."""
        return self.num_heads if self.attention.num_kv_heads is None else self.attention.num_kv_heads

    @property
    def pattern(self) -> tuple[str, ...]:
        """The mixers of one pattern repetition, e.g. ("swa", "swa", "swa", "ttt_mlp")."""
        return tuple(name.strip() for name in self.layer_pattern.split(","))

    @property
    def model_stages(self) -> tuple[StageConfig, ...]:
        """The stages bottom to top: `stages`, or one stage of `layer_pattern` repeated to the depth."""
        return self.stages or (StageConfig(self.layer_pattern, self.num_layers // len(self.pattern)),)

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer of every layer, bottom to top."""
        return tuple(mixer for stage in self.model_stages for mixer in stage.pattern * stage.repeats)

    @property
    def remat_policy_name(self) -> str:
        if self.remat is True:
            return "full"
        if self.remat is False:
            return "none"
        return self.remat

    def ttt_layer_config(self, mixer: str) -> TTTLayerConfig:
        """The `TTTLayerConfig` of a `ttt_linear` or `ttt_mlp` layer of this model."""
        if mixer not in TTT_MIXERS:
            raise ValueError(f"mixer={mixer!r} is not a TTT mixer; expected one of {tuple(TTT_MIXERS)}")
        inner, ttt = TTT_MIXERS[mixer], self.ttt
        return TTTLayerConfig(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            inner=inner,
            mini_batch_size=ttt.mini_batch_size,
            backbone=ttt.backbone,
            base_lr=ttt.base_lr(inner),
            conv_kernel=ttt.conv_kernel,
            rope_theta=self.rope_theta,
            rope_pairing=self.rope_pairing,
            form=ttt.form,
            remat_group_size=ttt.remat_group_size,
            inner_norm=ttt.inner_norm,
            learn_initial_weights=ttt.learn_initial_weights,
            learn_inner_lr=ttt.learn_inner_lr,
            learn_token_scale=ttt.learn_token_scale,
            init_std=self.init_std,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


# Flat fields of configs saved before the attention, TTT and TTT-E2E settings were nested: old name ->
# new name inside `attention` / `ttt` / `e2e`.
LEGACY_ATTENTION_FIELDS = {"num_kv_heads": "num_kv_heads", "sliding_window": "sliding_window", "qk_norm": "qk_norm"}
LEGACY_TTT_FIELDS = {"mini_batch_size": "mini_batch_size", "backbone": "backbone",
                     "ttt_linear_base_lr": "linear_base_lr", "ttt_mlp_base_lr": "mlp_base_lr", "ttt_form": "form",
                     "ttt_remat_group_size": "remat_group_size", "conv_kernel": "conv_kernel"}
LEGACY_E2E_FIELDS = {"e2e_chunk_size": "chunk_size", "e2e_inner_lr": "inner_lr", "e2e_inner_clip": "inner_clip",
                     "e2e_fast_params": "fast_params", "e2e_remat": "remat"}


def from_json(data: dict) -> ModelConfig:
    """The ModelConfig of its JSON form (`dataclasses.asdict`), also when saved with the old flat field
    names (`LEGACY_ATTENTION_FIELDS`, `LEGACY_TTT_FIELDS`, `LEGACY_E2E_FIELDS`; `e2e_chunk_size=None` means
    no TTT-E2E)."""
    data = dict(data)
    legacy_attention = {new: data.pop(old) for old, new in LEGACY_ATTENTION_FIELDS.items() if old in data}
    legacy_ttt = {new: data.pop(old) for old, new in LEGACY_TTT_FIELDS.items() if old in data}
    legacy_e2e = {new: data.pop(old) for old, new in LEGACY_E2E_FIELDS.items() if old in data}
    if legacy_attention:
        data["attention"] = {**data.get("attention", {}), **legacy_attention}
    if legacy_ttt:
        data["ttt"] = {**data.get("ttt", {}), **legacy_ttt}
    if legacy_e2e.get("chunk_size") is not None:
        data["e2e"] = legacy_e2e
    return ModelConfig(**data)
