"""Saving and loading a `Memory`: arrays with orbax, everything else JSON (loading never executes code).

Layout of a memory folder:

    DIR/arrays/       orbax (tensorstore) checkpoint of {"stages/0/1/mixer/ttt/params/W": array, ...}
    DIR/memory.json   {"format", "info": MemoryInfo, "checksums": {array name: checksum}}

`memory.json` is written last, so a folder whose arrays were not all written has none (or the old
one) and does not load as the new memory. Loading checks that the memory was made by the given model
(configuration and parameters) before reading any array, then that every array is as it was saved.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from ttt.models import LM
from ttt.models import memory as memory_state_lib
from ttt.train.checksums import array_checksum, mismatches
from ttt.train.memory import Memory, MemoryInfo, check_belongs_to

FORMAT = "ttt-memory-1"
ARRAYS = "arrays"
METADATA = "memory.json"


def _flat(state) -> dict[str, jax.Array]:
    """`{"stages/0/1/mixer/ttt/params/W": array}`: the stable name of every array of a memory state."""
    def name(path):
        return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)

    return {name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


@jax.jit
def _compute_checksums(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: array_checksum(array) for name, array in flat.items()}


def _checksums(flat: dict[str, jax.Array]) -> dict[str, int]:
    return {name: int(checksum) for name, checksum in jax.device_get(_compute_checksums(flat)).items()}


def is_memory(directory: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(directory), METADATA))


def save(memory: Memory, directory: str) -> str:
    """Write `memory` to `directory` (replacing a memory there). Returns the absolute path."""
    directory = os.path.abspath(os.path.expanduser(directory))
    flat = _flat(memory.state)
    metadata = {"format": FORMAT, "info": dataclasses.asdict(memory.info), "checksums": _checksums(flat)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, ARRAYS), flat, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        partial = os.path.join(directory, METADATA + ".partial")
        with open(partial, "w") as f:
            json.dump(metadata, f, indent=2)
        os.replace(partial, os.path.join(directory, METADATA))
    return directory


def read_info(directory: str) -> MemoryInfo:
    """The metadata of the memory in `directory`, without reading its arrays."""
    return _info(_metadata(os.path.abspath(os.path.expanduser(directory))))


def _metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory} is not a readable memory folder ({METADATA}: {error})") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise ValueError(f"{path} has format {found!r}; expected {FORMAT!r}")
    return metadata


def _info(metadata: dict) -> MemoryInfo:
    try:
        info = dict(metadata["info"])
        return MemoryInfo(**dict(info, sources=tuple(info["sources"])))
    except (KeyError, TypeError) as error:
        raise ValueError(f"the memory's metadata does not match this version's MemoryInfo ({error})") from error


def load(directory: str, model: LM, mesh=None) -> Memory:
    """The memory saved in `directory`, for `model` (ValueError if another model made it or it is damaged).

    Arrays are placed replicated on `mesh` (None: on the default device); a memory is small (it does not
    grow with the text read), and `to_cache` widens it to a batch where it is used.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    metadata = _metadata(directory)
    info = _info(metadata)
    check_belongs_to(info, model, where=f"the memory in {directory}")
    sharding = SingleDeviceSharding(jax.devices()[0]) if mesh is None else NamedSharding(mesh, PartitionSpec())
    abstract = nnx.eval_shape(lambda model: memory_state_lib.initial_memory_state(model, info.batch), model)
    target = {name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
              for name, leaf in _flat(abstract).items()}
    try:
        flat = ocp.StandardCheckpointer().restore(os.path.join(directory, ARRAYS), target)
    except Exception as error:  # tensorstore and orbax errors alike: the files are not as saved
        raise ValueError(f"the memory in {directory} cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:300]})") from error
    if mesh is None:  # uncommitted, like the arrays `read` makes: what was compiled for those is reused
        flat = {name: jnp.asarray(np.asarray(array)) for name, array in flat.items()}
    problems = mismatches(metadata.get("checksums", {}), _checksums(flat))
    if problems:
        raise ValueError(f"the memory in {directory} is damaged: {'; '.join(problems[:3])}")
    leaves = [flat[name] for name in target]
    return Memory(jax.tree.unflatten(jax.tree.structure(abstract), leaves), info)
