"""Stages: a layer pattern repeated n times, its groups' parameters stacked and scanned.

A stage is a `BlockGroup` whose every parameter has a leading axis of `repeats` (logical name
"layers"), built with `nnx.vmap` and run with `nnx.scan`, so compile time does not grow with depth.
Its state is the groups' states stacked the same way.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt.configs import ModelConfig
from ttt.configs.model import StageConfig
from ttt.context import DEFAULT, Context
from ttt.models.blocks import BlockGroup

# Every parameter and state of a stage gets a leading axis with the logical name "layers" (the
# logical axis rules decide its mesh axis; normally none).
LAYER_AXIS = "layers"
LAYER_AXIS_METADATA = {nnx.PARTITION_NAME: LAYER_AXIS}


def make_stage(config: ModelConfig, stage: StageConfig, rngs: nnx.Rngs) -> BlockGroup:
    """`stage.repeats` groups of `stage.pattern`, stacked."""

    @nnx.split_rngs(splits=stage.repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_AXIS_METADATA)
    def make_groups(rngs: nnx.Rngs) -> BlockGroup:
        return BlockGroup(config, stage.pattern, prime_mlp=stage.prime_mlp, rngs=rngs)

    return make_groups(rngs)


def run_stage(groups: BlockGroup, x: jax.Array, states=None, context: Context = DEFAULT, *,
              keep_state: bool = True, remat_policy=None):
    """Runs x [batch, seq, embed] through every group of a stage, reading from `states` (None: initial).

    Returns (y [batch, seq, embed], the stacked states after x, or None when `keep_state` is False).
    `remat_policy` (None: no rematerialisation; "full" or a `jax.checkpoint_policies` function)
    rematerialises each group when no state is kept (the training forward).
    """
    if states is None and not keep_state:

        def body(group: BlockGroup, x: jax.Array, context: Context) -> jax.Array:
            return group.extend(x, None, context)[0]

        if remat_policy is not None:
            body = nnx.remat(body, policy=None if remat_policy == "full" else remat_policy)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry,
                        transform_metadata=LAYER_AXIS_METADATA)
        return scan(groups, x, context), None
    if states is None:

        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=(nnx.Carry, 0), transform_metadata=LAYER_AXIS_METADATA)
        def read(group: BlockGroup, x: jax.Array, context: Context):
            return group.extend(x, None, context)

        return read(groups, x, context)

    # The stacked states are carried and each group's slice is written back in place; scanning them as
    # inputs/outputs instead would copy every KV cache once more per decoded token.
    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS_METADATA)
    def continue_group(group: BlockGroup, carry, context: Context):
        x, states, index = carry
        x, group_states = group.extend(x, jax.tree.map(lambda stacked: stacked[index], states), context)
        states = jax.tree.map(lambda stacked, new: stacked.at[index].set(new), states, group_states)
        return x, states, index + 1

    x, states, _ = continue_group(groups, (x, states, jnp.zeros((), jnp.int32)), context)
    return x, states


def init_stage_state(groups: BlockGroup, batch: int):
    """The stacked states of every group before any token."""

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYER_AXIS_METADATA)
    def init(group: BlockGroup):
        return group.init_state(batch)

    return init(groups)


def stage_state_axes(groups: BlockGroup):
    """Logical axis names of the stacked states: each group's, after a leading "layers"."""
    return jax.tree.map(lambda spec: P(LAYER_AXIS, *spec), groups.state_axes(),
                        is_leaf=lambda x: isinstance(x, P))
