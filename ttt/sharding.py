"""Activation sharding by logical axis names.

Model code names axes logically (`"batch"`, `"seq"`, `"embed"`, `"heads"`, ...); the mapping
to mesh axes is one table of rules installed with `flax.nnx.logical_axis_rules(rules)` by the
training code. Outside a mesh (`jax.set_mesh`) every constraint here is the identity, so the
same model runs unsharded in tests and notebooks.
"""

import jax
from flax import nnx
from flax.core import spmd


def partitioned(initializer, logical_axes: tuple[str | None, ...]):
    """`initializer` whose parameter carries the logical axis names `logical_axes`.

    Under a mesh (`jax.set_mesh`) the parameter is created already sharded (eager sharding, with
    the logical axis rules in force); without one (tests, notebooks) it is created unsharded with
    the same names, since eager sharding needs a mesh.
    """
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(initializer, logical_axes, eager_sharding=eager)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` on `x` by logical axis names; identity without a mesh.

    Args:
      x: any array.
      logical_axes: one logical name (or None) per dimension of `x`.
    """
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical_axes {logical_axes} has {len(logical_axes)} names for an array of shape {x.shape}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not spmd.get_logical_axis_rules():
        return x
    spec = spmd.apply_rules(jax.sharding.PartitionSpec(*logical_axes), None)
    return jax.lax.with_sharding_constraint(x, spec)
