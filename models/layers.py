"""Small building blocks shared by the model modules: parameter initialisers, RMSNorm, SwiGLU MLP."""

import jax
from flax import nnx

from ttt.configs import ModelConfig
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
        hidden = jax.nn.silu(self.gate(x)) * self.up(x)
        hidden = constrain(hidden, ("batch", "seq", "mlp"))
        return constrain(self.down(hidden), ("batch", "seq", "embed"))
