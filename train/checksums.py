"""Checksums of whole (possibly sharded, possibly multi-host) arrays, to tell a damaged checkpoint from an intact one.

The checksum of an array is computed where the array lives, under one `jit` per state structure:
`sum_i bits(x_i) * (2 i + 1) mod 2^32`, over the elements x_i in row-major order, bits(x) being
the element's bit pattern as an unsigned integer. Integer addition is associative, so the value
does not depend on the sharding, the mesh or the reduction order: a checkpoint saved on one mesh
verifies on any other. Every odd weight is invertible modulo 2^32, so a change confined to one
element (any number of its bits) always changes the checksum; changes spread over several elements
cancel with a chance of about 2^-32. It guards against damage, not against deliberate tampering.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def array_checksum(array: jax.Array) -> jax.Array:
    """uint32 [] checksum of `array` (any shape and dtype, typed PRNG keys included)."""
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    if array.dtype == jnp.bool_:
        array = array.astype(jnp.uint8)
    if array.dtype.itemsize < 4:
        bits = jax.lax.bitcast_convert_type(array, jnp.dtype(f"uint{8 * array.dtype.itemsize}")).astype(jnp.uint32)
    else:  # 8-byte elements gain a trailing axis of two 32-bit words
        bits = jax.lax.bitcast_convert_type(array, jnp.uint32)
    # The row-major index from one iota per axis: a flattening reshape would regather a sharded array.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums(arrays: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: array_checksum(array) for name, array in arrays.items()}


def state_arrays(state: nnx.State) -> dict[str, jax.Array]:
    """`{"path/to/array": array}` of an nnx state."""
    return {"/".join(map(str, path)): variable.get_value() for path, variable in nnx.to_flat_state(state)}


def state_checksums(state: nnx.State) -> dict[str, int]:
    """`{"path/to/array": checksum}` of every array of an nnx state (works on every process of a multi-host run:
    the checksums come out replicated)."""
    return {name: int(np.asarray(checksum.addressable_data(0)))
            for name, checksum in _checksums(state_arrays(state)).items()}


def mismatches(recorded: dict[str, int], actual: dict[str, int]) -> list[str]:
    """What differs between recorded and recomputed checksums, one phrase per array (empty when they agree)."""
    problems = [f"{name} is missing" for name in recorded if name not in actual]
    problems += [f"{name} was not recorded when it was saved" for name in actual if name not in recorded]
    problems += [f"{name} differs from what was saved (checksum {actual[name]:08x}, recorded {recorded[name]:08x})"
                 for name in recorded if name in actual and actual[name] != recorded[name]]
    return problems
