"""`LM`: embeddings, a stack of pre-norm blocks scanned one pattern repetition at a time, final norm, logits."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.configs import ModelConfig
from ttt.models.blocks import BlockGroup
from ttt.models.layers import normal_init, rms_norm
from ttt.models.loss import chunked_cross_entropy, project_to_vocab
from ttt.sharding import constrain

# Stacked layers: every parameter of the scanned groups gets a leading axis with the logical name
# "layers" (the logical axis rules decide its mesh axis; normally none).
LAYER_AXIS_METADATA = {nnx.PARTITION_NAME: "layers"}

Cache = dict[str, Any]


class LM(nnx.Module):
    """Decoder-only language model built from a `ModelConfig`.

    `model(ids)` gives logits; `model.loss(ids, mask)` the training loss; `prefill` and
    `decode_step` the cached inference path (`ttt.models.generate` drives them).
    The cache is `{"position": int32 [], "layers": per-pattern-slot mixer states stacked over the
    `num_groups` pattern repetitions}`; its size never depends on how many tokens were read,
    except that full-attention layers preallocate `max_seq_len` entries.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                               param_dtype=config.param_dtype, embedding_init=normal_init(config, ("vocab", "embed")),
                               rngs=rngs)

        @nnx.split_rngs(splits=config.num_groups)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_AXIS_METADATA)
        def make_groups(rngs: nnx.Rngs) -> BlockGroup:
            return BlockGroup(config, rngs=rngs)

        self.groups = make_groups(rngs)
        self.final_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
        if config.tie_embeddings:
            self.head = None
        else:
            self.head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype,
                                   param_dtype=config.param_dtype, kernel_init=normal_init(config, ("embed", "vocab")),
                                   rngs=rngs)

    def _unembedding(self) -> jax.Array:
        """[embed, vocab] matrix mapping final hidden states to logits."""
        if self.head is None:
            return self.embed.embedding[...].T
        return self.head.kernel[...]

    def _embed(self, ids: jax.Array) -> jax.Array:
        return constrain(self.embed(ids), ("batch", "seq", "embed"))

    def _remat(self, fn):
        policy = self.config.remat_policy_name
        if policy == "none":
            return fn
        return nnx.remat(fn, policy=None if policy == "full" else getattr(jax.checkpoint_policies, policy))

    def hidden_states(self, ids: jax.Array, inner_lr_scale: jax.Array | float = 1.0) -> jax.Array:
        """ids: int32 [batch, seq] -> final-normed hidden states [batch, seq, embed].

        `inner_lr_scale`: a scalar (may be traced) multiplying every TTT layer's inner learning
        rate; training's inner-LR warmup sets it, everything else leaves it at 1.
        """

        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS_METADATA)
        @self._remat
        def run_group(group: BlockGroup, x: jax.Array, scale: jax.Array) -> jax.Array:
            return group(x, scale)

        scale = jnp.asarray(inner_lr_scale, jnp.float32)
        return self.final_norm(run_group(self.groups, self._embed(ids), scale))

    def __call__(self, ids: jax.Array, inner_lr_scale: jax.Array | float = 1.0) -> jax.Array:
        """ids: int32 [batch, seq] -> logits [batch, seq, vocab] in the compute dtype."""
        hidden = self.hidden_states(ids, inner_lr_scale)
        return project_to_vocab(hidden, self._unembedding(), hidden.dtype)

    def loss(self, ids: jax.Array, mask: jax.Array | None = None,
             inner_lr_scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
        """Next-token cross-entropy: positions :-1 predict ids[:, 1:].

        Args:
          ids: int32 [batch, seq], seq >= 2.
          mask: optional weights of the predicted tokens, either [batch, seq - 1] (aligned with the
            targets ids[:, 1:]) or [batch, seq] (aligned with ids; column 0 is never a target and
            is dropped). None weights every target 1.
          inner_lr_scale: multiplies every TTT layer's inner learning rate (see `hidden_states`).
        Returns:
          (loss, per_token_loss): the mask-weighted mean, a float32 scalar (0 when the mask is all
          zero), and the unweighted float32 [batch, seq - 1] losses. The float32 logits are
          computed `loss_chunk_size` positions at a time (never for the whole sequence).
        """
        batch, seq = ids.shape
        if seq < 2:
            raise ValueError(f"loss needs sequences of at least 2 tokens; got ids of shape {ids.shape}")
        hidden = self.hidden_states(ids[:, :-1], inner_lr_scale)
        per_token = chunked_cross_entropy(hidden, self._unembedding(), ids[:, 1:], self.config.loss_chunk_size)
        if mask is None:
            return per_token.mean(), per_token
        if mask.shape == (batch, seq):
            mask = mask[:, 1:]
        if mask.shape != (batch, seq - 1):
            raise ValueError(f"mask of shape {mask.shape}; expected {(batch, seq - 1)} or {(batch, seq)}")
        weights = mask.astype(jnp.float32)
        return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1e-9), per_token

    def init_cache(self, batch: int) -> Cache:
        """The cache before any token has been read."""

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=LAYER_AXIS_METADATA)
        def init_group(group: BlockGroup):
            return group.init_state(batch)

        return {"position": jnp.zeros((), jnp.int32), "layers": init_group(self.groups)}

    def prefill(self, ids: jax.Array) -> tuple[jax.Array, Cache]:
        """ids: int32 [batch, seq] -> (logits [batch, seq, vocab] as `__call__`, cache after reading ids)."""

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0), transform_metadata=LAYER_AXIS_METADATA)
        def run_group(group: BlockGroup, x: jax.Array):
            return group.prefill(x)

        x, states = run_group(self.groups, self._embed(ids))
        hidden = self.final_norm(x)
        logits = project_to_vocab(hidden, self._unembedding(), hidden.dtype)
        return logits, {"position": jnp.asarray(ids.shape[1], jnp.int32), "layers": states}

    def decode_step(self, token: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """token: int32 [batch], the next token of every sequence -> (logits [batch, vocab], next cache)."""

        # The stacked states are carried and each group's slice is written back in place; scanning
        # them as inputs/outputs instead would copy every KV cache once more per token.
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=LAYER_AXIS_METADATA)
        def step_group(group: BlockGroup, carry):
            x, states, index = carry
            x, group_states = group.step(x, jax.tree.map(lambda stacked: stacked[index], states))
            states = jax.tree.map(lambda stacked, new: stacked.at[index].set(new), states, group_states)
            return x, states, index + 1

        x = self._embed(token[:, None])[:, 0, :]
        x, states, _ = step_group(self.groups, (x, cache["layers"], jnp.zeros((), jnp.int32)))
        hidden = self.final_norm(x)[:, None, :]
        logits = project_to_vocab(hidden, self._unembedding(), hidden.dtype)[:, 0, :]
        return logits, {"position": cache["position"] + 1, "layers": states}
