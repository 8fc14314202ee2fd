"""What of an `LM` cache is a memory: the state learned from the text read, without the text itself.

A cache holds, per block, the mixer's state and (with `pre_conv`) the pre-convolution's history.
A TTT mixer's state is fast weights trained on what was read (plus its gradient sum, position inside
the mini-batch and q/k convolution history); an attention mixer's state is the keys and values of
the tokens themselves. The *memory state* keeps the first and drops the second:

    {"stages": [per stage: [per block of the pattern: {"mixer": TTT state (TTT blocks only),
                                                       "pre_conv": history (when config.pre_conv)}],
                stacked over the pattern's repetitions like the cache]}

so its size depends on the model only, never on how much was read. `to_cache` turns it back into a
cache whose attention parts are empty: a model that continues from it sees what was learned, not
what was said.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ttt.models.lm import LM, Cache

MemoryState = dict[str, Any]
# Mixers whose state is the context itself (keys and values), not something learned from it.
CONTEXT_MIXERS = ("attention", "swa")


def has_learned_state(model: LM) -> bool:
    """Whether any layer of `model` learns while it reads (a memory of a model without one would hold nothing)."""
    return any(mixer not in CONTEXT_MIXERS for mixer in model.config.mixers)


def _select(model: LM, tree: Cache) -> MemoryState:
    """The memory part of a cache-structured tree (a cache or its axes)."""
    stages = []
    for stage, blocks in zip(model.config.model_stages, tree["stages"]):
        kept = []
        for mixer, block in zip(stage.pattern, blocks):
            kept.append({name: part for name, part in block.items() if name != "mixer" or mixer not in CONTEXT_MIXERS})
        stages.append(kept)
    return {"stages": stages}


def memory_state(model: LM, cache: Cache) -> MemoryState:
    """The learned part of `cache` (see the module docstring); arrays are shared, not copied."""
    return _select(model, cache)


def memory_state_axes(model: LM) -> MemoryState:
    """Logical axis names (a `PartitionSpec` per array) of a memory state of `model`."""
    return _select(model, model.cache_axes())


def initial_memory_state(model: LM, batch: int = 1) -> MemoryState:
    """The memory state before any token: every TTT layer at its learned initial weights."""
    return memory_state(model, model.init_cache(batch))


def memory_batch(model: LM, state: MemoryState) -> int:
    """How many sequences a memory state holds (its size along the logical "batch" axis)."""
    sizes = {leaf.shape[spec.index("batch")]
             for leaf, spec in zip(jax.tree.leaves(state), _leaf_specs(memory_state_axes(model))) if "batch" in spec}
    if len(sizes) != 1:
        raise ValueError(f"memory state with batch sizes {sorted(sizes)}; expected one size for every array")
    return sizes.pop()


def to_cache(model: LM, state: MemoryState, batch: int | None = None) -> Cache:
    """An `LM.extend` cache whose TTT layers and pre-convolutions continue from `state`, attention empty.

    Args:
      state: a memory state of `model` for B sequences.
      batch: sequences of the cache (None: B). A memory of one sequence serves any batch (every row
        starts from it); otherwise `batch` must equal B.
    Returns:
      the cache (`LM.init_cache(batch)`'s structure).
    """
    held = memory_batch(model, state)
    batch = held if batch is None else batch
    if held not in (1, batch):
        raise ValueError(f"a memory of {held} sequences cannot start a batch of {batch}; expected a memory of 1 "
                         f"sequence or of {batch}")
    cache = model.init_cache(batch)
    axes = model.cache_axes()

    def widen(array, spec):
        if "batch" not in spec:  # a TTT layer's position inside the mini-batch: shared by the rows
            return array
        axis = spec.index("batch")
        return jnp.broadcast_to(array, array.shape[:axis] + (batch,) + array.shape[axis + 1:])

    for s, (stage, blocks) in enumerate(zip(model.config.model_stages, state["stages"])):
        for j, block in enumerate(blocks):
            for name, part in block.items():
                cache["stages"][s][j][name] = jax.tree.map(widen, part, axes["stages"][s][j][name])
    return cache


def _leaf_specs(axes: MemoryState) -> list[P]:
    return jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, P))
