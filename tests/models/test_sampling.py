"""Sampling: greedy, top-k and top-p against known distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt.models import sample

DRAWS = 4000


def draw_counts(logits, **kwargs) -> np.ndarray:
    """Counts of each token over DRAWS independent draws from one row of logits."""
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (DRAWS, len(logits)))
    tokens = jax.jit(lambda rows, rng: sample(rows, rng, **kwargs))(rows, jax.random.key(0))
    assert tokens.dtype == jnp.int32
    return np.bincount(np.asarray(tokens), minlength=len(logits))


def test_temperature_zero_is_argmax():
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), temperature=0.0), [1, 0])


def test_top_k_never_draws_outside_the_k_largest():
    logits = np.log(np.array([0.05, 0.3, 0.1, 0.25, 0.2, 0.1]))
    counts = draw_counts(logits, top_k=3)
    assert counts[[0, 2, 5]].sum() == 0
    # Renormalised over tokens 1, 3, 4: 0.3/0.75, 0.25/0.75, 0.2/0.75.
    np.testing.assert_allclose(counts[[1, 3, 4]] / DRAWS, [0.4, 1 / 3, 0.8 / 3], atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = np.array([0.05, 0.5, 0.15, 0.3])
    counts = draw_counts(np.log(probabilities), top_p=0.7)
    # Sorted: 0.5, 0.3 (mass before it 0.5 < 0.7: kept), 0.15 (mass before 0.8: dropped).
    assert counts[[0, 2]].sum() == 0
    np.testing.assert_allclose(counts[[1, 3]] / DRAWS, [0.625, 0.375], atol=0.03)


def test_temperature_sharpens_the_distribution():
    logits = np.log(np.array([0.2, 0.8]))
    counts = draw_counts(logits, temperature=0.5)
    # p^(1/T) renormalised: 0.04 / 0.68 and 0.64 / 0.68.
    np.testing.assert_allclose(counts / DRAWS, [0.04 / 0.68, 0.64 / 0.68], atol=0.02)


@pytest.mark.parametrize("kwargs, message", [({"top_k": 0}, "top_k=0"), ({"top_p": 1.5}, "top_p=1.5"),
                                             ({"temperature": -1.0}, "temperature=-1.0")])
def test_bad_sampling_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(jnp.zeros((1, 4)), jax.random.key(0), **kwargs)
