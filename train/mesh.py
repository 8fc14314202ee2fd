"""Device mesh and the one table mapping logical axis names to mesh axes.

Model code names every parameter and activation dimension logically (`"embed"`, `"heads"`, ...);
`LOGICAL_AXIS_RULES` is the only place where those names meet the mesh axes `data`, `fsdp`,
`tensor`. Partition specs are always derived from it, never written per parameter.
"""

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ttt.configs.train import MeshConfig
from ttt.sharding import first_use_only, mesh_axes, spec_entry

MESH_AXES = ("data", "fsdp", "tensor")

# Batch rows are split over `data` and `fsdp`; parameters along `embed` over `fsdp`, so
# parameters and optimizer state are sharded fsdp-ways and gathered for use (FSDP); heads, the MLP
# width and the vocabulary over `tensor` (Megatron-style). A parameter uses a mesh axis at most
# once (checked strictly); an activation drops from later dimensions a mesh axis an earlier one
# took (`ttt.sharding.first_use_only`), so `[batch, seq, embed]` is whole along embed.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)

# The activation name tuples the models constrain with (`ttt.sharding.constrain`).
ACTIVATION_AXES = (
    ("batch", "seq"),
    ("batch", "seq", "embed"),
    ("batch", "seq", "heads", "head_dim"),
    ("batch", "seq", "kv_heads", "head_dim"),
    ("batch", "heads", "seq", "head_dim"),
    ("batch", "seq", "mlp"),
    ("batch", "seq", "vocab"),
)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor), with a -1 resolved to the devices left over."""
    sizes = [config.data, config.fsdp, config.tensor]
    if any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes data={config.data} fsdp={config.fsdp} tensor={config.tensor}: each must be "
                         "a positive size, and at most one may be -1 (the rest of the devices)")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes data={config.data} fsdp={config.fsdp} tensor={config.tensor}: the fixed "
                             f"axes ({known} devices) do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
                         f"but there are {num_devices} devices; make the product match (or set one size to -1)")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A mesh over all devices (of every process) with Auto axes `data`, `fsdp`, `tensor`."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes, rules=LOGICAL_AXIS_RULES, *, mesh: Mesh | None = None,
                    activation=False) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry `logical_axes` (names or None).

    Raises if a name has no rule. For a parameter (the default) it also raises if two dimensions
    would land on the same mesh axis; an activation keeps such an axis for its first dimension.
    With `mesh`, the spec leaves out the mesh's size-1 axes, as `activate` and jitted steps do.
    """
    table = dict(rules if mesh is None else rules_on(mesh, rules))
    entries, used = [], {}
    for dim, name in enumerate(logical_axes):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} (dimension {dim} of {tuple(logical_axes)}) has no rule; "
                             f"rules cover {sorted(table)}")
        target = table[name]
        for axis in mesh_axes(target):
            if axis in used and not activation:
                raise ValueError(f"logical axes {used[axis]!r} and {name!r} of {tuple(logical_axes)} both map to "
                                 f"mesh axis {axis!r}; an array can use a mesh axis once")
            used.setdefault(axis, name)
        entries.append(target)
    spec = PartitionSpec(*entries)
    return first_use_only(spec) if activation else spec


def check_rules(rules=LOGICAL_AXIS_RULES) -> None:
    """Every rule targets a known mesh axis and every activation tuple has a valid spec."""
    for name, target in rules:
        for axis in mesh_axes(target):
            if axis not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {axis!r}: unknown mesh axis; expected one of {MESH_AXES}")
    for logical_axes in ACTIVATION_AXES:
        logical_to_spec(logical_axes, rules, activation=True)


def _axis_size(mesh: Mesh, target) -> int:
    return math.prod(mesh.shape[axis] for axis in mesh_axes(target))


def check_divisible(path: str, shape, logical_axes, mesh: Mesh) -> PartitionSpec:
    """The spec of one array, after checking that every mesh size divides its dimension."""
    spec = logical_to_spec(logical_axes, mesh=mesh)
    for dim, (size, name, target) in enumerate(zip(shape, logical_axes, spec)):
        ways = _axis_size(mesh, target)
        if size % ways:
            raise ValueError(f"{path}: dimension {dim} ({name}={size}) is not divisible by mesh axis {target!r} of "
                             f"size {ways}; choose mesh sizes that divide it (e.g. --mesh.tensor must divide heads)")
    return spec


def parameter_specs(abstract_state: nnx.State, mesh: Mesh) -> dict[str, PartitionSpec]:
    """`{param path: PartitionSpec}` from the logical names on each parameter, checked against `mesh`.

    `abstract_state` comes from `nnx.eval_shape`; parameters without logical names are replicated.
    """
    specs = {}
    for path, variable in nnx.to_flat_state(abstract_state):
        name = "/".join(str(part) for part in path)
        logical_axes = variable.get_metadata().get("out_sharding")
        shape = np.shape(variable.get_value())
        if logical_axes is None:
            specs[name] = PartitionSpec()
            continue
        if len(logical_axes) != len(shape):
            raise ValueError(f"{name}: logical axes {logical_axes} do not match its shape {shape}")
        specs[name] = check_divisible(name, shape, logical_axes, mesh)
    return specs


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Install `mesh` and the logical axis rules (without the mesh's size-1 axes, `rules_on`): create models
    and run steps inside this."""
    check_rules()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_on(mesh)):
        yield


def rules_on(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """`rules` without the mesh axes of size 1 on `mesh`. Such an axis splits nothing, and a jitted step
    returns its outputs without it; inputs named with it would be a different program to XLA, so the
    second training step would compile again."""
    kept = lambda target: spec_entry(tuple(axis for axis in mesh_axes(target) if mesh.shape[axis] > 1))
    return tuple((name, kept(target)) for name, target in rules)


def state_shardings(axes, mesh: Mesh):
    """NamedShardings of a state (a cache or a memory) from its logical axis names.

    Args:
      axes: a pytree of `PartitionSpec`s of logical names, e.g. `LM.cache_axes()`.
    Returns:
      the same pytree with a `NamedSharding` on `mesh` per array (activation rules: a mesh axis an
      earlier dimension uses is not used again).
    """
    return jax.tree.map(lambda spec: named_sharding(mesh, tuple(spec), activation=True), axes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_ways(mesh: Mesh) -> int:
    """How many ways the rules split a batch's rows on `mesh` (its size must be a multiple)."""
    return _axis_size(mesh, dict(LOGICAL_AXIS_RULES)["batch"])


def named_sharding(mesh: Mesh, logical_axes, *, activation=False) -> NamedSharding:
    """The NamedSharding on `mesh` of an array whose dimensions carry `logical_axes` (names or None)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh=mesh, activation=activation))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, seq]` token array."""
    return named_sharding(mesh, ("batch", "seq"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
