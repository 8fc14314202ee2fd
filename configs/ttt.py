"""Configuration of the TTT mixers of a model (`ModelConfig.ttt`): what every `ttt_linear` and `ttt_mlp`
layer shares, and the switches of the ablation ladder of Sun et al. 2024, Table 1."""

import dataclasses
from typing import Literal

# Inner learning-rate scales of Sun et al. 2024 (TTT-Linear 1.0, TTT-MLP 0.1).
DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """The TTT layers of a model. The defaults are the paper's best configuration; each `learn_*` or
    `inner_norm` switch set to False removes one ingredient of Table 1 of Sun et al. 2024 (whose rows,
    bottom up, are: linear attention; + learnable W0; + LN and residual in f; + mini-batch TTT;
    + learnable inner LR; + Mamba backbone).

    Attributes:
      mini_batch_size: tokens per inner gradient step b (Table 1 "mini-batch TTT": b = 16; the
        "batch GD" rows take b = the whole sequence).
      backbone: `"mamba"` (shared q/k projection, causal convolution, output gate; Table 1's last
        row) or `"transformer"`.
      linear_base_lr: inner learning-rate scale of TTT-Linear layers.
      mlp_base_lr: inner learning-rate scale of TTT-MLP layers.
      form: how TTT layers compute full sequences, `"dual"` or `"primal"`.
      remat_group_size: TTT mini-batches per rematerialised group in the inner scan.
      conv_kernel: width of the causal convolutions of the mamba backbone and of `pre_conv`.
      inner_norm: f(x) = x + LN(g(x)) with the inner loss reconstructing v - k (Table 1 "+ LN and
        residual in f"); False: f(x) = g(x), no LayerNorm, no residual, the loss reconstructs v.
      learn_initial_weights: the initial fast weights W0 are learned (Table 1 "+ learnable W0");
        False: W0 = 0, fixed and not a parameter.
      learn_inner_lr: per-token inner learning rate eta = base_lr * sigmoid(x . w + beta) / head_dim
        with learned gate (Table 1 "+ learnable eta"); False: the constant eta = base_lr / head_dim.
      learn_token_scale: the per-position scale is max(1/i + offset_i, 0) with a learned offset;
        False: the fixed 1/i of the paper's equations.
    """

    mini_batch_size: int = 16
    backbone: Literal["mamba", "transformer"] = "mamba"
    linear_base_lr: float = DEFAULT_BASE_LR["linear"]
    mlp_base_lr: float = DEFAULT_BASE_LR["mlp"]
    form: Literal["dual", "primal"] = "dual"
    remat_group_size: int = 4
    conv_kernel: int = 4
    inner_norm: bool = True
    learn_initial_weights: bool = True
    learn_inner_lr: bool = True
    learn_token_scale: bool = True

    def __post_init__(self):
        for name in ("mini_batch_size", "remat_group_size", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"ttt.{name}={getattr(self, name)}; expected >= 1")
        if self.backbone not in ("mamba", "transformer"):
            raise ValueError(f"ttt.backbone={self.backbone!r}; expected 'mamba' or 'transformer'")
        if self.form not in ("dual", "primal"):
            raise ValueError(f"ttt.form={self.form!r}; expected 'dual' or 'primal'")

    def base_lr(self, inner: str) -> float:
        """The inner learning-rate scale of layers with inner model `inner` (`"linear"` or `"mlp"`)."""
        return {"linear": self.linear_base_lr, "mlp": self.mlp_base_lr}[inner]
