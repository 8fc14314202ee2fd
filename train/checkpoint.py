"""Checkpoints: orbax `CheckpointManager` (async, keep-N) of model, optimizer, data iterator and config.

Layout: `workdir/checkpoints/<step>/{model, optimizer, data, config}`; a params-only export is
`DIR/{params, config.json}`. Everything is arrays (tensorstore) or JSON (config, data iterator
position), so loading a checkpoint never executes code. Arrays are restored with the shardings of
the target state, so a checkpoint saved on one mesh loads onto any other.
"""

import dataclasses
import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from ttt.configs import ModelConfig
from ttt.configs.train import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from ttt.train.step import create_model

CHECKPOINTS = "checkpoints"
EXPORT_PARAMS = "params"
EXPORT_CONFIG = "config.json"
# Fields that may change when a run resumes; any other difference makes the checkpoint incompatible.
RESUMABLE_CHANGES = ("workdir", "steps", "log_every", "checkpoint_every", "keep_checkpoints", "evaluate",
                     "tensorboard", "mesh", "optimizer", "peak_flops_per_device", "multihost", "config_name")


def config_to_json(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_json(data: dict) -> TrainConfig:
    """Rebuild a TrainConfig from its JSON form; unknown or missing fields raise a clear error."""
    nested = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "mesh": MeshConfig}
    try:
        fields = {name: nested[name](**value) if name in nested else value for name, value in data.items()}
        return TrainConfig(**fields)
    except TypeError as error:
        raise ValueError(f"the stored config does not match this version's TrainConfig ({error})") from error


def _differences(a, b, prefix="") -> list[str]:
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return [d for f in dataclasses.fields(a)
                for d in _differences(getattr(a, f.name), getattr(b, f.name), f"{prefix}{f.name}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: stored {a!r}, requested {b!r}"]


def check_compatible(stored: TrainConfig, requested: TrainConfig, directory: str) -> None:
    """Raise if `requested` cannot continue the run stored in `directory`."""
    changed = [d for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE_CHANGES
               for d in _differences(getattr(stored, f.name), getattr(requested, f.name), f"{f.name}.")]
    if changed:
        raise ValueError(f"the checkpoint in {directory} comes from an incompatible config ({'; '.join(changed)}); "
                         "resume with the same model, data and batch settings, or use a new --workdir")


class Checkpointer:
    """Saves and restores whole training states under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 2, asynchronous: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, model, optimizer, data_iterator, config: TrainConfig) -> None:
        """Start saving (returns while arrays are still being written, unless not asynchronous)."""
        self._manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model)),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_to_json(config)),
        ))

    def stored_config(self, step: int | None = None) -> TrainConfig:
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return config_from_json(restored["config"])

    def restore(self, model, optimizer, data_iterator, step: int | None = None) -> int:
        """Load the checkpoint at `step` (default: the latest) into model, optimizer and iterator,
        with the shardings they have now. Returns the step."""
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(nnx.state(model))),
            optimizer=ocp.args.StandardRestore(_abstract(nnx.state(optimizer))),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        return step

    def restore_model(self, model, step: int | None = None) -> int:
        """Load only the model's state (for evaluation and generation)."""
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(nnx.state(model)))))
        nnx.update(model, restored["model"])
        return step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _abstract(state):
    """Shape, dtype and sharding of every array: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def export_params(model, config: TrainConfig, directory: str) -> str:
    """Write the model's parameters and config (no optimizer, no data state) to `directory`."""
    directory = os.path.abspath(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, EXPORT_PARAMS), nnx.state(model, nnx.Param), force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, EXPORT_CONFIG), "w") as f:
            json.dump(config_to_json(config), f, indent=2)
    return directory


def is_export(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, EXPORT_CONFIG))


def read_export_config(directory: str) -> TrainConfig:
    with open(os.path.join(directory, EXPORT_CONFIG)) as f:
        return config_from_json(json.load(f))


def restore_export(model, directory: str) -> None:
    """Load exported parameters into `model` (with its shardings)."""
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), EXPORT_PARAMS),
                                                _abstract(nnx.state(model, nnx.Param)))
    nnx.update(model, params)


def load_trained_model(directory: str, mesh):
    """Model and config from a run's workdir (its latest checkpoint) or a params-only export, onto `mesh`.

    Call inside `mesh_lib.activate(mesh)`. Returns (model, TrainConfig).
    """
    directory = os.path.expanduser(directory)
    if is_export(directory):
        config = read_export_config(directory)
        model = create_model(config.model, mesh, config.seed)
        restore_export(model, directory)
        return model, config
    if os.path.basename(os.path.normpath(directory)) == CHECKPOINTS:
        directory = os.path.dirname(os.path.normpath(directory))
    if not os.path.isdir(os.path.join(directory, CHECKPOINTS)):
        raise ValueError(f"{directory} is neither a training workdir (with a {CHECKPOINTS}/ folder) nor a "
                         f"params export (with {EXPORT_CONFIG})")
    checkpointer = Checkpointer(directory, asynchronous=False)
    if checkpointer.latest_step() is None:
        raise ValueError(f"{checkpointer.directory} holds no finished checkpoint")
    config = checkpointer.stored_config()
    model = create_model(config.model, mesh, config.seed)
    checkpointer.restore_model(model)
    checkpointer.close()
    return model, config
