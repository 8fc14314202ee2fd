"""Test-session setup: 8 fake CPU devices, so sharding is tested without accelerators."""

import gc
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module.

    Each XLA:CPU executable keeps about three memory mappings of JIT code alive for as long as a jit
    cache holds it. One process running the whole suite compiles tens of thousands of executables,
    reaches the kernel's `vm.max_map_count` (65530 by default) and segfaults inside the compiler.
    Shapes are shared within a module, rarely across modules, so clearing here costs little.
    """
    yield
    jax.clear_caches()
    gc.collect()
