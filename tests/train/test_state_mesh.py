"""A model's cache is named by logical axes: saved on one mesh, restored onto another, it continues identically."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tests.train.conftest import MICRO_E2E_MODEL, MICRO_MODEL
from ttt.configs.train import MeshConfig
from ttt.train import mesh as mesh_lib
from ttt.train.step import create_model

extend = nnx.jit(lambda model, ids, cache: model.extend(ids, cache))


@pytest.mark.parametrize("config", [MICRO_MODEL, MICRO_E2E_MODEL], ids=["hybrid", "e2e"])
def test_cache_saved_on_one_mesh_continues_on_another(tmp_path, config):
    """Read 11 tokens (a TTT mini-batch of 16 not yet complete; TTT-E2E: two chunks of 4 stepped and 3
    tokens pending) 8-way data parallel, save the cache, restore it onto a data x fsdp x tensor mesh and
    read the other 9 there (TTT-E2E: two more chunks stepped on the way): the logits equal those of
    one pass over all 20 tokens, and every array lands with the sharding its names give on that mesh."""
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 20), dtype=np.int32)
    first = mesh_lib.make_mesh(MeshConfig(data=8))
    with mesh_lib.activate(first):
        model = create_model(config, first, seed=0)
        whole = nnx.jit(lambda m, ids: m(ids))(model, jax.device_put(ids, mesh_lib.batch_sharding(first)))
        _, cache = extend(model, jax.device_put(ids[:, :11], mesh_lib.batch_sharding(first)), None)
        cache = jax.device_put(cache, mesh_lib.state_shardings(model.cache_axes(), first))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp_path / "cache", cache)
        checkpointer.wait_until_finished()  # saving is asynchronous

    second = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with mesh_lib.activate(second):
        model = create_model(config, second, seed=0)
        shardings = mesh_lib.state_shardings(model.cache_axes(), second)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, shardings)
        restored = ocp.StandardCheckpointer().restore(tmp_path / "cache", target)
        for array, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
            assert array.sharding.is_equivalent_to(sharding, array.ndim)
        logits, _ = extend(model, jax.device_put(ids[:, 11:], mesh_lib.batch_sharding(second)), restored)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(whole)[:, 11:], rtol=1e-5, atol=1e-5)
