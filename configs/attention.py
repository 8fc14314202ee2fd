"""Configuration of the attention mixers of a model (`ModelConfig.attention`): what every `attention`
(full causal) and `swa` (sliding window) layer shares."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The attention layers of a model (models/attention.py).

    Attributes:
      num_kv_heads: key/value heads (grouped-query attention); None means `ModelConfig.num_heads`.
      sliding_window: keys seen by a `swa` query, itself included (required when the model has `swa`
        layers; unused by full attention).
      qk_norm: RMSNorm over head_dim on queries and keys.
    """

    num_kv_heads: int | None = None
    sliding_window: int | None = None
    qk_norm: bool = False

    def __post_init__(self):
        for name in ("num_kv_heads", "sliding_window"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"attention.{name}={getattr(self, name)}; expected >= 1 (or None)")
