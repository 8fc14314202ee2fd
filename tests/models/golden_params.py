"""Deterministic parameters for the golden-logit test, independent of how the model creates them.

Every parameter is drawn from a generator seeded by its *canonical name*: its path in the parameter
tree as it was when the golden logits were recorded (`groups/blocks/<i>/...`, stacked over the
pattern repetitions). A refactor that renames or regroups parameters maps its paths back to these
names (`canonical_name`), so the same numbers land in the same places and the logits can be compared.
"""

import zlib

import numpy as np

NORM_SCALES = ("scale", "inner_ln_weight")


def canonical_name(path: tuple) -> str:
    """'/'-joined path of a parameter in today's tree, mapped to the name it had when recorded."""
    parts = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
    if parts[-1] == "value":  # the array inside an nnx.Variable
        parts = parts[:-1]
    # Models made of one stage store its stacked blocks under stages/0; they were recorded as groups.
    if parts[:2] == ["stages", "0"]:
        parts = ["groups"] + parts[2:]
    return "/".join(parts)


def value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values for the parameter `name`: norm scales near 1, everything else small noise."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    noise = rng.standard_normal(shape).astype(np.float32)
    if name.endswith(NORM_SCALES):
        return 1.0 + 0.1 * noise
    return 0.05 * noise
