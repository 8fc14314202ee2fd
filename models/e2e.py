"""TTT-E2E (Tandon et al. 2025): the suffix stages keep training their fast weights on next-token loss while they read.

The prefix stages (no fast weight) read the whole sequence at once. The suffix stages (from the
first stage holding a fast weight to the top) read it in chunks of `e2e_chunk_size` tokens,
carrying their states (attention windows) and the fast weights. For each chunk, in order:

  1. its next-token losses with the current fast weights: what training and evaluation report, so
     no token is ever scored by weights that saw it;
  2. one optax step (global-norm clipping, then SGD at `e2e_inner_lr * context.inner_lr_scale`) on
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
    """An NNX path as the "/"-joined string `e2e_fast_params` is matched against."""
    return "/".join(str(part) for part in path)


def fast_filter(pattern: str):
    """NNX filter of the fast weights: the `nnx.Param`s whose path the regular expression `pattern` matches."""
    compiled = re.compile(pattern)
    return lambda path, value: isinstance(value, nnx.Param) and compiled.search(parameter_path(path)) is not None


def suffix_start(model: nnx.Module) -> int:
    """Index of the first stage of the LM `model` that holds a fast weight; the stages from there read chunk by chunk.

    Raises ValueError when `config.e2e_fast_params` matches no parameter, or matches one outside the
    stages (the prefix and the embedding read the whole sequence once, so they cannot change).
    """
    pattern = model.config.e2e_fast_params
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, fast_filter(pattern)))]
    if not paths:
        examples = [parameter_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))][:6]
        raise ValueError(f"e2e_fast_params={pattern!r} matches no parameter; expected a regular expression "
                         f"matching parameter paths such as {examples} (the default needs a stage with prime_mlp)")
    outside = [parameter_path(path) for path in paths if path[0] != "stages"]
    if outside:
        raise ValueError(f"e2e_fast_params={pattern!r} matches {outside[:3]} outside the stages; expected fast "
                         "weights inside the stages only")
    return min(int(path[1]) for path in paths)


def read_suffix(model: nnx.Module, x: jax.Array, context: Context) -> tuple[jax.Array, jax.Array, nnx.State]:
    """Runs the suffix stages of the LM `model` chunk by chunk with an inner step after each chunk.

    Args:
      model: the LM (its config has `e2e_chunk_size`).
      x: [batch, seq, embed], the prefix stages' output.
      context: `context.targets` int [batch, seq] holds the token each position predicts (negative:
        none, weighted 0 in the inner loss); `inner_lr_scale` scales the inner learning rate.
    Returns:
      (hidden [batch, seq, embed] after the final norm, float32 [batch, seq] next-token losses;
      position t of both comes from the fast weights after the steps on the chunks before t's).
      Losses at positions without a target are meaningless. Third, the fast weights after the last
      chunk's step: an `nnx.State` of the fast parameters, each with a leading batch axis.
    """
    config = model.config
    if context.targets is None or context.targets.shape != x.shape[:2]:
        raise ValueError(f"TTT-E2E reads with targets [batch, seq] = {list(x.shape[:2])} in the context; got "
                         f"{None if context.targets is None else context.targets.shape}")
    chunk = config.e2e_chunk_size
    batch, seq, embed = x.shape
    num_chunks = -(-seq // chunk)
    padding = num_chunks * chunk - seq
    # [num_chunks, batch, chunk, ...]: the scan runs over chunks. Padded positions have no target.
    x_chunks = jnp.pad(x, ((0, 0), (0, padding), (0, 0))).reshape(batch, num_chunks, chunk, embed).swapaxes(0, 1)
    targets = jnp.pad(context.targets, ((0, 0), (0, padding)), constant_values=-1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    start = suffix_start(model)
    graphdef, fast, rest = nnx.split(model, fast_filter(config.e2e_fast_params), ...)
    suffix = model.stages[start:]
    states = [stages_lib.init_stage_state(stage, batch) for stage in suffix]
    state_rows = [_batch_axes(stages_lib.stage_state_axes(stage)) for stage in suffix]
    fast_rows = jax.tree.map(lambda weight: jnp.broadcast_to(weight, (batch, *weight.shape)), fast)
    learning_rate = config.e2e_inner_lr * context.inner_lr_scale
    optimizer = optax.sgd(learning_rate)
    if config.e2e_inner_clip:
        optimizer = optax.chain(optax.clip_by_global_norm(config.e2e_inner_clip), optimizer)
    stage_context = dataclasses.replace(context, targets=None)

    def row_step(fast, optimizer_state, x, targets, states):
        """One sequence's chunk: x [chunk, embed], targets [chunk] -> its loss, then its inner step."""
        states = _add_row_axis(states, state_rows)

        def chunk_loss(fast):
            row_model = nnx.merge(graphdef, fast, rest, copy=True)
            hidden, new_states = x[None], []
            for stage, state in zip(row_model.stages[start:], states):
                hidden, state = stages_lib.run_stage(stage, hidden, state, stage_context)
                new_states.append(state)
            hidden = row_model.final_norm(hidden)
            per_token = chunked_cross_entropy(hidden, row_model.unembedding(), jnp.maximum(targets, 0)[None],
                                              config.loss_chunk_size)[0]
            weights = (targets >= 0).astype(jnp.float32)
            loss = jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            return loss, (hidden[0], per_token, new_states)

        (_, (hidden, per_token, states)), grads = jax.value_and_grad(chunk_loss, has_aux=True)(fast)
        updates, optimizer_state = optimizer.update(grads, optimizer_state, fast)
        fast = optax.apply_updates(fast, updates)
        return fast, optimizer_state, hidden, per_token, _remove_row_axis(states, state_rows)

    def chunk_step(carry, inputs):
        fast, optimizer_state, states = carry
        x, targets = inputs
        # The rows are mapped by vmap; sharding constraints inside would name the batch axis of a
        # one-row array, so they are off there (the batched arrays outside keep their sharding).
        with spmd.logical_axis_rules(()):
            fast, optimizer_state, hidden, per_token, states = jax.vmap(
                row_step, in_axes=(0, 0, 0, 0, state_rows), out_axes=(0, 0, 0, 0, state_rows),
            )(fast, optimizer_state, x, targets, states)
        return (fast, optimizer_state, states), (hidden, per_token)

    if config.e2e_remat:
        chunk_step = jax.checkpoint(chunk_step, prevent_cse=False)
    optimizer_state = jax.vmap(optimizer.init)(fast_rows)
    (fast_rows, _, _), (hidden, per_token) = jax.lax.scan(chunk_step, (fast_rows, optimizer_state, states), (x_chunks, target_chunks))
    hidden = hidden.swapaxes(0, 1).reshape(batch, num_chunks * chunk, embed)[:, :seq]
    per_token = per_token.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq]
    return hidden, per_token, fast_rows


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
