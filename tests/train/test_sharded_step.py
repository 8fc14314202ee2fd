"""A sharded forward pass and training step on 8 CPU devices equal the single-device ones; the step
compiles once across inner-LR scales.

The sharded step also accumulates gradients over two micro-batches while the single-device step
takes the batch whole, so the same comparison checks gradient accumulation.
"""

import re

import jax
import jax.monitoring
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import ttt
from tests.train.conftest import MICRO_E2E_MODEL, MICRO_MODEL
from ttt.configs import TTTLayerConfig
from ttt.configs.train import MeshConfig, OptimizerConfig
from ttt.train import mesh as mesh_lib
from ttt.train.optim import make_optimizer
from ttt.train.step import create_model, token_sharding, train_step


_COMPILATIONS = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: _COMPILATIONS.append(event) if event.endswith("backend_compile_duration") else None)


def _forward_and_step(mesh, model, tokens: np.ndarray, accumulation: int, transform):
    with mesh_lib.activate(mesh):
        optimizer = nnx.Optimizer(model, transform, wrt=nnx.Param)
        ids = jax.device_put(tokens[:, :-1], mesh_lib.batch_sharding(mesh))
        logits = nnx.jit(lambda m, x: m(x))(model, ids)
        micro_batches = jax.device_put(tokens.reshape(accumulation, -1, tokens.shape[-1]), token_sharding(mesh))
        metrics = train_step(model, optimizer, micro_batches, np.float32(1.0))
        params = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        # The inner-LR scale is traced: new values (the warmup's ramp) reuse the compiled step.
        compiled_before = len(_COMPILATIONS)
        for scale in (0.25, 0.5):
            jax.block_until_ready(train_step(model, optimizer, micro_batches, np.float32(scale)))
        assert len(_COMPILATIONS) == compiled_before, "train_step recompiled for a new inner-LR scale"
    return np.asarray(logits), jax.device_get(metrics), params


@pytest.mark.parametrize("config, slack", [(MICRO_MODEL, 1), (MICRO_E2E_MODEL, 10)], ids=["hybrid", "e2e"])
def test_sharded_forward_and_accumulated_train_step_equal_the_unsharded_ones(config, slack):
    """The step is plain SGD at learning rate 1, so the parameters after it differ by the gradients'
    differences. Adam's first update, lr * g / (|g| + eps), would turn the rounding of a near-zero gradient
    into a step of up to lr either way (seen on the hybrid: 2.2e-5 on one of 2048 elements, after a change
    that only reordered float32 rounding). TTT-E2E's step differentiates through its inner steps (8 chunks
    of 4), each row's fast weights its own; its tolerances are `slack` times wider: seven inner steps at
    learning rate 1 carry the reduction-order differences of their gradients into every later position
    (seen: 1.3e-5 on one logit of 65536)."""
    transform = optax.sgd(1.0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (8, 33), dtype=np.int32)
    sharded = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    single = mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with mesh_lib.activate(sharded):
        model_8 = create_model(config, sharded, seed=0)
    # The same initial values, whole on one device.
    graphdef, state = nnx.split(model_8)
    model_1 = nnx.merge(graphdef, jax.device_put(state, NamedSharding(single, PartitionSpec())))
    logits_1, metrics_1, params_1 = _forward_and_step(single, model_1, tokens, 1, transform)
    logits_8, metrics_8, params_8 = _forward_and_step(sharded, model_8, tokens, 2, transform)
    np.testing.assert_allclose(logits_8, logits_1, rtol=1e-5 * slack, atol=1e-5 * slack)
    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-6 * slack)
    np.testing.assert_allclose(metrics_8["grad_norm"], metrics_1["grad_norm"], rtol=1e-5 * slack)
    assert params_8.keys() == params_1.keys()
    for path in params_1:
        np.testing.assert_allclose(params_8[path], params_1[path], rtol=1e-5 * slack, atol=1e-5 * slack,
                                   err_msg=str(path))


def test_document_starts_are_traced_so_new_starts_reuse_the_compiled_step():
    """Document-aligned batches (`DataConfig.reset_at_documents`): the step with a mask and document starts
    compiles once; other starts (a start in another row) run the same executable, and the loss is finite."""
    tokens = np.random.default_rng(0).integers(0, MICRO_MODEL.vocab_size, (1, 2, 33), dtype=np.int32)
    mask = np.ones(tokens.shape, bool)
    single = mesh_lib.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with mesh_lib.activate(single):
        model = create_model(MICRO_MODEL, single, seed=0)
        optimizer = nnx.Optimizer(model, make_optimizer(OptimizerConfig(warmup_steps=0), 10), wrt=nnx.Param)
        starts = np.zeros(tokens.shape, bool)
        starts[0, 0, MICRO_MODEL.ttt.mini_batch_size] = True
        metrics = jax.device_get(train_step(model, optimizer, tokens, np.float32(1.0), mask, starts))
        assert metrics["finite"]
        compiled_before = len(_COMPILATIONS)
        starts[0, 1, MICRO_MODEL.ttt.mini_batch_size] = True
        metrics = jax.device_get(train_step(model, optimizer, tokens, np.float32(1.0), mask, starts))
        assert metrics["finite"] and len(_COMPILATIONS) == compiled_before, "train_step recompiled for new starts"


def test_the_second_step_on_a_mesh_with_a_size_one_axis_does_not_compile_again():
    """A jitted step returns its outputs without the mesh's size-1 axes (here fsdp) in their shardings and
    placed as XLA chose (norm parameters came out split over tensor); parameters created with other
    shardings made the second step a new program."""
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, tensor=2), devices=jax.devices()[:2])
    tokens = np.random.default_rng(0).integers(0, MICRO_MODEL.vocab_size, (1, 2, 33), dtype=np.int32)
    with mesh_lib.activate(mesh):
        model = create_model(MICRO_MODEL, mesh, seed=0)
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        tokens = jax.device_put(tokens, token_sharding(mesh))
        train_step(model, optimizer, tokens, np.float32(1.0))
        compiled = len(_COMPILATIONS)
        jax.block_until_ready(train_step(model, optimizer, tokens, np.float32(1.0)))
        assert len(_COMPILATIONS) == compiled, "the second train_step compiled again"


def _loop_collectives(hlo: str) -> tuple[list[str], int]:
    """(the all-reduce instructions that a while loop's body runs, directly or through the computations it
    calls; the number of while loops) of a compiled HLO module's text."""
    blocks, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            blocks[name] = []
        elif name:
            blocks[name].append(line)
    called = {n: re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", "\n".join(lines))
              for n, lines in blocks.items()}
    bodies = [b for lines in blocks.values() for b in re.findall(r"body=%([\w.\-]+)", "\n".join(lines))]
    reached, pending = set(), list(bodies)
    while pending:
        n = pending.pop()
        if n not in reached:
            reached.add(n)
            pending.extend(called.get(n, ()))
    collectives = [line for n in reached for line in blocks.get(n, ()) if re.search(r"all-reduce(-start)?\(", line)]
    return collectives, len(bodies)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("split", ["heads", "batch"])
def test_ttt_layer_backward_scan_does_not_synchronise_the_devices_per_step(inner, split):
    """With heads or batch rows split over devices, every array of the mini-batch scan is per row, so its
    backward needs no collective inside the loop: parameters shared by the heads (the token scale) or by
    the batch (the inner LN's) have their gradients summed once, after it. An all-reduce per step would
    synchronise the devices 2 * seq / b times per layer."""
    mesh_config = MeshConfig(data=1, tensor=2) if split == "heads" else MeshConfig(data=2, tensor=1)
    mesh = mesh_lib.make_mesh(mesh_config, devices=jax.devices()[:2])
    config = TTTLayerConfig(16, 2, inner=inner, mini_batch_size=4, remat_group_size=2)
    with mesh_lib.activate(mesh):
        graphdef, params = nnx.split(ttt.TTTLayer(config, rngs=nnx.Rngs(0)))
        x = np.ones((2 if split == "batch" else 1, 32, 16), np.float32)
        x = jax.device_put(x, mesh_lib.batch_sharding(mesh) if split == "batch" else mesh_lib.replicated(mesh))
        loss = lambda p: nnx.merge(graphdef, p)(x).sum()
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    collectives, loops = _loop_collectives(hlo)
    assert loops >= 2, "expected the forward and backward scans as while loops"
    assert "all-reduce(" in hlo, f"expected the {split} to be sharded (the parameter gradients sum over it)"
    assert collectives == []
