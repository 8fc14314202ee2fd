"""Configuration of one TTT layer (`ttt.TTTLayer`)."""

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class TTTLayerConfig:
    """A TTT sequence mixer: fast weights trained on the sequence while it is read.

    Attributes:
      hidden_size: model width D; split into `num_heads` heads of `hidden_size // num_heads`.
      num_heads: number of TTT heads, each with its own fast weights.
      inner: inner model, `"linear"` (TTT-Linear) or `"mlp"` (TTT-MLP, GELU, 4x hidden).
      mini_batch_size: tokens per inner gradient step (b).
      backbone: `"mamba"`: shared q/k projection, causal depthwise convolution before q and k,
        GELU output gate (Sun et al. 2024); `"transformer"`: separate q/k projections, no
        convolution, no gate.
      base_lr: inner learning rate scale; eta = base_lr * sigmoid(x . theta_h + beta_h) / head_dim.
      conv_kernel: width of the causal depthwise convolution (mamba backbone only).
      rope_theta: RoPE base; positions are taken relative to the mini-batch.
      rope_pairing: features rotated together, `"half"` (i, i + d/2) or `"interleaved"` (2i, 2i + 1,
        as in the reference code of Sun et al. 2024; for converted checkpoints).
      form: how full sequences are computed, `"dual"` (closed form) or `"primal"` (autodiff).
      remat_group_size: mini-batches per rematerialised group in the scan (memory vs recompute).
      inner_norm: f(x) = x + LN(g(x)) and the loss reconstructs v - k; False: f = g, no inner LayerNorm
        parameters, the loss reconstructs v (configs/ttt.py: the rows of Sun et al. 2024, Table 1).
      learn_initial_weights: W0 is a parameter; False: W0 = 0, not a parameter.
      learn_inner_lr: eta has the learned gate above; False: eta = base_lr / head_dim.
      learn_token_scale: s_i = max(1/i + offset_i, 0) with a learned offset; False: s_i = 1/i.
      init_std: standard deviation of the normal initialiser of the projections and the inner-LR gate
        (the model's `init_std`).
      norm_eps: epsilon of the post-norm (the model's `norm_eps`); the inner LayerNorm's epsilon is part
        of the inner loss and fixed at 1e-6 (docs/MATH.md).
      dtype: compute dtype of the projections (the inner loop always runs in float32).
      param_dtype: storage dtype of the parameters.
    """

    hidden_size: int
    num_heads: int
    inner: Literal["linear", "mlp"] = "linear"
    mini_batch_size: int = 16
    backbone: Literal["mamba", "transformer"] = "mamba"
    base_lr: float = 1.0
    conv_kernel: int = 4
    rope_theta: float = 10000.0
    rope_pairing: Literal["half", "interleaved"] = "half"
    form: Literal["dual", "primal"] = "dual"
    remat_group_size: int = 4
    inner_norm: bool = True
    learn_initial_weights: bool = True
    learn_inner_lr: bool = True
    learn_token_scale: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.inner not in ("linear", "mlp"):
            raise ValueError(f"inner={self.inner!r}; expected 'linear' or 'mlp'")
        if self.backbone not in ("mamba", "transformer"):
            raise ValueError(f"backbone={self.backbone!r}; expected 'mamba' or 'transformer'")
        if self.rope_pairing not in ("half", "interleaved"):
            raise ValueError(f"rope_pairing={self.rope_pairing!r}; expected 'half' or 'interleaved'")
        if self.form not in ("dual", "primal"):
            raise ValueError(f"form={self.form!r}; expected 'dual' or 'primal'")
        for name in ("mini_batch_size", "conv_kernel", "remat_group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
