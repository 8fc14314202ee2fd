"""The model family: attention, MLP, pre-norm blocks with a per-layer mixer, the LM, generation."""

from ttt.models.generation import generate, sample
from ttt.models.lm import LM

__all__ = ["LM", "generate", "sample"]
