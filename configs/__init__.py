"""Named configurations: frozen dataclasses, plain data imported by every other package."""

from ttt.configs.ttt_layer import TTTLayerConfig

__all__ = ["TTTLayerConfig"]
