"""Pre-norm residual blocks whose sequence mixer is chosen by name, and the repeated groups of a stage.

Every level has the same one forward, `extend(x, state, context) -> (y, state)` (state None: the
initial state), so a block never asks which kind of mixer it holds.
"""

from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt.configs import ModelConfig
from ttt.context import DEFAULT, Context
from ttt.models.layers import PreConvolution, SwiGLU, rms_norm
from ttt.models.mixers import make_mixer
from ttt.sharding import constrain

State = Any  # a mixer's state: a dict of arrays


class Block(nnx.Module):
    """`h = x + mixer(norm(x)); out = h + mlp(norm(h))` on [batch, seq, embed], after `x = x + conv(norm(x))`
    when `config.pre_conv`. With `prime_mlp`, `h = h + prime_mlp(norm(h))` comes between the two (the
    place TTT-E2E gives its fast MLP); with `config.post_norm`, every branch's output is normed before
    it joins the residual. Its state is `{"mixer": the mixer's state}` (and `"pre_conv"`: the
    convolution's history)."""

    def __init__(self, config: ModelConfig, mixer: str, *, prime_mlp: bool = False, rngs: nnx.Rngs):
        post_norm = lambda: rms_norm(config, config.hidden_size, "embed", rngs=rngs) if config.post_norm else None
        self.pre_conv = PreConvolution(config, rngs=rngs) if config.pre_conv else None
        self.mixer_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
        self.mixer = make_mixer(config, mixer, rngs=rngs)
        self.mixer_post_norm = post_norm()
        if prime_mlp:
            self.prime_mlp_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
            self.prime_mlp = SwiGLU(config, rngs=rngs)
            self.prime_mlp_post_norm = post_norm()
        else:
            self.prime_mlp_norm = self.prime_mlp = self.prime_mlp_post_norm = None
        self.mlp_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
        self.mlp = SwiGLU(config, rngs=rngs)
        self.mlp_post_norm = post_norm()

    def extend(self, x: jax.Array, state: State | None = None, context: Context = DEFAULT) -> tuple[jax.Array, State]:
        """x: [batch, seq, embed] read from `state` (None: the initial state) -> ([batch, seq, embed], state after x)."""
        new_state = {}
        if self.pre_conv is not None:
            history = self.pre_conv.init_state(x.shape[0]) if state is None else state["pre_conv"]
            x, new_state["pre_conv"] = self.pre_conv(x, history, context.document_starts)
        mixed, new_state["mixer"] = self.mixer.extend(self.mixer_norm(x), None if state is None else state["mixer"],
                                                      context)
        h = x + _maybe(self.mixer_post_norm, mixed)
        if self.prime_mlp is not None:
            h = h + _maybe(self.prime_mlp_post_norm, self.prime_mlp(self.prime_mlp_norm(h)))
        out = h + _maybe(self.mlp_post_norm, self.mlp(self.mlp_norm(h)))
        return constrain(out, ("batch", "seq", "embed")), new_state

    def init_state(self, batch: int) -> State:
        state = {"mixer": self.mixer.init_state(batch)}
        if self.pre_conv is not None:
            state["pre_conv"] = self.pre_conv.init_state(batch)
        return state

    def state_axes(self) -> State:
        axes = {"mixer": self.mixer.state_axes()}
        if self.pre_conv is not None:
            axes["pre_conv"] = P("batch", None, "embed")
        return axes


def _maybe(norm: nnx.RMSNorm | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


class BlockGroup(nnx.Module):
    """One repetition of a stage's layer pattern: a block per mixer name; its state is a list, one per block."""

    def __init__(self, config: ModelConfig, pattern: tuple[str, ...], *, prime_mlp: bool = False, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(config, mixer, prime_mlp=prime_mlp, rngs=rngs) for mixer in pattern])

    def extend(self, x: jax.Array, states: list[State] | None = None,
               context: Context = DEFAULT) -> tuple[jax.Array, list[State]]:
        states = [None] * len(self.blocks) if states is None else states
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.extend(x, state, context)
            new_states.append(state)
        return x, new_states

    def init_state(self, batch: int) -> list[State]:
        return [block.init_state(batch) for block in self.blocks]

    def state_axes(self) -> list[State]:
        return [block.state_axes() for block in self.blocks]
