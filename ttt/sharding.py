"""Parameter and activation sharding by logical axis names.

Model code names axes logically (`"batch"`, `"seq"`, `"embed"`, `"heads"`, ...); the mapping
to mesh axes is one table of rules installed with `flax.nnx.logical_axis_rules(rules)` by the
training code. Outside a mesh (`jax.set_mesh`) every constraint here is the identity, so the
same model runs unsharded in tests and notebooks.

An activation resolves its dimensions left to right and a mesh axis used by an earlier dimension
is not used again: with `batch -> (data, fsdp)` and `embed -> fsdp`, a `[batch, seq, embed]`
activation is split over data and fsdp by its rows and whole along embed (FSDP), while the
parameters, which have no batch axis, stay split over fsdp along embed.
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
    return jax.lax.with_sharding_constraint(x, first_use_only(spec))


def first_use_only(spec: jax.sharding.PartitionSpec) -> jax.sharding.PartitionSpec:
    """`spec` without the mesh axes that an earlier dimension already uses.

    E.g. `P(("data", "fsdp"), None, "fsdp")` -> `P(("data", "fsdp"), None, None)`.
    """
    used, dims = set(), []
    for entry in spec:
        kept = tuple(axis for axis in mesh_axes(entry) if axis not in used)
        used.update(kept)
        dims.append(spec_entry(kept))
    return jax.sharding.PartitionSpec(*dims)


def mesh_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (or rule target): a name, a tuple of names, or None."""
    return (entry,) if isinstance(entry, str) else tuple(axis for axis in (entry or ()) if axis is not None)


def spec_entry(axes: tuple[str, ...]):
    """The PartitionSpec entry splitting one dimension over `axes`: None, one name, or a tuple of names."""
    return axes[0] if len(axes) == 1 else (axes or None)
