"""Pre-norm residual blocks whose sequence mixer is chosen by name, and groups of them.

Every mixer (attention, sliding-window attention, TTT layers) has one interface:
`mixer(x, inner_lr_scale)`, `mixer.prefill(x) -> (y, state)`, `mixer.init_state(batch)`,
`mixer.step(x_t, state) -> (y_t, state)`, so a block never asks which kind it holds.
`inner_lr_scale` multiplies the inner learning rate of TTT layers during training (the inner-LR
warmup); attention ignores it, and inference always runs at scale 1.
"""

from typing import Any

import jax
from flax import nnx

import ttt
from ttt.configs import ModelConfig
from ttt.models.attention import Attention
from ttt.models.layers import SwiGLU, rms_norm
from ttt.sharding import constrain

State = Any  # a mixer's decode state: a pytree of arrays


def make_mixer(config: ModelConfig, mixer: str, *, rngs: nnx.Rngs) -> nnx.Module:
    """The sequence mixer called `mixer` (one of `ttt.configs.model.MIXERS`)."""
    if mixer == "attention":
        return Attention(config, window=None, rngs=rngs)
    if mixer == "swa":
        return Attention(config, window=config.sliding_window, rngs=rngs)
    if mixer in ("ttt_linear", "ttt_mlp"):
        return ttt.TTTLayer(config.ttt_layer_config(mixer), rngs=rngs)
    raise ValueError(f"unknown mixer {mixer!r}; expected attention, swa, ttt_linear or ttt_mlp")


class Block(nnx.Module):
    """`h = x + mixer(norm(x)); out = h + mlp(norm(h))` on [batch, seq, embed]."""

    def __init__(self, config: ModelConfig, mixer: str, *, rngs: nnx.Rngs):
        self.mixer_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
        self.mixer = make_mixer(config, mixer, rngs=rngs)
        self.mlp_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
        self.mlp = SwiGLU(config, rngs=rngs)

    def _mlp_residual(self, h: jax.Array) -> jax.Array:
        return constrain(h + self.mlp(self.mlp_norm(h)), ("batch", "seq", "embed"))

    def __call__(self, x: jax.Array, inner_lr_scale: jax.Array | float = 1.0) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed]."""
        return self._mlp_residual(x + self.mixer(self.mixer_norm(x), inner_lr_scale))

    def prefill(self, x: jax.Array) -> tuple[jax.Array, State]:
        """x: [batch, seq, embed] -> (same as `__call__`, mixer state after reading x)."""
        mixed, state = self.mixer.prefill(self.mixer_norm(x))
        return self._mlp_residual(x + mixed), state

    def init_state(self, batch: int) -> State:
        return self.mixer.init_state(batch)

    def step(self, x: jax.Array, state: State) -> tuple[jax.Array, State]:
        """x: [batch, embed], one token per sequence -> ([batch, embed], next state)."""
        mixed, state = self.mixer.step(self.mixer_norm(x), state)
        return self._mlp_residual((x + mixed)[:, None, :])[:, 0, :], state


class BlockGroup(nnx.Module):
    """One repetition of the layer pattern: a block per mixer name in `config.pattern`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(config, mixer, rngs=rngs) for mixer in config.pattern])

    def __call__(self, x: jax.Array, inner_lr_scale: jax.Array | float = 1.0) -> jax.Array:
        for block in self.blocks:
            x = block(x, inner_lr_scale)
        return x

    def prefill(self, x: jax.Array) -> tuple[jax.Array, tuple[State, ...]]:
        states = []
        for block in self.blocks:
            x, state = block.prefill(x)
            states.append(state)
        return x, tuple(states)

    def init_state(self, batch: int) -> tuple[State, ...]:
        return tuple(block.init_state(batch) for block in self.blocks)

    def step(self, x: jax.Array, states: tuple[State, ...]) -> tuple[jax.Array, tuple[State, ...]]:
        next_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, state)
            next_states.append(state)
        return x, tuple(next_states)
