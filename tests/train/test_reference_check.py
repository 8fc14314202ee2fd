"""The paper's own code against this project: benchmarks/reference_check.py with a ttt-lm-jax checkout.

Runs only when TTT_REFERENCE_PYTHON (a python whose environment imports the reference's model code:
jax, flax, transformers < 5, ml_collections, mlxu) and TTT_REFERENCE_REPO (a checkout of
test-time-training/ttt-lm-jax) are set; every kind's logits must match to the script's tolerance.
"""

import importlib.util
import os
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "reference_check.py"
REFERENCE_PYTHON = os.environ.get("TTT_REFERENCE_PYTHON")
REFERENCE_REPO = os.environ.get("TTT_REFERENCE_REPO")

pytestmark = pytest.mark.skipif(
    not (REFERENCE_PYTHON and REFERENCE_REPO),
    reason="set TTT_REFERENCE_PYTHON and TTT_REFERENCE_REPO to compare with the ttt-lm-jax reference code")


def _load_script():
    spec = importlib.util.spec_from_file_location("reference_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference_check = _load_script()


@pytest.fixture(scope="module")
def reference_outputs(tmp_path_factory):
    """The reference side, once for every kind: checkpoints, ids and logits (bf16 checkpoints, as its train script
    saves them by default; the reference logits come from the stored weights)."""
    workdir = tmp_path_factory.mktemp("reference")
    reference_check.run_reference(REFERENCE_PYTHON, pathlib.Path(REFERENCE_REPO), workdir, list(reference_check.KINDS),
                                  "bf16", seed=0)
    return workdir


@pytest.mark.parametrize("kind", list(reference_check.KINDS))
def test_converted_checkpoint_gives_the_reference_logits(reference_outputs, kind):
    result = reference_check.compare_kind(reference_outputs / kind, "half")
    assert result["max_relative_difference"] < reference_check.TOLERANCE, result
