"""One whole training step (forward, backward, AdamW update) of the 125M presets, by sequence length.

For each preset and sequence length, a fresh process builds the model, compiles `ttt.train.step.train_step`
for one row of `seq + 1` tokens (batch 1), runs it once to warm up and `--repeats` more times; it
reports the median step time, tokens per second, the time relative to the Transformer of the same
length and dtype, and the process's peak resident memory (each configuration has a process of its
own, so the peak is its own).

- `--dtypes` sets the compute dtype (ModelConfig.dtype); the parameters and the optimizer stay
  float32, and so do the TTT inner loop, norms, softmax and loss.
- `--devices N` splits the CPU into N host devices and shards every model's heads and MLP over them
  (MeshConfig(data=1, tensor=N)): XLA:CPU runs a TTT layer's scan on one thread per device
  (benchmarks/xla_cpu.py). The default is one device.
- Every model uses the same rematerialisation (`--remat`, default full: one scanned group's
  activations at a time), so that full attention at 8K fits in memory.
- The children run with benchmarks/xla_cpu.py's setting unless `--no-xla-cpu-reduce-workaround`, and
  with glibc's malloc on huge pages with `--hugepage-malloc` (see there).

  python benchmarks/train_step.py                                  # 125M presets at 2K and 8K
  python benchmarks/train_step.py --seqs 2048 --repeats 2 --out /tmp/train_step.json
  python benchmarks/train_step.py --seqs 2048 --dtypes float32 bfloat16     # what bfloat16 buys
  python benchmarks/train_step.py --seqs 2048 --devices 2                   # both cores of a 2-core CPU
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from output import write_json
from xla_cpu import add_cpu_arguments, check_devices, cpu_environment

PRESETS = ("transformer-125m", "ttt-linear-125m", "ttt-mlp-125m", "hybrid-swa-ttt-125m")
BASELINE = "transformer-125m"


def measure(preset: str, seq: int, repeats: int, remat: str, dtype: str, devices: int) -> dict:
    """Runs in the child process: compile, warm up and time one configuration."""
    import jax
    import numpy as np

    from ttt import configs
    from ttt.configs.train import MeshConfig, OptimizerConfig
    from ttt.train import mesh as mesh_lib
    from ttt.train.optim import make_optimizer
    from ttt.train.step import create_model, token_sharding, train_step
    from flax import nnx

    config = configs.get(preset, max_seq_len=max(seq, 2048), remat=remat, dtype=dtype)
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, tensor=devices), devices=jax.devices()[:devices])
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 1, seq + 1), dtype=np.int32)
    with mesh_lib.activate(mesh):
        model = create_model(config, mesh, seed=0)
        optimizer = nnx.Optimizer(model, make_optimizer(OptimizerConfig(), 100), wrt=nnx.Param)
        tokens = jax.device_put(tokens, token_sharding(mesh))
        jax.block_until_ready((nnx.state(optimizer), tokens))  # nothing in flight while the step compiles
        start = time.perf_counter()
        jax.block_until_ready(train_step(model, optimizer, tokens, np.float32(1.0)))
        compile_and_first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(train_step(model, optimizer, tokens, np.float32(1.0)))
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"preset": preset, "seq": seq, "dtype": dtype, "devices": devices, "step_s": step_s, "all_s": times,
            "tokens_per_s": seq / step_s,
            "compile_and_first_s": compile_and_first,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def run_child(preset: str, seq: int, dtype: str, args: argparse.Namespace) -> dict:
    """`measure` in a fresh process (its own peak memory), with the CPU settings of `args` in its environment;
    a failure (e.g. out of memory) is a row too."""
    command = [sys.executable, __file__, "--child", preset, str(seq), str(args.repeats), args.remat, dtype,
               str(args.devices)]
    done = subprocess.run(command, capture_output=True, text=True, env=cpu_environment(args, dict(os.environ)))
    if done.returncode:
        return {"preset": preset, "seq": seq, "dtype": dtype, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    baseline = {(r["seq"], r["dtype"]): r for r in rows if r["preset"] == BASELINE and "step_s" in r}
    header = (f"{'preset':24} {'seq':>6} {'dtype':>9} {'step s':>8} {'tokens/s':>9} {'vs transformer':>15} "
              f"{'peak GiB':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:24} {r['seq']:6d} {r['dtype']:>9}  failed: {r['error']}")
            continue
        base = baseline.get((r["seq"], r["dtype"]))
        ratio = f"{base['step_s'] / r['step_s']:14.2f}x" if base else f"{'-':>15}"
        print(f"{r['preset']:24} {r['seq']:6d} {r['dtype']:>9} {r['step_s']:8.2f} {r['tokens_per_s']:9.0f} {ratio} "
              f"{r['peak_rss_gib']:9.2f}")
    print("(vs transformer: the Transformer's step time over this one's at the same length and dtype, > 1 is faster)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", default="full", help="rematerialisation of every model (ModelConfig.remat)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="compute dtypes (ModelConfig.dtype), each measured for every preset and length")
    add_cpu_arguments(parser, "every model shards its heads and MLP over them (MeshConfig(data=1, tensor=N))")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    check_devices(parser, args.devices)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores split into {args.devices} device(s); "
          f"batch 1, remat {args.remat}; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for seq in args.seqs:
        for dtype in args.dtypes:
            for preset in args.presets:
                rows.append(run_child(preset, seq, dtype, args))
                print(f"  {preset} at {seq} in {dtype}: {rows[-1].get('step_s', rows[-1].get('error'))}", flush=True)
    print_table(rows)
    result = {"rows": rows, "args": vars(args), "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg()}
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    write_json(result, args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        preset, seq, repeats, remat, dtype, devices = sys.argv[2:8]
        print(json.dumps(measure(preset, int(seq), int(repeats), remat, dtype, int(devices))))
    else:
        main()
