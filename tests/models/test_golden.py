"""Every tiny preset computes the logits recorded before the one-forward refactor (tests/models/golden).

The parameters are set by name (tests/models/golden_params.py), so the comparison does not depend on
how or in which order the model draws its initial values.
"""

import os

import numpy as np
import pytest
from flax import nnx

from tests.models.record_golden import GOLDEN_DIR, TINY_PRESETS, golden_ids, golden_model


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_logits_are_unchanged(name):
    model = golden_model(name)
    logits = nnx.jit(lambda m, ids: m(ids))(model, golden_ids(model.config.vocab_size))
    np.testing.assert_allclose(logits, np.load(os.path.join(GOLDEN_DIR, f"{name}.npy")), rtol=1e-5, atol=1e-5)
