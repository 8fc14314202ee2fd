"""The compiled steps: model creation directly sharded, one training update, per-token evaluation losses."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ttt.configs import ModelConfig
from ttt.context import Context
from ttt.models import LM
from ttt.sharding import constrain
from ttt.models.info import abstract_model, count_parameters  # noqa: F401 (step.count_parameters)
from ttt.train import mesh as mesh_lib


def create_model(config: ModelConfig, mesh: Mesh, seed: int) -> LM:
    """An LM whose parameters are created already sharded by the rules (never whole on one device).

    Call inside `mesh_lib.activate(mesh)`. Raises a clear error first if a mesh size does not divide
    a parameter dimension.
    """
    mesh_lib.parameter_specs(nnx.state(abstract_model(config)), mesh)
    return _initialize(config, seed)


# Module-level, so that a model of the same config and seed on the same mesh is compiled once.
@functools.partial(nnx.jit, static_argnums=(0, 1))
def _initialize(config: ModelConfig, seed: int) -> LM:
    return LM(config, rngs=nnx.Rngs(seed))


def token_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of the `[micro_batches, batch, seq + 1]` tokens of one training step."""
    return mesh_lib.named_sharding(mesh, (None, "batch", "seq"))


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: LM, optimizer: nnx.Optimizer, tokens: jax.Array,
               inner_lr_scale: jax.Array | float = 1.0, mask: jax.Array | None = None,
               document_starts: jax.Array | None = None) -> dict[str, jax.Array]:
    """One optimizer update from `tokens` int32 [micro_batches, batch, seq + 1].

    `mask` bool [micro_batches, batch, seq + 1] (aligned with tokens; recall tasks, padded documents)
    restricts the loss to the labelled targets; None scores every target (text).
    `document_starts` bool [micro_batches, batch, seq + 1] (aligned with tokens; `DataConfig.
    reset_at_documents`) makes every mixer restart at each document (ttt/documents.py); None: off.

    `inner_lr_scale` multiplies the TTT layers' inner learning rate (the inner-LR warmup); it is
    traced, so a new value each step does not recompile.

    Gradients of the micro-batches are averaged (gradient accumulation) before one update; a
    non-finite gradient skips the update (optax.apply_if_finite) and `finite` reports it.
    Returns float32 scalars `loss`, `grad_norm` (before clipping) and bool `finite`.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(params, micro_batch, micro_mask, micro_starts):
        context = Context(inner_lr_scale=inner_lr_scale, document_starts=micro_starts)
        loss, _ = nnx.merge(graphdef, params, rest).loss(micro_batch, micro_mask, context=context)
        return loss

    def accumulate(grad_sum, micro):
        loss, grads = jax.value_and_grad(loss_of)(params, *micro)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grad_sum, losses = jax.lax.scan(accumulate, zeros, (tokens, mask, document_starts))
    grads = jax.tree.map(lambda g, p: (g / tokens.shape[0]).astype(p.dtype), grad_sum, params)
    loss = losses.mean()
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    for node in (model, optimizer):
        _keep_shardings(node)
    return {"loss": loss, "grad_norm": grad_norm, "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}


def _keep_shardings(node) -> None:
    """Constrains every variable of `node` (in place) to the sharding of its logical axis names: left to
    XLA, norm parameters came out split over `tensor`, a new input sharding that compiled the next step
    again."""

    def constrain_variable(variable):
        value = variable.get_value()
        axes = variable.get_metadata().get("out_sharding") or (None,) * value.ndim
        return variable.replace(constrain(value, tuple(axes)))

    state = nnx.state(node)
    nnx.update(node, jax.tree.map(constrain_variable, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


@nnx.jit
def per_token_losses(model: LM, tokens: jax.Array, cache=None) -> jax.Array:
    """tokens int32 [batch, seq] -> float32 [batch, seq - 1], the loss of predicting tokens[:, 1:], read after
    `cache` (an `LM.extend` cache of `batch` rows, e.g. from a memory; None: from the initial state)."""
    _, per_token = model.loss(tokens, cache=cache)
    return per_token
