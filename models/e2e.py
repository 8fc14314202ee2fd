"""TTT-E2E (Tandon et al. 2025): the suffix stages keep training their fast weights on next-token loss while they read.

The prefix stages (no fast weight) read the whole sequence at once. The suffix stages (from the
first stage holding a fast weight to the top) read it in chunks of `e2e.chunk_size` tokens,
carrying their states (attention windows) and the fast weights. For each chunk, in order:

  1. its next-token losses with the current fast weights: what training and evaluation report, so
     no token is ever scored by weights that saw it;
  2. one optax step (global-norm clipping, then SGD at `e2e.inner_lr * context.inner_lr_scale`) on
     the chunk's mean next-token loss through the suffix stages, the final norm and the head,
     changing the fast weights only.

Each sequence has its own fast weights (the rows of a batch never share an update), all starting
from the model's values of those parameters. Everything is differentiable, so training
backpropagates through the inner steps (gradients of gradients) into every parameter, the fast
weights' starting values included.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from ttt.context import Context
from ttt.models import stages as stages_lib
from ttt.models.loss import chunked_cross_entropy


def parameter_path(path: tuple) -> str:
    """An NNX path as the "/"-joined string `e2e.fast_params` is matched against."""
    return "/".join(str(part) for part in path)


def fast_filter(pattern: str):
    """NNX filter of the fast weights: the `nnx.Param`s whose path the regular expression `pattern` matches."""
    compiled = re.compile(pattern)
    return lambda path, value: isinstance(value, nnx.Param) and compiled.search(parameter_path(path)) is not None


def suffix_start(model: nnx.Module) -> int:
    """Index of the first stage of the LM `model` that holds a fast weight; the stages from there read chunk by chunk.

    Raises ValueError when `config.e2e.fast_params` matches no parameter, or matches one outside the
    stages (the prefix and the embedding read the whole sequence once, so they cannot change).
    """
    pattern = model.config.e2e.fast_params
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, fast_filter(pattern)))]
    if not paths:
        examples = [parameter_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))][:6]
        raise ValueError(f"e2e.fast_params={pattern!r} matches no parameter; expected a regular expression "
                         f"matching parameter paths such as {examples} (the default needs a stage with prime_mlp)")
    outside = [parameter_path(path) for path in paths if path[0] != "stages"]
    if outside:
        raise ValueError(f"e2e.fast_params={pattern!r} matches {outside[:3]} outside the stages; expected fast "
                         "weights inside the stages only")
    return min(int(path[1]) for path in paths)


class SuffixReader:
    """The suffix stages of an LM, final norm and head as functions of a reading state, vmapped over the rows.

    The reading state is `{"fast": fast weights, "optimizer": inner optimizer state, "stages": the
    suffix stages' states}`, every array of the first two with a leading batch axis; the fast
    weights are a plain nested dict of arrays keyed by parameter path (`nnx.to_pure_dict`).
    """

    def __init__(self, model: nnx.Module, context: Context):
        config = model.config
        self.config = config
        self.start = model.suffix_start
        self.graphdef, fast, self.rest = nnx.split(model, fast_filter(config.e2e.fast_params), ...)
        self.initial_fast = nnx.to_pure_dict(fast)
        # The logical names each parameter was created with (`nnx.get_partition_spec` gives mesh axes under a mesh).
        self.fast_axes = nnx.to_pure_dict(jax.tree.map(lambda v: P(*v.get_metadata().get("out_sharding") or ()), fast,
                                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))
        self.suffix = model.stages[self.start:]
        self.optimizer = optax.sgd(config.e2e.inner_lr * context.inner_lr_scale)
        if config.e2e.inner_clip:
            self.optimizer = optax.chain(optax.clip_by_global_norm(config.e2e.inner_clip), self.optimizer)
        self.stage_context = dataclasses.replace(context, targets=None)
        self.stage_axes = [stages_lib.stage_state_axes(stage) for stage in self.suffix]
        self.state_rows = {"fast": 0, "optimizer": 0, "stages": [_batch_axes(axes) for axes in self.stage_axes]}

    def initial_state(self, batch: int) -> dict:
        """The reading state before any token: every row's fast weights at the model's values."""
        fast = jax.tree.map(lambda weight: jnp.broadcast_to(weight, (batch, *weight.shape)), self.initial_fast)
        return {"fast": fast, "optimizer": jax.vmap(self.optimizer.init)(fast),
                "stages": [stages_lib.init_stage_state(stage, batch) for stage in self.suffix]}

    def state_axes(self) -> dict:
        """Logical axis names (a `PartitionSpec` per array) of a reading state: the parameters' names after "batch"."""
        is_spec = lambda spec: isinstance(spec, P)
        fast = jax.tree.map(lambda spec: P("batch", *spec), self.fast_axes, is_leaf=is_spec)
        structure = jax.eval_shape(self.optimizer.init, self.initial_fast)  # a row's: the same tree
        optimizer = optax.tree_map_params(self.optimizer, lambda _, spec: spec, structure, fast,
                                          transform_non_params=lambda _: P(), is_leaf=is_spec)
        return {"fast": fast, "optimizer": optimizer, "stages": self.stage_axes}

    def forward(self, state: dict, x: jax.Array) -> tuple[jax.Array, list]:
        """x [batch, n, embed] read with the current fast weights -> (final-normed hidden [batch, n, embed],
        the suffix stages' states after x)."""
        return self._vmap(lambda state, x: self._row_forward(state["fast"], state["stages"], x)[:2],
                          (self.state_rows, 0), (0, self.state_rows["stages"]))(state, x)

    def step(self, state: dict, x: jax.Array, targets: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
        """A chunk x [batch, chunk, embed] with targets int [batch, chunk] (negative: none) -> (state after
        its inner step, final-normed hidden [batch, chunk, embed] and float32 [batch, chunk] losses,
        both from the fast weights before the step)."""
        return self._vmap(self._row_step, (self.state_rows, 0, 0), (self.state_rows, 0, 0))(state, x, targets)

    def _vmap(self, function, in_axes, out_axes):
        def mapped(*args):
            # Sharding constraints inside would name the batch axis of a one-row array, so they are
            # off there (the batched arrays outside keep their sharding).
            with spmd.logical_axis_rules(()):
                return jax.vmap(function, in_axes=in_axes, out_axes=out_axes)(*args)
        return mapped

    def _row_forward(self, fast, states, x):
        """One row: x [n, embed] -> (hidden [n, embed] after the final norm, stage states after x, unembedding)."""
        row_model = nnx.merge(self.graphdef, fast, self.rest, copy=True)
        hidden, new_states = x[None], []
        for stage, state in zip(row_model.stages[self.start:], _add_row_axis(states, self.state_rows["stages"])):
            hidden, state = stages_lib.run_stage(stage, hidden, state, self.stage_context)
            new_states.append(state)
        hidden = row_model.final_norm(hidden)[0]
        return hidden, _remove_row_axis(new_states, self.state_rows["stages"]), row_model.unembedding()

    def _row_step(self, state, x, targets):
        def chunk_loss(fast):
            hidden, states, unembedding = self._row_forward(fast, state["stages"], x)
            per_token = chunked_cross_entropy(hidden[None], unembedding, jnp.maximum(targets, 0)[None],
                                              self.config.loss_chunk_size)[0]
            weights = (targets >= 0).astype(jnp.float32)
            loss = jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            return loss, (hidden, per_token, states)

        (_, (hidden, per_token, states)), grads = jax.value_and_grad(chunk_loss, has_aux=True)(state["fast"])
        # A chunk without a known target takes no step. Its gradient is zero, where the clipping's global
        # norm has no derivative (NaN in training's backward pass), so a stand-in gradient is stepped on
        # and the step discarded.
        known = jnp.any(targets >= 0)
        grads = jax.tree.map(lambda grad: jnp.where(known, grad, jnp.ones_like(grad)), grads)
        updates, optimizer_state = self.optimizer.update(grads, state["optimizer"], state["fast"])
        fast, optimizer_state = jax.tree.map(lambda new, old: jnp.where(known, new, old),
                                             (optax.apply_updates(state["fast"], updates), optimizer_state),
                                             (state["fast"], state["optimizer"]))
        return {"fast": fast, "optimizer": optimizer_state, "stages": states}, hidden, per_token


def read_suffix(model: nnx.Module, x: jax.Array, context: Context) -> tuple[jax.Array, jax.Array, dict]:
    """Runs the suffix stages of the LM `model` chunk by chunk with an inner step after each chunk, from the start.

    Args:
      model: the LM (its config has `e2e`).
      x: [batch, seq, embed], the prefix stages' output.
      context: `context.targets` int [batch, seq] holds the token each position predicts (negative:
        none, weighted 0 in the inner loss); `inner_lr_scale` scales the inner learning rate.
    Returns:
      (hidden [batch, seq, embed] after the final norm, float32 [batch, seq] next-token losses;
      position t of both comes from the fast weights after the steps on the chunks before t's).
      Losses at positions without a target are meaningless. Third, the reading state after the
      last chunk's step (`SuffixReader`), its "fast" entry the fast weights with a leading batch axis.
    """
    if context.targets is None or context.targets.shape != x.shape[:2]:
        raise ValueError(f"TTT-E2E reads with targets [batch, seq] = {list(x.shape[:2])} in the context; got "
                         f"{None if context.targets is None else context.targets.shape}")
    reader = SuffixReader(model, context)
    chunk = model.config.e2e.chunk_size
    batch, seq, embed = x.shape
    num_chunks = -(-seq // chunk)
    padding = num_chunks * chunk - seq
    # [num_chunks, batch, chunk, ...]: the scan runs over chunks. Padded positions have no target.
    x_chunks = jnp.pad(x, ((0, 0), (0, padding), (0, 0))).reshape(batch, num_chunks, chunk, embed).swapaxes(0, 1)
    targets = jnp.pad(context.targets, ((0, 0), (0, padding)), constant_values=-1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    def chunk_step(state, inputs):
        state, hidden, per_token = reader.step(state, *inputs)
        return state, (hidden, per_token)

    if model.config.e2e.remat:
        chunk_step = jax.checkpoint(chunk_step, prevent_cse=False)
    state, (hidden, per_token) = jax.lax.scan(chunk_step, reader.initial_state(batch), (x_chunks, target_chunks))
    hidden = hidden.swapaxes(0, 1).reshape(batch, num_chunks * chunk, embed)[:, :seq]
    per_token = per_token.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq]
    return hidden, per_token, state


def _batch_axes(axes):
    """Per array of a state: the index of its "batch" axis, or None when it has none (e.g. a position)."""
    return jax.tree.map(lambda spec: tuple(spec).index("batch") if "batch" in tuple(spec) else None, axes,
                        is_leaf=lambda spec: isinstance(spec, P))


def _add_row_axis(states, batch_axes):
    """States of one row (batch axes removed by vmap) -> the same with a batch axis of size 1 put back."""
    return jax.tree.map(lambda axis, array: array if axis is None else jnp.expand_dims(array, axis),
                        batch_axes, states, is_leaf=lambda axis: axis is None)


def _remove_row_axis(states, batch_axes):
    return jax.tree.map(lambda axis, array: array if axis is None else jnp.squeeze(array, axis),
                        batch_axes, states, is_leaf=lambda axis: axis is None)
