"""Mesh construction, the logical-axis rules, and parameters really sharded as the rules say (8 CPU devices)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tests.train.conftest import MICRO_MODEL
from ttt.configs.train import MeshConfig, OptimizerConfig
from ttt.train import mesh as mesh_lib
from ttt.train.optim import make_optimizer
from ttt.sharding import constrain
from ttt.train.step import create_model

# Written out here, independently of LOGICAL_AXIS_RULES: where each logical axis of a parameter must live.
EXPECTED_MESH_AXIS = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
                      "head_dim": None, "layers": None, None: None}
VOCABULARY = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")


def test_rules_cover_the_vocabulary_and_never_reuse_a_mesh_axis():
    assert set(VOCABULARY) <= {name for name, _ in mesh_lib.LOGICAL_AXIS_RULES}
    mesh_lib.check_rules()
    conflicting = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("seq", None))
    with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
        mesh_lib.logical_to_spec(("batch", "seq", "embed"), conflicting)
    with pytest.raises(ValueError, match="'colour' .* has no rule"):
        mesh_lib.logical_to_spec(("batch", "colour"))


def test_activations_split_rows_over_data_and_fsdp_and_keep_embed_whole():
    """FSDP: parameters are split along embed over fsdp, activations along the batch over data x fsdp."""
    assert mesh_lib.logical_to_spec(("batch", "seq", "embed"), activation=True) == PartitionSpec(("data", "fsdp"), None, None)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with mesh_lib.activate(mesh):
        x = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "embed")))(np.ones((8, 3, 4), np.float32))
    assert _padded(x.sharding.spec, 3) == (("data", "fsdp"), None, None)
    assert x.addressable_shards[0].data.shape == (2, 3, 4)
    assert mesh_lib.batch_ways(mesh) == 4


def test_specs_on_a_mesh_leave_out_its_size_one_axes():
    """A jitted step returns its outputs without size-1 axes; specs made for that mesh must agree."""
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    assert mesh_lib.logical_to_spec(("batch", "seq", "embed"), mesh=mesh, activation=True) == PartitionSpec("data", None, None)
    assert mesh_lib.logical_to_spec(("embed", "heads"), mesh=mesh) == PartitionSpec(None, "tensor")
    assert mesh_lib.batch_sharding(mesh).spec == PartitionSpec("data", None)
    assert dict(mesh_lib.rules_on(mesh))["batch"] == "data" and dict(mesh_lib.rules_on(mesh))["embed"] is None


def test_mesh_shape_fills_the_rest_and_rejects_a_wrong_device_count():
    assert mesh_lib.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_lib.make_mesh(MeshConfig(data=-1, tensor=4)).shape == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="= 12 devices, but there are 8 devices"):
        mesh_lib.make_mesh(MeshConfig(data=3, fsdp=2, tensor=2))
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        mesh_lib.make_mesh(MeshConfig(data=-1, fsdp=3))


def test_mesh_that_does_not_divide_the_heads_is_a_clear_error():
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    with mesh_lib.activate(mesh), pytest.raises(ValueError, match=r"heads=4\) is not divisible by mesh axis 'tensor'"):
        create_model(MICRO_MODEL, mesh, seed=0)


def _padded(spec: PartitionSpec, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with mesh_lib.activate(mesh):
        model = create_model(MICRO_MODEL, mesh, seed=0)
        optimizer = nnx.Optimizer(model, make_optimizer(OptimizerConfig(), 10), wrt=nnx.Param)
    used_axes = set()
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        expected = tuple(EXPECTED_MESH_AXIS[name] for name in variable.get_metadata()["out_sharding"])
        assert _padded(value.sharding.spec, value.ndim) == expected, path
        shard_shape = value.addressable_shards[0].data.shape
        for size, shard, axis in zip(value.shape, shard_shape, expected):
            assert shard == size // (mesh.shape[axis] if axis else 1), (path, value.shape, shard_shape)
        used_axes.update(axis for axis in expected if axis)
    assert used_axes == {"fsdp", "tensor"}
    embedding = model.embed.embedding.get_value()
    assert _padded(embedding.sharding.spec, 2) == ("tensor", "fsdp")
    adam_moments = [leaf for leaf in jax.tree.leaves(nnx.state(optimizer)) if np.shape(leaf) == embedding.shape]
    assert adam_moments and all(m.sharding.is_equivalent_to(embedding.sharding, 2) for m in adam_moments)
