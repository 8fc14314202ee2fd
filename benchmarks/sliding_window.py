"""Blockwise sliding-window attention against the dense masked attention it replaces, by length.

Shapes are those of hybrid-tiny's `swa` layers (batch 1, its heads, head_dim and window), float32.
For each sequence length and implementation:
  blockwise: ttt.models.sliding_window.sliding_window_attention (default block and chunk sizes);
  dense:     jax.nn.dot_product_attention with a local window (what sliding-window layers called
             before), which on CPU builds the full seq x seq score matrix.
and for the whole model (`model`: hybrid-tiny's forward on token ids, and the gradient of its loss
with respect to its parameters), it reports XLA's planned temporary bytes of the jitted forward and forward+backward (from
`compile().memory_analysis()`, so they are known even where the run would not fit), and, for
each of the two whose temporaries fit under --memory-limit-gib, its median time and its time per
token relative to the shortest length. The backward is the gradient of sum(output)
with respect to query, key and value. A configuration whose warm-up run takes over
--slow-seconds is timed once.

  python benchmarks/sliding_window.py                     # 2K .. 128K, prints a table, writes JSON
  python benchmarks/sliding_window.py --seqs 2048 8192 --repeats 3 --out /tmp/swa.json
  python benchmarks/sliding_window.py --implementations model --seqs 2048 32768 131072   # the whole model
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ttt import configs
from ttt.models import LM
from ttt.models.sliding_window import sliding_window_attention

from output import write_json

MODEL = "hybrid-tiny"


def dense_sliding_window(query, key, value, window):
    return jax.nn.dot_product_attention(query, key, value, is_causal=True, local_window_size=(window - 1, 0))


IMPLEMENTATIONS = {
    "blockwise": sliding_window_attention,
    "dense": dense_sliding_window,
    "model": None,  # the whole hybrid-tiny LM
}


def model_functions(seq):
    """hybrid-tiny's forward on [1, seq] ids and the gradient of its loss, with their arguments."""
    config = configs.get(MODEL, max_seq_len=seq)
    graphdef, params = nnx.split(LM(config, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(seq), (1, seq), 0, config.vocab_size)
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    backward = jax.jit(jax.value_and_grad(lambda params, ids: nnx.merge(graphdef, params).loss(ids)[0]))
    return forward, backward, (params, ids)


def attention_functions(name, seq, window, shapes):
    attention = IMPLEMENTATIONS[name]
    forward = jax.jit(lambda q, k, v: attention(q, k, v, window))
    backward = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attention(q, k, v, window)), argnums=(0, 1, 2)))
    keys = jax.random.split(jax.random.key(seq), 3)
    return forward, backward, tuple(jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes(seq)))


def prepare(name, seq, window, shapes, memory_limit):
    """A row with the temporaries of forward and forward+backward, and the jitted functions (with
    their inputs and warm-up seconds) of those that fit under `memory_limit`."""
    if name == "model":
        forward, backward, args = model_functions(seq)
    else:
        forward, backward, args = attention_functions(name, seq, window, shapes)
    row, runnable = {"seq": seq, "implementation": name}, {}
    for label, fn in (("forward", forward), ("forward_backward", backward)):
        row[f"{label}_temp_bytes"] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
        if row[f"{label}_temp_bytes"] <= memory_limit:
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))  # compile + warm-up
            runnable[label] = (fn, args, time.perf_counter() - start)
    return row, runnable


def time_round_robin(prepared, repeats, slow_seconds):
    """Adds median seconds (and all runs) to each row. Every round runs every function once, so a
    change in machine load affects all lengths alike; functions whose warm-up took over
    `slow_seconds` run in the first round only."""
    for round_index in range(repeats):
        for row, runnable in prepared:
            for label, (fn, args, warm_up) in runnable.items():
                if round_index and warm_up > slow_seconds:
                    continue
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                row.setdefault(f"{label}_all_s", []).append(time.perf_counter() - start)
    for row, _ in prepared:
        for label in ("forward", "forward_backward"):
            if f"{label}_all_s" in row:
                row[f"{label}_s"] = statistics.median(row[f"{label}_all_s"])


def print_table(rows, shortest):
    """Times (ms), temporaries (MiB) and time per token relative to the shortest length; '-' where not run."""
    base = {r["implementation"]: r for r in rows if r["seq"] == shortest}
    header = (f"{'seq':>7} {'impl':10} {'fwd ms':>10} {'f+b ms':>10} {'fwd MiB':>10} {'f+b MiB':>10} "
              f"{'fwd/token':>10} {'f+b/token':>10}   (per token: relative to seq {shortest})")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        first = base[r["implementation"]]
        cells = []
        for label in ("forward", "forward_backward"):
            cells.append(f"{r[label + '_s'] * 1e3:10.1f}" if label + "_s" in r else f"{'-':>10}")
        for label in ("forward", "forward_backward"):
            cells.append(f"{r[label + '_temp_bytes'] / 2**20:10.1f}")
        for label in ("forward", "forward_backward"):
            key = label + "_s"
            ratio = (r[key] / r["seq"]) / (first[key] / first["seq"]) if key in r and key in first else None
            cells.append(f"{ratio:10.2f}" if ratio is not None else f"{'-':>10}")
        print(f"{r['seq']:7d} {r['implementation']:10} " + " ".join(cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 131072])
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-limit-gib", type=float, default=9.0,
                        help="skip timing a function that plans more temporaries than this")
    parser.add_argument("--slow-seconds", type=float, default=10.0)
    parser.add_argument("--out", default="benchmarks/results/sliding_window.json")
    args = parser.parse_args(argv)
    config = configs.get(MODEL)
    heads, kv_heads, head_dim = config.num_heads, config.kv_heads, config.head_dim
    window = config.attention.sliding_window

    def shapes(seq):
        return (1, seq, heads, head_dim), (1, seq, kv_heads, head_dim), (1, seq, kv_heads, head_dim)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); {MODEL} attention: heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}, "
          f"window {window}; load average before: {os.getloadavg()[0]:.1f}")
    prepared = []
    for seq in sorted(args.seqs):
        for name in args.implementations:
            row, runnable = prepare(name, seq, window, shapes, args.memory_limit_gib * 2**30)
            prepared.append((row, runnable))
            print(f"  seq {seq:7d} {name:10s} temporaries {row['forward_temp_bytes'] / 2**20:.1f} / "
                  f"{row['forward_backward_temp_bytes'] / 2**20:.1f} MiB; runs: {', '.join(runnable) or 'none'}",
                  flush=True)
    time_round_robin(prepared, args.repeats, args.slow_seconds)
    rows = [row for row, _ in prepared]
    print_table(rows, min(args.seqs))
    result = {"rows": rows, "model": MODEL, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "window": window, "load_average_after": os.getloadavg(), "jax": jax.__version__,
              "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "args": vars(args)}
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
