"""Named configurations: frozen dataclasses, plain data imported by every other package."""

from ttt.configs.model import ModelConfig
from ttt.configs.presets import get, names
from ttt.configs.ttt_layer import TTTLayerConfig

__all__ = ["ModelConfig", "TTTLayerConfig", "get", "names"]
