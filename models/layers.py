"""Small building blocks shared by the model modules: parameter initialisers, RMSNorm, SwiGLU MLP, pre-convolution."""

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.configs import ModelConfig
from ttt.conv import causal_depthwise_conv, next_history
from ttt.projection import project
from ttt.sharding import constrain, partitioned


def normal_init(config: ModelConfig, logical_axes: tuple[str | None, ...]):
    """Normal(0, init_std) initialiser whose parameter carries `logical_axes`."""
    return partitioned(nnx.initializers.normal(config.init_std), logical_axes)


def rms_norm(config: ModelConfig, size: int, logical_axis: str, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm over the last axis (statistics in float32) with a learnable scale named `logical_axis`."""
    return nnx.RMSNorm(size, epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                       scale_init=partitioned(nnx.initializers.ones, (logical_axis,)), rngs=rngs)


class SwiGLU(nnx.Module):
    """Gated MLP: `(silu(x W_gate) * (x W_up)) W_down`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        width, hidden = config.hidden_size, config.mlp_hidden_size
        dense = dict(use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.gate = nnx.Linear(width, hidden, kernel_init=normal_init(config, ("embed", "mlp")), **dense)
        self.up = nnx.Linear(width, hidden, kernel_init=normal_init(config, ("embed", "mlp")), **dense)
        self.down = nnx.Linear(hidden, width, kernel_init=normal_init(config, ("mlp", "embed")), **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed]."""
        # One shared backward for the two projections of x (ttt/projection.py says why).
        gate, up = project(x, (self.gate.kernel[...], self.up.kernel[...]), self.gate.dtype)
        hidden = jax.nn.silu(gate) * up
        hidden = constrain(hidden, ("batch", "seq", "mlp"))
        return constrain(self.down(hidden), ("batch", "seq", "embed"))


class PreConvolution(nnx.Module):
    """`x + conv(RMSNorm(x))`: a causal depthwise convolution over the sequence (width `ttt.conv_kernel`, with
    bias) that starts every block of the Mamba-backbone models of Sun et al. 2024. Its state is the last
    `ttt.conv_kernel - 1` normalised inputs [batch, K - 1, embed]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        width, param_dtype = config.hidden_size, config.param_dtype
        self.norm = rms_norm(config, width, "embed", rngs=rngs)
        # LeCun normal over the K taps of each channel: flax's default for the convolution it replaces.
        weight_init = partitioned(nnx.initializers.lecun_normal(), (None, "embed"))
        self.weight = nnx.Param(weight_init(rngs.params(), (config.ttt.conv_kernel, width), param_dtype))
        self.bias = nnx.Param(partitioned(nnx.initializers.zeros, ("embed",))(rngs.params(), (width,), param_dtype))

    def __call__(self, x: jax.Array, history: jax.Array,
                 document_starts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x: [batch, seq, embed] after `history` -> (x + conv(RMSNorm(x)), the history after x); with
        `document_starts` [batch, seq], no position reads one before its document's start."""
        normed = self.norm(x)
        dtype = normed.dtype
        mixed = causal_depthwise_conv(normed, self.weight[...].astype(dtype), self.bias[...].astype(dtype), history,
                                      document_starts)
        return constrain(x + mixed, ("batch", "seq", "embed")), next_history(history, normed, document_starts)

    def init_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.config.ttt.conv_kernel - 1, self.config.hidden_size), self.config.dtype)
