"""Forward and forward+backward time of TTT-Linear / TTT-MLP against causal softmax attention.

Two levels, each at batch 1, hidden 768, 12 heads (head_dim 64), mini-batch 16, float32:
  op:    the sequence mixer alone: ttt.ops.ttt_linear / ttt_mlp (dual and primal) on q, k, v, eta
         vs jax.nn.dot_product_attention(is_causal=True) on q, k, v.
  layer: ttt.TTTLayer (mamba backbone: q/k, v, gate and output projections) vs an attention layer
         with the same four projections around dot_product_attention.
GFLOP/s use analytic FLOP counts (XLA's cost analysis counts a scan body once) and are printed
next to a plain 2048^3 float32 matmul measured in the same run. Times are medians of --repeats
runs after one compiling run. The mini-batch sweep times that matmul again beside each of its
rows, interleaved with the row's runs, and takes its shares of the best of the run's matmul rates:
on the shared 2-core VM the matmul alone measured 121-169 GFLOP/s within one process.

  python benchmarks/ttt_layer.py                      # seq 512..8192, prints a table, writes JSON
  python benchmarks/ttt_layer.py --seqs 512 1024 --repeats 3 --out /tmp/quick.json
  python benchmarks/ttt_layer.py --seqs 4096 --mini-batches 16 64 256 1024   # the mini-batch sweep

`--devices N` runs the mini-batch sweep with the heads split over N host devices (the CPU split with
`--xla_force_host_platform_device_count`): XLA:CPU runs one device's scan on one thread, so this is
how the sweep uses more than one core. The matmul rate it is compared with is still one plain matmul
on one device, which XLA already runs on every core.

It applies benchmarks/xla_cpu.py's setting (batch 1) unless `--no-xla-cpu-reduce-workaround`;
`--hugepage-malloc` runs it with glibc's malloc on huge pages (see there: at large b, page faults on
XLA:CPU's fresh temporaries are a large part of the time).
"""

import argparse
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import ttt
from ttt import ops
from ttt.configs import TTTLayerConfig
from output import write_json
from timing import interleaved_medians
from xla_cpu import add_cpu_arguments, apply_in_this_process, check_devices

HIDDEN, HEADS, MINI_BATCH = 768, 12, 16
HEAD_DIM = HIDDEN // HEADS
MATMUL_SIZE = 2048


def median_seconds(fn, *args, repeats):
    return interleaved_medians({"fn": (fn, args)}, repeats)["fn"]


def matmul_call():
    """(a plain MATMUL_SIZE^3 float32 matmul, its arguments, its FLOPs): the rate the TTT FLOPs are compared with."""
    a = jax.random.normal(jax.random.key(1), (MATMUL_SIZE, MATMUL_SIZE))
    return jax.jit(lambda a: a @ a), (a,), 2 * MATMUL_SIZE**3


def with_backward(fn, argnums):
    """fn -> a function computing fn's output and the gradient of sum(output) w.r.t. `argnums`."""
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums=argnums))


# -- FLOPs (multiply-add = 2), per forward pass -------------------------------------------

def inner_flops(inner, seq, mini_batch=MINI_BATCH):
    """The TTT dual form: per token and head, linear 6d^2 + 4bd, MLP 56d^2 + 20bd matmul FLOPs."""
    d, b = HEAD_DIM, mini_batch
    per_token = 6 * d * d + 4 * b * d if inner == "linear" else 56 * d * d + 20 * b * d
    return HEADS * seq * per_token


def attention_flops(seq):
    """Causal softmax attention: q.k^T and p.v over the lower triangle."""
    return 2 * HEADS * seq * seq * HEAD_DIM


def projection_flops(seq):
    """Four [hidden, hidden] projections."""
    return 4 * 2 * seq * HIDDEN * HIDDEN


# -- the measured functions -----------------------------------------------------------------

def op_inputs(seq, inner):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(keys[i], (1, HEADS, seq, HEAD_DIM)) for i in range(3))
    eta = jnp.full((1, HEADS, seq), 1.0 / HEAD_DIM)
    model = ttt.inner_models.LINEAR if inner == "linear" else ttt.inner_models.MLP
    params = jax.vmap(lambda key: model.init(key, HEAD_DIM))(jax.random.split(keys[3], HEADS))
    params = jax.tree.map(lambda p: p[None], params)
    return q, k, v, eta, params, jnp.ones((HEADS, HEAD_DIM)), jnp.zeros((HEADS, HEAD_DIM))


def split_heads(inputs, devices):
    """`op_inputs` with the heads split over the first `devices` devices (unchanged for one)."""
    if devices == 1:
        return inputs
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("heads",))
    over = lambda axis: lambda x: jax.device_put(
        x, NamedSharding(mesh, PartitionSpec(*[("heads" if i == axis else None) for i in range(x.ndim)])))
    *token_inputs, ln_weight, ln_bias = inputs  # q, k, v, eta, params: [batch, heads, ...]; LN: [heads, d]
    return (*jax.tree.map(over(1), tuple(token_inputs)), over(0)(ln_weight), over(0)(ln_bias))


def ttt_op(inner, form, mini_batch=MINI_BATCH):
    fn = ops.ttt_linear if inner == "linear" else ops.ttt_mlp
    return lambda *a: fn(*a, mini_batch_size=mini_batch, form=form)[0]


def attention_op(q, k, v):
    """[batch, heads, seq, head_dim] inputs, like the TTT ops."""
    swap = lambda a: jnp.swapaxes(a, 1, 2)
    return jax.nn.dot_product_attention(swap(q), swap(k), swap(v), is_causal=True)


class AttentionLayer(nnx.Module):
    """q, k, v and output projections around causal dot_product_attention (the baseline)."""

    def __init__(self, rngs):
        dense = functools.partial(nnx.LinearGeneral, use_bias=False, rngs=rngs)
        self.qkv = dense(HIDDEN, (3, HEADS, HEAD_DIM))
        self.out = dense((HEADS, HEAD_DIM), HIDDEN, axis=(-2, -1))

    def __call__(self, x):
        q, k, v = jnp.moveaxis(self.qkv(x), 2, 0)
        return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))


def layer_fns(layer):
    graphdef, params = nnx.split(layer)
    forward = lambda p, x: nnx.merge(graphdef, p)(x)
    return params, jax.jit(forward), with_backward(forward, (0, 1))


def run(seqs, repeats, primal_max_seq):
    rows = []
    matmul, matmul_args, matmul_flops = matmul_call()
    matmul_gflops = matmul_flops / median_seconds(matmul, *matmul_args, repeats=repeats) / 1e9
    print(f"plain {MATMUL_SIZE}^3 float32 matmul: {matmul_gflops:.1f} GFLOP/s")

    for seq in seqs:
        x = jax.random.normal(jax.random.key(2), (1, seq, HIDDEN))
        attn_in = op_inputs(seq, "linear")[:3]
        timings = {
            ("op", "attention"): (attention_op, attn_in, (0, 1, 2), attention_flops(seq)),
        }
        for inner in ("linear", "mlp"):
            inputs = op_inputs(seq, inner)
            for form in ("dual", "primal"):
                if form == "primal" and seq > primal_max_seq:
                    continue
                timings[("op", f"ttt_{inner}_{form}")] = (ttt_op(inner, form), inputs, (0, 1, 2, 3, 4), inner_flops(inner, seq))
        for name, layer in [("attention", AttentionLayer(nnx.Rngs(0)))] + [
            (f"ttt_{inner}", ttt.TTTLayer(TTTLayerConfig(HIDDEN, HEADS, inner=inner, mini_batch_size=MINI_BATCH), rngs=nnx.Rngs(0)))
            for inner in ("linear", "mlp")
        ]:
            params, forward, backward = layer_fns(layer)
            mixer = attention_flops(seq) if name == "attention" else inner_flops(name[4:], seq)
            timings[("layer", name)] = ((forward, backward), (params, x), None, projection_flops(seq) + mixer)

        for (level, name), (fn, args, argnums, flops) in timings.items():
            forward, backward = fn if argnums is None else (jax.jit(fn), with_backward(fn, argnums))
            fwd = median_seconds(forward, *args, repeats=repeats)
            bwd = median_seconds(backward, *args, repeats=repeats)
            rows.append({"seq": seq, "level": level, "name": name, "forward_s": fwd, "forward_backward_s": bwd,
                         "forward_gflops": flops / fwd / 1e9})
            print(f"  seq {seq:5d} {level:5s} {name:18s} fwd {fwd * 1e3:9.2f} ms  fwd+bwd {bwd * 1e3:9.2f} ms  "
                  f"{flops / fwd / 1e9:7.1f} GFLOP/s", flush=True)
    return {"matmul_gflops": matmul_gflops, "rows": rows}


def run_mini_batches(seq, mini_batches, repeats, matmul_gflops, devices=1):
    """The dual form at each mini-batch size b: forward and forward+backward as a share of the run's best
    matmul rate, with the heads split over `devices` devices.

    The plain matmul is timed again beside each row (interleaved with it) and the shares are taken of
    the best rate among those and `matmul_gflops` (the run's first): a slower matmul beside a row means
    the machine or its allocator was disturbed (without huge pages, the matmul timed after the large-b
    rows measured 105-141 GFLOP/s against 158 alone), not that matmuls got slower.
    Forward+backward is counted as 3x the forward's FLOPs (each matmul once forward, twice backward;
    the rematerialising forward of the backward pass is not counted).
    """
    rows = []
    matmul, matmul_args, matmul_flops = matmul_call()
    for inner in ("linear", "mlp"):
        inputs = split_heads(op_inputs(seq, inner), devices)
        for b in mini_batches:
            seconds = interleaved_medians({
                "forward": (jax.jit(ttt_op(inner, "dual", b)), inputs),
                "forward_backward": (with_backward(ttt_op(inner, "dual", b), (0, 1, 2, 3, 4)), inputs),
                "matmul": (matmul, matmul_args),
            }, repeats)
            row = {"seq": seq, "name": f"ttt_{inner}_dual", "mini_batch": b, "devices": devices,
                   "forward_flops": inner_flops(inner, seq, b), "forward_s": seconds["forward"],
                   "forward_backward_s": seconds["forward_backward"],
                   "matmul_gflops_beside": matmul_flops / seconds["matmul"] / 1e9}
            rows.append(row)
            print(f"  seq {seq} {inner:6s} b {b:5d}  fwd {row['forward_s'] * 1e3:8.2f} ms  "
                  f"fwd+bwd {row['forward_backward_s'] * 1e3:8.2f} ms  "
                  f"matmul beside it {row['matmul_gflops_beside']:6.1f} GFLOP/s", flush=True)
    best = max([matmul_gflops] + [row["matmul_gflops_beside"] for row in rows])
    print(f"share of the run's best matmul rate, {best:.1f} GFLOP/s (fwd+bwd counted as 3x the forward's FLOPs):")
    for row in rows:
        flops = row["forward_flops"]
        row.update(matmul_gflops=best, forward_matmul_share=flops / row["forward_s"] / 1e9 / best,
                   forward_backward_matmul_share=3 * flops / row["forward_backward_s"] / 1e9 / best)
        print(f"  {row['name']:16s} b {row['mini_batch']:5d}  fwd {100 * row['forward_matmul_share']:5.1f}%  "
              f"fwd+bwd {100 * row['forward_backward_matmul_share']:5.1f}%")
    return rows


def print_table(result):
    rows, peak = result["rows"], result["matmul_gflops"]
    by = {(r["seq"], r["level"], r["name"]): r for r in rows}
    print(f"\nratios (attention time / TTT time; > 1: TTT faster); matmul rate {peak:.1f} GFLOP/s")
    header = f"{'seq':>6} {'level':6} {'mixer':18} {'fwd ms':>9} {'fwd+bwd ms':>11} {'attn/ttt fwd':>13} {'attn/ttt f+b':>13} {'% matmul':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = by[(r["seq"], r["level"], "attention")]
        print(f"{r['seq']:6d} {r['level']:6} {r['name']:18} {r['forward_s'] * 1e3:9.2f} {r['forward_backward_s'] * 1e3:11.2f} "
              f"{base['forward_s'] / r['forward_s']:13.2f} {base['forward_backward_s'] / r['forward_backward_s']:13.2f} "
              f"{100 * r['forward_gflops'] / peak:8.1f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--primal-max-seq", type=int, default=1024, help="skip the (slow) primal form above this length")
    parser.add_argument("--mini-batches", type=int, nargs="*", default=[16, 64, 256, 1024],
                        help="mini-batch sizes b of the dual-form sweep (at the longest --seqs); none to skip it")
    add_cpu_arguments(parser, "the mini-batch sweep splits the heads over them")
    parser.add_argument("--out", default="benchmarks/results/ttt_layer.json")
    args = parser.parse_args(argv)
    check_devices(parser, args.devices, HEADS)
    apply_in_this_process(args, __file__, sys.argv[1:] if argv is None else argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)")
    result = run(args.seqs, args.repeats, args.primal_max_seq)
    print_table(result)
    if args.mini_batches:
        print(f"\ndual form by mini-batch size, seq {max(args.seqs)}, heads over {args.devices} device(s)")
        result["mini_batch_rows"] = run_mini_batches(max(args.seqs), args.mini_batches, args.repeats,
                                                     result["matmul_gflops"], args.devices)
    result.update(jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(), args=vars(args),
                  glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
    write_json(result, args.out)


if __name__ == "__main__":
    main()
