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

`--hugepage-malloc` runs a benchmark with glibc's malloc backing its large blocks with transparent huge
pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc >= 2.35). XLA:CPU allocates a run's temporaries
with malloc; glibc serves the large ones with fresh mmaps, whose every 4 KiB page faults when first
written, in every run. A TTT-Linear forward+backward at seq 4096, b = 1024, faulted 178k times per run
(about 700 MB) and took 670-700 ms; with huge pages, about 1k faults and 500-530 ms (heads over 2 host
devices, measured on the 2-core CPU VM). It is an effect of timing one op alone: whole training steps
(`train_step.py --seqs 2048 --devices 2`) gained nothing for the TTT presets (0-8% slower, within this
VM's run-to-run noise) and 3.5% for the Transformer. glibc reads its
tunables only when a process starts, so the benchmark restarts itself with them.

The timing benchmarks take all three as the same options (`add_cpu_arguments`) and apply them in one
place (`apply_in_this_process`, or `cpu_environment` for a child's environment).
"""

import argparse
import os
import sys

REDUCE_WORKAROUND = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def with_reduce_workaround(environment: dict) -> dict:
    """`environment` (changed in place) with the flag added to XLA_FLAGS."""
    flags = environment.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        environment["XLA_FLAGS"] = f"{flags} {REDUCE_WORKAROUND}".strip()
    return environment


def split_into_host_devices(count: int, environment: dict) -> dict:
    """`environment` (changed in place) with the CPU split into `count` host devices; set it before jax
    starts its backend.

    XLA:CPU runs one device's ops in order, so a TTT layer's mini-batch scan, a chain of small ops, runs
    on one thread whatever the cores; heads sharded over host devices run side by side. One device
    leaves XLA_FLAGS as it is.
    """
    if count > 1:
        flags = environment.get("XLA_FLAGS", "")
        environment["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return environment


def with_hugepage_malloc(environment: dict) -> dict:
    """`environment` (changed in place) with GLIBC_TUNABLES asking malloc for transparent huge pages."""
    tunables = [t for t in environment.get("GLIBC_TUNABLES", "").split(":") if t]
    if HUGEPAGE_TUNABLE not in tunables:
        environment["GLIBC_TUNABLES"] = ":".join([*tunables, HUGEPAGE_TUNABLE])
    return environment


def restart_with_hugepage_malloc(script: str, argv: list[str]) -> None:
    """Replaces this process by `python script *argv` with huge-page malloc, unless it already runs with it
    (then returns). Call it before any work: the process starts over."""
    environment = with_hugepage_malloc(dict(os.environ))
    if environment["GLIBC_TUNABLES"] == os.environ.get("GLIBC_TUNABLES"):
        return
    print(f"restarting with GLIBC_TUNABLES={environment['GLIBC_TUNABLES']}", flush=True)
    os.execve(sys.executable, [sys.executable, script, *argv], environment)


def add_cpu_arguments(parser: argparse.ArgumentParser, devices_help: str) -> None:
    """Adds `--devices`, `--xla-cpu-reduce-workaround` and `--hugepage-malloc` to a benchmark's parser."""
    parser.add_argument("--devices", type=int, default=1, help=f"host devices the CPU is split into; {devices_help}")
    parser.add_argument("--xla-cpu-reduce-workaround", action=argparse.BooleanOptionalAction, default=True,
                        help="leave reductions to XLA's own emitter (benchmarks/xla_cpu.py)")
    parser.add_argument("--hugepage-malloc", action="store_true",
                        help="glibc's malloc on transparent huge pages (benchmarks/xla_cpu.py)")


def check_devices(parser: argparse.ArgumentParser, devices: int, heads: int | None = None) -> None:
    """Exits with a usage error unless `devices` >= 1 (and splits `heads` evenly, where given)."""
    if devices < 1:
        parser.error(f"--devices {devices}: expected at least 1")
    if heads is not None and heads % devices:
        parser.error(f"--devices {devices}: the {heads} heads must split evenly over the devices")


def cpu_environment(args: argparse.Namespace, environment: dict) -> dict:
    """`environment` (changed in place) with the settings `add_cpu_arguments`'s options ask for."""
    if args.xla_cpu_reduce_workaround:
        with_reduce_workaround(environment)
    split_into_host_devices(args.devices, environment)
    if args.hugepage_malloc:
        with_hugepage_malloc(environment)
    return environment


def apply_in_this_process(args: argparse.Namespace, script: str, argv: list[str]) -> None:
    """Applies the options to this process before jax starts: first the restart that huge pages need (it
    reruns `python script *argv`), then the XLA flags, which the restarted process sets again."""
    if args.hugepage_malloc:
        restart_with_hugepage_malloc(script, argv)
    cpu_environment(args, os.environ)
