"""Shared fixtures of the training tests: a micro model, a small real-text dataset, a run config, a trained run."""

import dataclasses
import os

import jax
import pytest

from ttt import configs
from ttt.configs.presets import e2e_stages
from ttt.configs.train import DataConfig, OptimizerConfig, TrainConfig

# One TTT-Linear and one sliding-window attention layer (both mixer kinds), small enough to compile and train
# in seconds; 4 heads so that tensor=2 and tensor=4 divide them.
MICRO_MODEL = dataclasses.replace(configs.get("hybrid-tiny"), hidden_size=32, num_heads=4, num_layers=2,
                                  mlp_hidden_size=64, max_seq_len=256)
# TTT-E2E shrunk the same way: a sliding-window block, then one with a prime MLP (the suffix), reading
# chunks of 4 through a window of 8.
E2E_TINY_PRESET = configs.get("e2e-tiny")
MICRO_E2E_MODEL = dataclasses.replace(E2E_TINY_PRESET, hidden_size=32, num_heads=4, num_layers=2,
                                      stages=e2e_stages(2, 1), mlp_hidden_size=64, max_seq_len=256,
                                      attention=dataclasses.replace(E2E_TINY_PRESET.attention, sliding_window=8),
                                      e2e=dataclasses.replace(E2E_TINY_PRESET.e2e, chunk_size=4))
# The same run as command-line overrides of the hybrid-tiny preset.
MICRO_FLAGS = ["--config=hybrid-tiny", "--model.hidden-size=32", "--model.num-layers=2",
               "--model.mlp-hidden-size=64", "--model.max-seq-len=256", "--batch-size=8", "--data.seq-len=32",
               "--data.max-documents=40", "--data.shuffle-window=64", "--data.validation-fraction=0.2",
               "--optimizer.warmup-steps=2", "--log-every=1"]


def make_run_config(data_dir: str, workdir: str) -> TrainConfig:
    """A few steps of the micro model on 40 standard-library files, 8-way data parallel."""
    return TrainConfig(model=MICRO_MODEL, config_name="micro", workdir=workdir, steps=4, batch_size=8,
                       log_every=1, checkpoint_every=2, evaluate=False,
                       data=DataConfig(source="pystdlib", max_documents=40, seq_len=32, shuffle_window=64,
                                       data_dir=data_dir, validation_fraction=0.2),
                       optimizer=OptimizerConfig(warmup_steps=2))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One compilation cache for the session, shared with the subprocesses and the notebook kernel
    (they inherit JAX_COMPILATION_CACHE_DIR), so what is compiled here is not compiled again there."""
    directory = str(tmp_path_factory.mktemp("jax-cache"))
    previous = jax.config.jax_compilation_cache_dir
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    jax.config.update("jax_compilation_cache_dir", directory)
    yield directory
    jax.config.update("jax_compilation_cache_dir", previous)
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Where the session's datasets are built (once)."""
    return str(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def run_config(data_dir, tmp_path) -> TrainConfig:
    return make_run_config(data_dir, str(tmp_path / "run"))


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A finished 2-step run on the default mesh (8-way data parallel)."""
    from ttt.train import loop

    config = make_run_config(data_dir, str(tmp_path_factory.mktemp("trained")))
    return loop.train(dataclasses.replace(config, steps=2))
