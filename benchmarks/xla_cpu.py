"""The XLA:CPU settings the timing benchmarks apply, and why.

jax 0.10's XLA:CPU hands reductions to YNNPACK, which runs a reduction whose output keeps a size-1 axis
about 40x slower than the same reduction without it: `sum(x * y, axis=1)` of [1, 2048, 768] floats takes
19 ms, of [2, 1024, 768] 0.5 ms (measured on the 2-core CPU VM). Autodiff produces exactly such
reductions for every parameter broadcast over [batch, seq] at batch 1, the batch of these benchmarks.
`--xla_cpu_experimental_ynn_fusion_type=-reduce` leaves reductions to XLA's own emitter. XLA reads the
flag when jax starts its backend, so it must be set before the first computation (or in a child's
environment); the benchmarks that time both this project and a baseline set it for both alike.

`split_into_host_devices(n)` (the benchmarks' `--devices`) splits the CPU into n host devices: XLA:CPU
runs one device's mini-batch scan on one thread, so sharding the heads over devices is what lets a
TTT layer's scan use more than one core.
"""

import os

REDUCE_WORKAROUND = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def with_reduce_workaround(environment: dict | None = None) -> dict:
    """`environment` (default: this process's, which is changed in place) with the flag added to XLA_FLAGS."""
    environment = os.environ if environment is None else environment
    flags = environment.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        environment["XLA_FLAGS"] = f"{flags} {REDUCE_WORKAROUND}".strip()
    return environment


def split_into_host_devices(count: int) -> None:
    """Splits this process's CPU into `count` host devices (before jax starts its backend).

    XLA:CPU runs one device's ops in order, so a TTT layer's mini-batch scan, a chain of small ops, runs
    on one thread whatever the cores; heads sharded over host devices run side by side. One device
    leaves XLA_FLAGS as it is.
    """
    if count > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
