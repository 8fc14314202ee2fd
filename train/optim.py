"""The optimizer: AdamW with warmup + cosine, global-norm clipping, and a NaN/inf guard."""

import functools

import jax
import optax

from ttt.configs.train import OptimizerConfig

# Parameters that get weight decay: the matrices of linear layers and the embedding; norms' scales,
# biases and the TTT layers' small per-head parameters do not.
DECAYED_PARAMETER_NAMES = ("kernel", "embedding")
# apply_if_finite would apply non-finite updates after this many in a row; the loop stops a run
# long before that (`TrainLoop.max_consecutive_skips`), so a non-finite update is never applied.
NEVER_APPLY_NON_FINITE = 2**30


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * final_lr_fraction`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * config.final_lr_fraction)


def inner_lr_scale_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Step -> the factor on every TTT layer's inner learning rate: linear from
    `ttt_inner_lr_warmup_start` at step 0 to 1 at `ttt_inner_lr_warmup_steps`, then 1 (always 1 when off)."""
    if config.ttt_inner_lr_warmup_steps == 0:
        return optax.constant_schedule(1.0)
    return optax.linear_schedule(config.ttt_inner_lr_warmup_start, 1.0, config.ttt_inner_lr_warmup_steps)


def _decay_mask(params):
    def decayed(path, _) -> bool:
        names = [str(getattr(key, "key", getattr(key, "name", ""))) for key in path]
        return any(name in DECAYED_PARAMETER_NAMES for name in names)

    return jax.tree_util.tree_map_with_path(decayed, params)


# Cached: the transformation is part of the optimizer's static structure, so handing out the same
# object for the same config lets `train_step` reuse its compilation across runs in one process.
@functools.lru_cache(maxsize=16)
def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, AdamW on the schedule, all skipped when the gradients are not finite."""
    adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.beta1, b2=config.beta2,
                        weight_decay=config.weight_decay, mask=_decay_mask)
    clip = optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0 else optax.identity()
    return optax.apply_if_finite(optax.chain(clip, adamw), max_consecutive_errors=NEVER_APPLY_NON_FINITE)
