"""Timing several compiled calls under the same machine conditions: the benchmarks' medians."""

import statistics
import time


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """{name: (fn, args)} -> {name: median seconds} of `repeats` runs, after one compiling run of each,
    the calls taking turns in every repetition so that the machine's drift reaches all of them alike."""
    import jax  # imported here: the benchmarks set XLA_FLAGS before jax starts its backend

    # Nothing of the inputs' own computations (initialisation, resharding) in flight while compiling.
    jax.block_until_ready([args for _, args in calls.values()])
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
