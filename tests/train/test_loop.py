"""The training loop: exact resume, restore onto another mesh, incompatible checkpoints, the NaN guard."""

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import MICRO_MODEL
from ttt.configs.train import MeshConfig, OptimizerConfig
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import loop
from ttt.train import mesh as mesh_lib
from ttt.train.optim import make_optimizer
from ttt.train.step import create_model, token_sharding, train_step


def _params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _files(directory: str) -> dict[str, str]:
    digests = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                digests[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def test_resume_continues_the_identical_loss_trajectory(run_config, tmp_path):
    straight = loop.train(dataclasses.replace(run_config, steps=6, workdir=str(tmp_path / "straight")))
    split = dataclasses.replace(run_config, steps=6, workdir=str(tmp_path / "split"))
    first = loop.train(split, stop_after=3)
    second = loop.train(split)
    assert sorted(straight.losses) == list(range(1, 7))
    assert sorted(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == straight.losses  # bit-identical, data order included
    for path, value in _params(straight.model).items():
        np.testing.assert_array_equal(_params(second.model)[path], value)


def test_document_aligned_training_resumes_the_identical_loss_trajectory(run_config, tmp_path):
    """`data.reset_at_documents`: batches with a padding mask and document starts, and a data iterator whose
    packing state (two features) survives a checkpoint."""
    run_config = dataclasses.replace(run_config, steps=3,
                                     data=dataclasses.replace(run_config.data, reset_at_documents=True))
    straight = loop.train(dataclasses.replace(run_config, workdir=str(tmp_path / "straight")))
    split = dataclasses.replace(run_config, workdir=str(tmp_path / "split"))
    loop.train(split, stop_after=1)
    resumed = loop.train(split)
    assert all(np.isfinite(list(straight.losses.values())))
    assert resumed.losses == {step: straight.losses[step] for step in (2, 3)}


def test_inner_lr_warmup_starts_the_ttt_layers_at_a_fraction_of_their_base_lr(run_config, tmp_path):
    """Step 1 of a warmup run equals step 1 of a run whose model has base inner learning rates of
    `start` times the preset's; from step 2 the warmup has raised the scale, and the metrics say so."""
    start = 0.1
    warmup = dataclasses.replace(run_config, steps=2, workdir=str(tmp_path / "warmup"),
                                 optimizer=dataclasses.replace(run_config.optimizer, ttt_inner_lr_warmup_steps=4,
                                                               ttt_inner_lr_warmup_start=start))
    ttt = MICRO_MODEL.ttt
    low_lr_model = dataclasses.replace(MICRO_MODEL, ttt=dataclasses.replace(
        ttt, linear_base_lr=start * ttt.linear_base_lr, mlp_base_lr=start * ttt.mlp_base_lr))
    low_lr = dataclasses.replace(run_config, steps=2, workdir=str(tmp_path / "low"), model=low_lr_model)
    warmed, constant = loop.train(warmup), loop.train(low_lr)
    np.testing.assert_allclose(warmed.losses[1], constant.losses[1], rtol=1e-6)
    assert warmed.losses[2] != pytest.approx(constant.losses[2], rel=1e-5)
    with open(os.path.join(warmup.workdir, "metrics.jsonl")) as f:
        scales = [record["inner_lr_scale"] for record in map(json.loads, f)]
    assert scales == pytest.approx([start, start + (1 - start) / 4])


def test_restore_onto_a_different_mesh_and_from_a_params_export(trained, tmp_path):
    expected = _params(trained.model)
    export = checkpoint_lib.export_params(trained.model, trained.config, str(tmp_path / "export"))
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    for source in (trained.config.workdir, export):
        with mesh_lib.activate(mesh):
            model, config = checkpoint_lib.load_trained_model(source, mesh)
        assert config == trained.config
        assert model.embed.embedding.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        restored = _params(model)
        assert restored.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(restored[path], value)


def test_checkpoint_from_an_incompatible_config_is_a_clear_error_and_is_kept(trained):
    before = _files(trained.config.workdir)
    wider = dataclasses.replace(trained.config, steps=4, model=dataclasses.replace(MICRO_MODEL, hidden_size=64))
    with pytest.raises(ValueError, match=r"incompatible config \(model.hidden_size: stored 32, requested 64"):
        loop.train(wider)
    assert _files(trained.config.workdir) == before


def test_non_finite_gradients_skip_the_update_and_are_reported():
    mesh = mesh_lib.make_mesh(MeshConfig())
    # The shape of the `trained` run's steps, so the compiled step is reused.
    tokens = np.random.default_rng(0).integers(0, MICRO_MODEL.vocab_size, (1, 8, 33), dtype=np.int32)
    with mesh_lib.activate(mesh):
        model = create_model(MICRO_MODEL, mesh, seed=0)
        optimizer = nnx.Optimizer(model, make_optimizer(OptimizerConfig(warmup_steps=0), 10), wrt=nnx.Param)
        model.final_norm.scale[...] = model.final_norm.scale[...].at[0].set(np.nan)
        before = _params(model)
        metrics = jax.device_get(train_step(model, optimizer, jax.device_put(tokens, token_sharding(mesh))))
        after = _params(model)
        assert not metrics["finite"] and np.isnan(metrics["loss"])
        for path, value in before.items():
            np.testing.assert_array_equal(after[path], value)
        model.final_norm.scale[...] = model.final_norm.scale[...].at[0].set(1.0)
        metrics = jax.device_get(train_step(model, optimizer, jax.device_put(tokens, token_sharding(mesh))))
        assert metrics["finite"]
        assert any(not np.array_equal(after[path], value) for path, value in _params(model).items())

