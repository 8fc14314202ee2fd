"""ttt: test-time-training layers in JAX.

`ttt.ops` holds the pure inner-loop functions (primal, dual and step forms); `ttt.TTTLayer` is the
Flax NNX sequence mixer built on them.
"""

from ttt import ops
from ttt.layer import TTTLayer

__all__ = ["TTTLayer", "ops"]
