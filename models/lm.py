"""`LM`: embeddings, stages of scanned pre-norm blocks, final norm, logits; one forward that reads from a cache."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.configs import ModelConfig
from ttt.configs.model import TTT_MIXERS
from ttt.context import DEFAULT, Context
from ttt.documents import check_document_starts
from ttt.models import e2e, e2e_cache
from ttt.models import stages as stages_lib
from ttt.models.inputs import check_token_ids
from ttt.models.layers import normal_init, rms_norm
from ttt.models.loss import chunked_cross_entropy, project_to_vocab
from ttt.sharding import constrain

Cache = dict[str, Any]


class LM(nnx.Module):
    """Decoder-only language model built from a `ModelConfig`.

    One forward, `extend(ids, cache) -> (logits, cache)`: it reads ids after what the cache holds
    (None: nothing) and returns the cache after them. A prompt is `extend` from None, a decoded token
    is `extend` of one id, a long document can be read in pieces. `model(ids)` and
    `model.loss(ids, mask)` are the same forward from the initial state, without keeping a cache.

    The cache is `{"stages": [stacked states of each stage]}`, each stage's a list with one mixer
    state per block of its pattern, stacked over the pattern's repetitions; `cache_axes()` names
    the logical axes of every array. Its size never depends on how many tokens were read, except
    that full-attention layers preallocate `max_seq_len` entries.

    With `config.e2e` (TTT-E2E, models/e2e.py) the stages from `suffix_start` on train
    their fast weights while reading; `"stages"` then holds the prefix stages' states and `"e2e"` the
    suffix's (models/e2e_cache.py).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                               param_dtype=config.param_dtype, embedding_init=normal_init(config, ("vocab", "embed")),
                               rngs=rngs)
        self.stages = nnx.List([stages_lib.make_stage(config, stage, rngs) for stage in config.model_stages])
        self.final_norm = rms_norm(config, config.hidden_size, "embed", rngs=rngs)
        if config.tie_embeddings:
            self.head = None
        else:
            self.head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype,
                                   param_dtype=config.param_dtype, kernel_init=normal_init(config, ("embed", "vocab")),
                                   rngs=rngs)
        # TTT-E2E: the stages from here on read chunk by chunk, training their fast weights.
        self.suffix_start = e2e.suffix_start(self) if config.e2e is not None else None

    # -- the forward ----------------------------------------------------------------------

    def extend(self, ids: jax.Array, cache: Cache | None = None,
               context: Context = DEFAULT) -> tuple[jax.Array, Cache]:
        """ids: int32 [batch, seq] read after `cache` (None: the initial state) ->
        (logits [batch, seq, vocab] in the compute dtype, cache after ids)."""
        hidden, cache = self._read(ids, cache, context)
        return self._logits(hidden), cache

    def hidden_states(self, ids: jax.Array, context: Context = DEFAULT) -> jax.Array:
        """ids: int32 [batch, seq] -> final-normed hidden states [batch, seq, embed], from the initial state,
        each scanned group rematerialised as `config.remat` says (the training forward)."""
        check_token_ids(ids, self.config.vocab_size)
        if self.suffix_start is not None:
            if context.targets is None:  # each position predicts the next id; the last one's is unknown
                context = dataclasses.replace(context, targets=jnp.pad(ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1))
            return self._read_e2e(ids, context)[0]
        return self.final_norm(self._run_from_start(ids, self.stages, context))

    def __call__(self, ids: jax.Array, context: Context = DEFAULT) -> jax.Array:
        """ids: int32 [batch, seq] -> logits [batch, seq, vocab] in the compute dtype."""
        return self._logits(self.hidden_states(ids, context))

    def loss(self, ids: jax.Array, mask: jax.Array | None = None, context: Context = DEFAULT,
             cache: Cache | None = None) -> tuple[jax.Array, jax.Array]:
        """Next-token cross-entropy: positions :-1 predict ids[:, 1:].

        Args:
          ids: int32 [batch, seq], seq >= 2.
          mask: optional weights of the predicted tokens, either [batch, seq - 1] (aligned with the
            targets ids[:, 1:]) or [batch, seq] (aligned with ids; column 0 is never a target and
            is dropped). None weights every target 1.
          context: per-call inputs (the inner-LR scale of training's warmup; `document_starts`, if
            set, aligned with ids [batch, seq]).
          cache: read ids after what this cache holds (e.g. a memory of earlier documents) instead
            of from the initial state.
        Returns:
          (loss, per_token_loss): the mask-weighted mean, a float32 scalar (0 when the mask is all
          zero), and the unweighted float32 [batch, seq - 1] losses. The float32 logits are
          computed `loss_chunk_size` positions at a time (never for the whole sequence).
          TTT-E2E: the inner loss, too, weights only the targets of positive mask weight.
        """
        check_token_ids(ids, self.config.vocab_size)
        if ids.shape[1] < 2:
            raise ValueError(f"loss needs sequences of at least 2 tokens; got ids of shape {ids.shape}")
        if context.document_starts is not None:  # the forward reads ids[:, :-1]
            check_document_starts(context.document_starts, ids.shape)
            context = dataclasses.replace(context, document_starts=context.document_starts[:, :-1])
        weights = None if mask is None else target_weights(mask, ids.shape)
        if self.suffix_start is not None and cache is None:  # the inner loop has scored every token already
            _, per_token, _ = self._read_e2e(ids[:, :-1], e2e_context(ids, weights, context))
        else:
            if cache is None:
                hidden = self.hidden_states(ids[:, :-1], context)
            else:
                hidden, _ = self._read(ids[:, :-1], cache, context)
            per_token = chunked_cross_entropy(hidden, self.unembedding(), ids[:, 1:], self.config.loss_chunk_size)
        if weights is None:
            return per_token.mean(), per_token
        return (per_token * weights).sum() / jnp.maximum(weights.sum(), 1e-9), per_token

    # -- the cache ------------------------------------------------------------------------

    def init_cache(self, batch: int) -> Cache:
        """The cache before any token has been read."""
        cache = {"stages": [stages_lib.init_stage_state(stage, batch) for stage in self._prefix()]}
        if self.suffix_start is not None:
            cache["e2e"] = e2e_cache.initial_suffix_cache(self, batch)
        return cache

    def cache_axes(self) -> Cache:
        """Logical axis names (a `PartitionSpec` per array) of the cache, for sharding or restoring it on a mesh."""
        axes = {"stages": [stages_lib.stage_state_axes(stage) for stage in self._prefix()]}
        if self.suffix_start is not None:
            axes["e2e"] = e2e_cache.suffix_cache_axes(self)
        return axes

    # -- pieces ---------------------------------------------------------------------------

    def _read(self, ids: jax.Array, cache: Cache | None, context: Context) -> tuple[jax.Array, Cache]:
        """ids read after `cache` -> (final-normed hidden states [batch, seq, embed], cache after ids)."""
        check_token_ids(ids, self.config.vocab_size)
        self._check_document_starts(ids, context, from_start=cache is None)
        x = self._embed(ids)
        prefix = self._prefix()
        states = [None] * len(prefix) if cache is None else cache["stages"]
        new_states = []
        for stage, state in zip(prefix, states):
            x, state = stages_lib.run_stage(stage, x, state, context)
            new_states.append(state)
        if self.suffix_start is None:
            return self.final_norm(x), {"stages": new_states}
        hidden, suffix = e2e_cache.extend_suffix(self, x, ids, None if cache is None else cache["e2e"], context)
        return hidden, {"stages": new_states, "e2e": suffix}

    def _prefix(self):
        """The stages read in one pass: all of them, or a TTT-E2E model's before `suffix_start` (its cache holds
        their states and the suffix's, models/e2e_cache.py)."""
        return self.stages if self.suffix_start is None else self.stages[:self.suffix_start]

    def read_fast_weights(self, ids: jax.Array, mask: jax.Array | None = None,
                          context: Context = DEFAULT) -> nnx.State:
        """TTT-E2E: the fast weights after reading ids[:, :-1] with targets ids[:, 1:] (those `mask` weights
        positively, as `loss` does), one inner step per chunk: an `nnx.State` of the fast parameters, each
        [batch, *parameter shape]. The model itself is left as it was."""
        check_token_ids(ids, self.config.vocab_size)
        if self.suffix_start is None:
            raise ValueError("read_fast_weights needs a TTT-E2E model (config.e2e set); this one has none")
        weights = None if mask is None else target_weights(mask, ids.shape)
        return nnx.State(self._read_e2e(ids[:, :-1], e2e_context(ids, weights, context))[2]["fast"])

    def _read_e2e(self, ids: jax.Array, context: Context) -> tuple[jax.Array, jax.Array, dict]:
        """TTT-E2E from the initial state: ids [batch, seq], `context.targets` [batch, seq] ->
        (final-normed hidden states [batch, seq, embed], float32 [batch, seq] next-token losses, the
        suffix's reading state after the last chunk's step; see `e2e.read_suffix`)."""
        return e2e.read_suffix(self, self._run_from_start(ids, self._prefix(), context), context)

    def _run_from_start(self, ids: jax.Array, stages, context: Context) -> jax.Array:
        """ids [batch, seq] embedded and run through `stages` from the initial state, keeping no state, each
        scanned group rematerialised as `config.remat` says -> [batch, seq, embed] (before the final norm)."""
        self._check_document_starts(ids, context, from_start=True)
        x = self._embed(ids)
        for stage in stages:
            x, _ = stages_lib.run_stage(stage, x, None, context, keep_state=False, remat_policy=self._remat_policy())
        return x

    def _check_document_starts(self, ids: jax.Array, context: Context, from_start: bool) -> None:
        """`context.document_starts` must match ids and, read from the start by TTT layers, fall where their
        mini-batches begin (checked when concrete; from a cache, the layers check what they can)."""
        if context.document_starts is None:
            return
        if self.suffix_start is not None:
            raise ValueError("TTT-E2E models do not read document_starts (their fast weights step per chunk, "
                             "not per document); pass a Context without it")
        sizes = {self.config.ttt_layer_config(m).mini_batch_size for m in self.config.mixers if m in TTT_MIXERS}
        check_document_starts(context.document_starts, ids.shape)
        for size in sizes if from_start else ():
            check_document_starts(context.document_starts, ids.shape, size)

    def unembedding(self) -> jax.Array:
        """[embed, vocab] matrix mapping final hidden states to logits."""
        if self.head is None:
            return self.embed.embedding[...].T
        return self.head.kernel[...]

    def _embed(self, ids: jax.Array) -> jax.Array:
        return constrain(self.embed(ids), ("batch", "seq", "embed"))

    def _logits(self, hidden: jax.Array) -> jax.Array:
        return project_to_vocab(hidden, self.unembedding(), hidden.dtype)

    def _remat_policy(self):
        policy = self.config.remat_policy_name
        if policy in ("none", "full"):
            return None if policy == "none" else "full"
        return getattr(jax.checkpoint_policies, policy)


def target_weights(mask: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A loss mask [batch, seq - 1] or [batch, seq] of ids of `shape` [batch, seq] -> float32 [batch, seq - 1]
    weights of the targets ids[:, 1:] (column 0 of a [batch, seq] mask is never a target)."""
    batch, seq = shape
    if mask.shape == (batch, seq):
        mask = mask[:, 1:]
    if mask.shape != (batch, seq - 1):
        raise ValueError(f"mask of shape {mask.shape}; expected {(batch, seq - 1)} or {(batch, seq)}")
    return mask.astype(jnp.float32)


def e2e_context(ids: jax.Array, weights: jax.Array | None, context: Context) -> Context:
    """`context` with TTT-E2E's targets for reading ids[:, :-1]: ids[:, 1:], unknown (-1) where `weights`
    [batch, seq - 1] is not positive (padding, unlabelled positions), so the inner loss skips them."""
    targets = ids[:, 1:] if weights is None else jnp.where(weights > 0, ids[:, 1:], -1)
    return dataclasses.replace(context, targets=targets)
