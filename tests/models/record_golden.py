"""Records the golden logits of every tiny preset: `python -m tests.models.record_golden`.

Run once before a refactor that must not change what the models compute; the test
(`test_golden.py`) then compares against the saved arrays.
"""

import os

import jax
import numpy as np
from flax import nnx

from tests.models import golden_params
from ttt import configs
from ttt.models import LM

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
TINY_PRESETS = [name for name in configs.names() if name.endswith("-tiny")]
SEQ_LEN = 80  # past the hybrid's window of 64 and five TTT mini-batches of 16, with a partial one


def golden_ids(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, (1, SEQ_LEN)).astype(np.int32)


def golden_model(name: str) -> LM:
    """The preset with every parameter set from `golden_params.value` of its canonical name.

    The logits were recorded before blocks had a pre-convolution, so it is off here.
    """
    model = LM(configs.get(name, pre_conv=False), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    filled = jax.tree_util.tree_map_with_path(
        lambda path, x: golden_params.value(golden_params.canonical_name(path), x.shape), state)
    nnx.update(model, filled)
    return model


def main():
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for name in TINY_PRESETS:
        model = golden_model(name)
        logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, golden_ids(model.config.vocab_size)))
        np.save(os.path.join(GOLDEN_DIR, f"{name}.npy"), logits)
        print(name, logits.shape, float(np.abs(logits).mean()))


if __name__ == "__main__":
    main()
