"""Configuration of TTT-E2E (Tandon et al. 2025) in a model (`ModelConfig.e2e`; None: an ordinary model)."""

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class E2EConfig:
    """The stages from the first one holding a fast parameter (the suffix) read the sequence in chunks,
    scoring each chunk with the current fast weights and then taking one inner step on its
    next-token loss (models/e2e.py).

    Attributes:
      chunk_size: tokens per chunk, one inner step each.
      inner_lr: learning rate of the inner SGD step (times `Context.inner_lr_scale`).
      inner_clip: global-norm clipping of each sequence's inner gradient (0: none).
      fast_params: regular expression searched in every parameter path ("/"-joined, e.g.
        "stages/1/blocks/0/prime_mlp/gate/kernel"); the matches are the fast weights.
      remat: rematerialise each chunk's inner step in the backward pass (memory linear in the
        number of chunks, one more forward per chunk).
    """

    chunk_size: int
    inner_lr: float = 1.0
    inner_clip: float = 1.0
    fast_params: str = "(^|/)prime_mlp/"
    remat: bool = True

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"e2e.chunk_size={self.chunk_size}; expected >= 1 (or e2e=None: no TTT-E2E)")
        if self.inner_lr < 0 or self.inner_clip < 0:
            raise ValueError(f"e2e.inner_lr={self.inner_lr}, e2e.inner_clip={self.inner_clip}; expected >= 0")
        try:
            re.compile(self.fast_params)
        except re.error as error:
            raise ValueError(f"e2e.fast_params={self.fast_params!r} is not a regular expression ({error})") from None
