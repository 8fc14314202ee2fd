"""`Memory`: what a model learned from the text it read, kept after reading, carried into later calls.

    memory = read(model, text_or_ids)                      # from the model's initial state
    memory = read(model, more, memory)                     # sequential composition: continue reading
    loss, _ = model.loss(ids, cache=to_cache(model, memory, batch=ids.shape[0]))
    out = generate(model, prompt, 200, cache=to_cache(model, memory))

A memory is the state of every TTT layer (fast weights, gradient sum, position inside the mini-batch,
q/k convolution history) and of every pre-convolution after reading, without attention's keys and
values (`ttt.models.memory`), plus `MemoryInfo`: which model made it, how many tokens it read, from
which sources, when. Its arrays are a plain pytree with stable names (`memory.state["stages"][s][j]
["mixer"]["ttt"]["params"]["W"]`), the same size after 1K or 1M tokens. A reset is
`initial(model)` (or reading with `memory=None`).

What attention layers see while reading: within one `read` call the text is read in pieces of
`piece_length` tokens and every layer's state, attention's keys and values included, is carried from
piece to piece, so one call computes exactly what one pass over the whole text computes, whatever the
pieces (sliding-window layers see their window, full attention its `max_seq_len` most recent tokens).
At the end the attention state is dropped: the next call (and `to_cache`) starts attention empty. So
reading A then B from A's memory equals reading A + B in one call for models whose every layer is a
TTT layer (the inner loop continues exactly, at or inside a mini-batch), and only approximately for
hybrids, whose attention layers reading B no longer see the end of A.
"""

import dataclasses
import datetime
import hashlib
import json
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ttt.models import LM
from ttt.models import memory as memory_state_lib
from ttt.train import mesh as mesh_lib
from ttt.train.checksums import state_checksums
from ttt.train.tokenizers import ByteTokenizer, Tokenizer

# Reads of more than this many pieces show a progress bar (when `progress` is left to decide).
PROGRESS_ABOVE_PIECES = 4


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    """What a memory is, stored beside its arrays as JSON.

    Attributes:
      model_config: fingerprint of the model's configuration.
      model_parameters: fingerprint of the model's parameters (a memory is meaningful only for the
        exact weights that wrote it: its fast weights started from their learned initial values).
      batch: sequences the memory holds (usually 1: one reader of one text).
      tokens_read: tokens read into each sequence since the initial state.
      sources: names of what was read, in order.
      created, updated: UTC times (ISO 8601) of the first and the last read.
    """

    model_config: str
    model_parameters: str
    batch: int
    tokens_read: int
    sources: tuple[str, ...]
    created: str
    updated: str


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Memory:
    """A pytree: `state` (the arrays, see `ttt.models.memory`) and `info` (static metadata)."""

    state: dict[str, Any]
    info: MemoryInfo = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self.state))


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_fingerprint(model: LM) -> str:
    return _hash(dataclasses.asdict(model.config))


def parameters_fingerprint(model: LM) -> str:
    """Changes with any bit of any parameter (checksums computed where the parameters live)."""
    return _hash(state_checksums(nnx.state(model, nnx.Param)))


def check_belongs_to(info: MemoryInfo, model: LM, where: str = "the memory") -> None:
    """Raise ValueError unless `info` was made by `model` (same configuration, then same parameters)."""
    config = config_fingerprint(model)
    if info.model_config != config:
        raise ValueError(f"{where} was made by a model of another configuration (fingerprint {info.model_config}; "
                         f"this model's is {config}); read the text again with this model")
    parameters = parameters_fingerprint(model)
    if info.model_parameters != parameters:
        raise ValueError(f"{where} was made by a model with the same configuration but other parameters (fingerprint "
                         f"{info.model_parameters}; this model's is {parameters}): another run or checkpoint step; "
                         "read the text again with this model")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def initial(model: LM, batch: int = 1) -> Memory:
    """The empty memory (a reset): every TTT layer at its learned initial state, nothing read."""
    if not memory_state_lib.has_learned_state(model):
        raise ValueError(f"model with mixers {model.config.mixers} learns nothing while it reads; a memory needs "
                         "at least one TTT layer")
    now = _now()
    return Memory(memory_state_lib.initial_memory_state(model, batch),
                  MemoryInfo(config_fingerprint(model), parameters_fingerprint(model), batch, 0, (), now, now))


def to_cache(model: LM, memory: Memory, batch: int | None = None, mesh=None):
    """An `LM.extend` cache that starts from `memory` (attention empty), for `LM.loss(cache=)` and `generate(cache=)`.

    A memory of one sequence serves any `batch`; None: the memory's own batch. With a `mesh`, the cache is
    placed as its logical axes say (its rows split like a batch of tokens).
    """
    check_belongs_to(memory.info, model)
    cache = memory_state_lib.to_cache(model, memory.state, batch)
    if mesh is None:
        return cache
    return jax.device_put(cache, mesh_lib.state_shardings(model.cache_axes(), mesh))


@nnx.jit
def _read_piece(model: LM, ids: jax.Array, cache):
    """The cache after reading ids [batch, piece] (the logits are never computed: XLA drops them)."""
    return model.extend(ids, cache)[1]


def read(model: LM, text_or_ids, memory: Memory | None = None, *, tokenizer: Tokenizer | None = None,
         source: str = "", piece_length: int = 2048, progress: bool | None = None) -> Memory:
    """Reads a text (or token ids) into a memory, starting from `memory` (None: the initial state).

    Args:
      model: the LM; its parameters are never changed.
      text_or_ids: a string (encoded with `tokenizer`, bytes by default), or int ids [seq] or [batch, seq].
      memory: the memory to continue (None: the initial one).
      source: a name for what is read, kept in `info.sources`.
      piece_length: tokens read per compiled call; the cost is linear in the length, and the pieces
        compile once per shape (a full piece and the last one).
      progress: show a progress bar (None: when stderr is a terminal and there are more than
        PROGRESS_ABOVE_PIECES pieces).
    Returns:
      the memory after the text; `info.tokens_read` grows by seq.
    """
    if isinstance(text_or_ids, str):
        ids = (tokenizer or ByteTokenizer()).encode(text_or_ids)
    else:
        ids = np.asarray(text_or_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"ids of shape {ids.shape}; expected [seq] or [batch, seq] with seq >= 1")
    if piece_length < 1:
        raise ValueError(f"piece_length={piece_length}; expected >= 1")
    memory = initial(model, ids.shape[0]) if memory is None else memory
    if memory.info.batch != ids.shape[0]:
        raise ValueError(f"a memory of {memory.info.batch} sequences cannot read ids of shape {ids.shape}; expected "
                         f"[{memory.info.batch}, seq]")
    cache = to_cache(model, memory)
    length = ids.shape[1]
    pieces = range(0, length, piece_length)
    show = (sys.stderr.isatty() and len(pieces) > PROGRESS_ABOVE_PIECES) if progress is None else progress
    with tqdm(total=length, unit="token", unit_scale=True, desc="reading", disable=not show) as bar:
        for start in pieces:
            piece = ids[:, start:start + piece_length]
            cache = _read_piece(model, piece, cache)
            bar.update(piece.shape[1])
    info = dataclasses.replace(memory.info, tokens_read=memory.info.tokens_read + length,
                               sources=memory.info.sources + ((source,) if source else ()), updated=_now())
    return Memory(memory_state_lib.memory_state(model, cache), info)
