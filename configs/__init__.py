"""Named configurations: frozen dataclasses, plain data imported by every other package."""

from ttt.configs.attention import AttentionConfig
from ttt.configs.e2e import E2EConfig
from ttt.configs.model import ModelConfig
from ttt.configs.presets import get, names
from ttt.configs.ttt import TTTConfig
from ttt.configs.ttt_layer import TTTLayerConfig

__all__ = ["AttentionConfig", "E2EConfig", "ModelConfig", "TTTConfig", "TTTLayerConfig", "get", "names"]
