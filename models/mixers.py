"""The sequence mixers by name: every layer kind a block can hold.

A mixer is an NNX module with one forward, `extend(x, state, context) -> (y, state)` on
x [batch, seq, embed] (state None: the initial state), plus `init_state(batch)`, `state_axes()`
(logical axis names of its state) and `__call__(x, context)`. Adding a mixer is one module and one
entry here (its name also goes into `ttt.configs.model.MIXERS`, which configs validate against).
"""

from typing import Callable

from flax import nnx

import ttt
from ttt.configs import ModelConfig
from ttt.configs.model import MIXERS
from ttt.models.attention import Attention

BUILDERS: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {
    "attention": lambda config, rngs: Attention(config, window=None, rngs=rngs),
    "swa": lambda config, rngs: Attention(config, window=config.attention.sliding_window, rngs=rngs),
    "ttt_linear": lambda config, rngs: ttt.TTTLayer(config.ttt_layer_config("ttt_linear"), rngs=rngs),
    "ttt_mlp": lambda config, rngs: ttt.TTTLayer(config.ttt_layer_config("ttt_mlp"), rngs=rngs),
}
assert set(BUILDERS) == set(MIXERS), "every mixer name of the configs needs a builder here"


def make_mixer(config: ModelConfig, mixer: str, *, rngs: nnx.Rngs) -> nnx.Module:
    """The sequence mixer called `mixer`."""
    if mixer not in BUILDERS:
        raise ValueError(f"unknown mixer {mixer!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[mixer](config, rngs)
