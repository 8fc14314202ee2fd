"""Checkpoints: orbax `CheckpointManager` (async, keep-N) of model, optimizer, data iterator and config.

Layout: `workdir/checkpoints/<step>/{model, optimizer, data, config, checksums}`; a params-only
export is `DIR/{params, config.json, checksums.json}`. Everything is arrays (tensorstore) or JSON
(config, data iterator position, checksums), so loading a checkpoint never executes code. Arrays
are restored with the shardings of the target state, so a checkpoint saved on one mesh loads onto
any other.

Integrity: orbax and tensorstore check nothing about the array data by default (zarr3's crc32c
guards only the shard index), so flipped bytes load as garbage and a truncated file may load or
fail deep inside tensorstore. So every save records a checksum of every array
(`checksums.state_checksums`), and every restore recomputes them on the loaded arrays and raises
`DamagedCheckpointError`, naming the checkpoint, the array and what to do, before the model or
optimizer is touched. A checkpoint whose files cannot be read at all raises the same error.
"""

import dataclasses
import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from ttt.configs.model import from_json as model_config_from_json
from ttt.configs.train import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from ttt.train.checksums import mismatches, state_checksums
from ttt.train.step import create_model

CHECKPOINTS = "checkpoints"
CHECKSUMS = "checksums"
EXPORT_PARAMS = "params"
EXPORT_CONFIG = "config.json"
EXPORT_CHECKSUMS = "checksums.json"
# Fields that may change when a run resumes; any other difference makes the checkpoint incompatible.
RESUMABLE_CHANGES = ("workdir", "steps", "log_every", "checkpoint_every", "keep_checkpoints", "evaluate",
                     "tensorboard", "mesh", "optimizer", "peak_flops_per_device", "multihost", "config_name")


def config_to_json(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_json(data: dict) -> TrainConfig:
    """Rebuild a TrainConfig from its JSON form; unknown or missing fields raise a clear error."""
    nested = {"model": model_config_from_json, "data": lambda fields: DataConfig(**fields),
              "optimizer": lambda fields: OptimizerConfig(**fields), "mesh": lambda fields: MeshConfig(**fields)}
    try:
        fields = {name: nested[name](value) if name in nested else value for name, value in data.items()}
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


class DamagedCheckpointError(ValueError):
    """A checkpoint whose files cannot be read, or whose arrays differ from what was saved."""


def _root_cause(error: BaseException, limit: int = 300) -> str:
    """The most specific words of a library error, short: the first line of the innermost cause (tensorstore's
    names the array and the byte range; the outer ones go on with a whole JSON spec)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(" [tensorstore_spec=")[0]
    return text if len(text) <= limit else text[:limit] + "..."


class Checkpointer:
    """Saves and restores whole training states under `workdir/checkpoints`, verifying every array on restore."""

    def __init__(self, workdir: str, *, keep: int = 2, asynchronous: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def location(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, model, optimizer, data_iterator, config: TrainConfig) -> None:
        """Start saving (returns while arrays are still being written, unless not asynchronous).

        The checksums are computed first, on the device arrays, before the next step changes them.
        """
        model_state, optimizer_state = nnx.state(model), nnx.state(optimizer)
        checksums = {"model": state_checksums(model_state), "optimizer": state_checksums(optimizer_state)}
        self._manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_state),
            optimizer=ocp.args.StandardSave(optimizer_state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_to_json(config)),
            checksums=ocp.args.JsonSave(checksums),
        ))

    def _read(self, step: int, **items) -> dict:
        """Restore `items` of checkpoint `step` and verify its arrays; raise DamagedCheckpointError if it
        cannot be read or differs from what was saved."""
        arrays = [name for name in items if name in ("model", "optimizer")]
        if arrays:
            if not os.path.isdir(os.path.join(self.location(step), CHECKSUMS)):
                raise self._damaged(step, f"it has no {CHECKSUMS} item (half-written, or saved by a version that "
                                          "recorded none)")
            items[CHECKSUMS] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # tensorstore, orbax, grain and JSON errors alike: the files are not as saved
            raise self._damaged(step, f"its files cannot be read ({_root_cause(error)})") from error
        for name in arrays:
            if not isinstance(restored[CHECKSUMS], dict) or name not in restored[CHECKSUMS]:
                raise self._damaged(step, f"its {CHECKSUMS} item has no entry for {name!r}")
            problems = mismatches(restored[CHECKSUMS][name], state_checksums(restored[name]))
            if problems:
                shown = "; ".join(f"{name}/{problem}" for problem in problems[:3])
                more = f" (and {len(problems) - 3} more arrays)" if len(problems) > 3 else ""
                raise self._damaged(step, f"array {shown}{more}")
        return restored

    def _damaged(self, step: int, what: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"checkpoint {self.location(step)} is damaged: {what}")

    def what_to_do(self, step: int) -> str:
        """Advice for a reader (not a training run) that found checkpoint `step` damaged."""
        older = [s for s in self.all_steps() if s < step]
        if older:
            return f"move that folder away to use the checkpoint of step {older[-1]}"
        return "it is the run's only checkpoint: train again or use a params export"

    def stored_config(self, step: int | None = None) -> TrainConfig:
        step = self.latest_step() if step is None else step
        return config_from_json(self._read(step, config=ocp.args.JsonRestore())["config"])

    def restore(self, model, optimizer, data_iterator, step: int | None = None) -> int:
        """Load the checkpoint at `step` (default: the latest) into model, optimizer and iterator,
        with the shardings they have now. Returns the step. Raises DamagedCheckpointError, leaving model
        and optimizer untouched, if the checkpoint is damaged."""
        step = self.latest_step() if step is None else step
        restored = self._read(step, model=ocp.args.StandardRestore(_abstract(nnx.state(model))),
                              optimizer=ocp.args.StandardRestore(_abstract(nnx.state(optimizer))),
                              data=grain.checkpoint.CheckpointRestore(data_iterator))
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        return step

    def restore_model(self, model, step: int | None = None) -> int:
        """Load only the model's state (for evaluation and generation); DamagedCheckpointError if damaged."""
        step = self.latest_step() if step is None else step
        restored = self._read(step, model=ocp.args.StandardRestore(_abstract(nnx.state(model))))
        nnx.update(model, restored["model"])
        return step

    def set_aside(self, step: int) -> str:
        """Rename the folder of checkpoint `step` to `<step>.damaged` (kept for inspection, no longer a
        checkpoint, so that the step can be saved again). Returns the new path."""
        target = self.location(step) + ".damaged"
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = f"{self.location(step)}.damaged{suffix}"
        if jax.process_index() == 0:
            os.rename(self.location(step), target)
        multihost_utils.sync_global_devices(f"ttt checkpoint {step} set aside")
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _abstract(state):
    """Shape, dtype and sharding of every array: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def export_params(model, config: TrainConfig, directory: str) -> str:
    """Write the model's parameters, their checksums and the config (no optimizer, no data state) to `directory`."""
    directory = os.path.abspath(directory)
    params = nnx.state(model, nnx.Param)
    checksums = state_checksums(params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, EXPORT_PARAMS), params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, EXPORT_CHECKSUMS), "w") as f:
            json.dump(checksums, f, indent=2)
        with open(os.path.join(directory, EXPORT_CONFIG), "w") as f:
            json.dump(config_to_json(config), f, indent=2)
    return directory


def is_export(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, EXPORT_CONFIG))


def _damaged_export(directory: str, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"params export {directory} is damaged: {what}; export it again from its run's "
                                  "workdir, or use the workdir itself")


def _read_export_json(directory: str, name: str):
    try:
        with open(os.path.join(directory, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise _damaged_export(directory, f"{name} cannot be read ({_root_cause(error)})") from error


def read_export_config(directory: str) -> TrainConfig:
    return config_from_json(_read_export_json(directory, EXPORT_CONFIG))


def restore_export(model, directory: str) -> None:
    """Load exported parameters into `model` (with its shardings); DamagedCheckpointError, leaving `model`
    untouched, if they differ from what was exported."""
    directory = os.path.abspath(directory)
    recorded = _read_export_json(directory, EXPORT_CHECKSUMS)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(directory, EXPORT_PARAMS),
                                                    _abstract(nnx.state(model, nnx.Param)))
    except Exception as error:  # tensorstore and orbax errors alike: the files are not as saved
        raise _damaged_export(directory, f"its files cannot be read ({_root_cause(error)})") from error
    problems = mismatches(recorded, state_checksums(params))
    if problems:
        raise _damaged_export(directory, f"array {'; '.join(problems[:3])}")
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
    step = checkpointer.latest_step()
    try:
        config = checkpointer.stored_config(step)
        model = create_model(config.model, mesh, config.seed)
        checkpointer.restore_model(model, step)
    except DamagedCheckpointError as error:
        raise DamagedCheckpointError(f"{error}; {checkpointer.what_to_do(step)}") from None
    finally:
        checkpointer.close()
    return model, config
