"""`ttt.TTTLayer` against the paper's own layer (test-time-training/ttt-lm-jax), side by side in one process.

Both layers at the shapes of the paper's 125M models: hidden 768, 12 heads, mini-batch 16, remat group
4, Mamba backbone, float32, batch 1. Forward, and forward+backward (the gradient of sum(output) with
respect to the parameters and the input). Medians of --repeats runs; the two implementations
alternate inside every repetition, so the machine's load hits both alike, and the ratio of the
medians is the number to read.

The reference layer is loaded from its file, unmodified, with two harness-side shims (as in
benchmarks/reference_check.py): its `ttt.infra.jax_utils` (which imports torch and wandb) is replaced
by the two helpers the layer uses, and `jnp.clip` accepts the `a_min`/`a_max` keywords jax 0.10 removed.
It needs only jax and flax, so it runs in this project's environment.

Beside each forward it times the matrix products of our layer's forward alone (benchmarks/matmul_floor.py).
reference / products-alone, printed as `bound`, is the largest forward speed-up over the reference that
an implementation running these products, at the speed this machine's XLA runs them, could reach (one
device only: that program is not sharded).

`--xla-cpu-reduce-workaround` (default on) applies benchmarks/xla_cpu.py's setting, to both layers alike.

`--devices N` splits the CPU into N host devices and runs both layers on a mesh that shards the heads
N ways (tensor parallelism): this project's layer through its logical axis rules (ttt/train/mesh.py,
heads -> tensor), the reference through its own sharding constraints (q, k, v split over its `mp`
axis, here the mesh's `tensor`). XLA:CPU runs the ops of one device's scan one after another, so on a
multi-core CPU this is how a TTT layer's mini-batch scan uses more than one core.

  python benchmarks/reference_speed.py --reference-repo /path/ttt-lm-jax --seqs 2048 4096 8192
  python benchmarks/reference_speed.py --reference-repo /path/ttt-lm-jax --devices 2
"""

import argparse
import contextlib
import importlib.util
import os
import platform
import sys
import types

from matmul_floor import layer_products
from output import write_json
from timing import interleaved_medians
from xla_cpu import add_cpu_arguments, apply_in_this_process, check_devices

HIDDEN, HEADS, MINI_BATCH, REMAT_GROUP = 768, 12, 16, 4
BASE_LR = {"linear": 1.0, "mlp": 0.1}


def load_reference_layer(repo: str):
    """The reference's `ttt/models/ttt_layer.py` as a module, beside this project's `ttt` package."""
    import jax
    import jax.numpy as jnp

    # The reference layer imports only `ttt.infra.jax_utils` from its own package (also named `ttt`).
    utils = types.ModuleType("ttt.infra.jax_utils")
    utils.with_sharding_constraint = _reference_sharding_constraint
    utils.get_gradient_checkpoint_policy = lambda name: getattr(jax.checkpoint_policies, name)
    sys.modules.setdefault("ttt.infra", types.ModuleType("ttt.infra"))
    sys.modules["ttt.infra.jax_utils"] = utils
    clip = jnp.clip
    jnp.clip = lambda a, min=None, max=None, *, a_min=None, a_max=None: clip(
        a, min if a_min is None else a_min, max if a_max is None else a_max)
    spec = importlib.util.spec_from_file_location("reference_ttt_layer", os.path.join(repo, "ttt/models/ttt_layer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The reference's mesh axes, named as this project's mesh (ttt/train/mesh.py) names them.
_REFERENCE_AXES = {"dp": "data", "fsdp": "fsdp", "mp": "tensor"}


def _reference_sharding_constraint(x, partition_spec):
    """The reference's `with_sharding_constraint` on the active mesh; the identity without one."""
    import jax
    from jax.sharding import PartitionSpec

    if jax.sharding.get_abstract_mesh().empty:
        return x
    rename = lambda entry: (tuple(_REFERENCE_AXES[a] for a in entry) if isinstance(entry, tuple)
                            else entry if entry is None else _REFERENCE_AXES[entry])
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*map(rename, partition_spec)))


def reference_functions(reference, inner: str, seq: int):
    import jax
    import jax.numpy as jnp

    config = types.SimpleNamespace(
        hidden_size=HIDDEN, num_attention_heads=HEADS, mini_batch_size=MINI_BATCH, max_sequence_length=seq,
        rope_theta=10000.0, initializer_range=0.02, ttt_base_lr=BASE_LR[inner],
        remat_mini_batch_group_size=REMAT_GROUP, remat_conv="", conv_width=4, output_ttt_stats=False)
    layer = (reference.TTTLinear if inner == "linear" else reference.TTTMLP)(config=config)
    x = jax.random.normal(jax.random.key(0), (1, seq, HIDDEN), jnp.float32)
    positions = jnp.arange(seq)[None]
    # Jitted, one program: run eagerly on 2 host devices, the initialising forward's ops (dispatched one by
    # one, asynchronously) ended the process twice, a collective's rendezvous in XLA:CPU waiting past its
    # 40 s limit for the other device.
    params = jax.jit(layer.init)(jax.random.key(1), x, None, positions)
    apply = lambda p, x: layer.apply(p, x, None, positions)[0]
    return _forward_and_backward(apply), (params, x)


def project_functions(inner: str, seq: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import ttt
    from ttt.configs import TTTLayerConfig

    config = TTTLayerConfig(hidden_size=HIDDEN, num_heads=HEADS, inner=inner, mini_batch_size=MINI_BATCH,
                            backbone="mamba", base_lr=BASE_LR[inner], remat_group_size=REMAT_GROUP)
    graphdef, params = nnx.split(ttt.TTTLayer(config, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (1, seq, HIDDEN), jnp.float32)
    return _forward_and_backward(lambda p, x: nnx.merge(graphdef, p)(x)), (params, x)


def _forward_and_backward(apply):
    import jax
    import jax.numpy as jnp

    loss = lambda p, x: jnp.sum(apply(p, x))
    return {"forward": jax.jit(apply), "forward+backward": jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", required=True, help="a checkout of test-time-training/ttt-lm-jax")
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--inner", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--repeats", type=int, default=5)
    add_cpu_arguments(parser, "both layers shard their heads over them")
    parser.add_argument("--out", default="benchmarks/results/reference_speed.json")
    args = parser.parse_args(argv)
    for seq in args.seqs:
        if seq % (MINI_BATCH * REMAT_GROUP):
            parser.error(f"--seqs {seq}: the reference layer needs multiples of {MINI_BATCH * REMAT_GROUP}")
    if not os.path.isfile(os.path.join(args.reference_repo, "ttt/models/ttt_layer.py")):
        parser.error(f"--reference-repo {args.reference_repo} has no ttt/models/ttt_layer.py")
    check_devices(parser, args.devices, HEADS)
    apply_in_this_process(args, __file__, sys.argv[1:] if argv is None else argv)
    import jax

    from ttt.configs.train import MeshConfig
    from ttt.train import mesh as mesh_lib

    reference = load_reference_layer(args.reference_repo)
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, tensor=args.devices), devices=jax.devices()[:args.devices])
    # One device runs without a mesh, exactly as before --devices existed.
    on_mesh = (lambda: mesh_lib.activate(mesh)) if args.devices > 1 else contextlib.nullcontext
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"{args.devices} device(s), heads split {args.devices} ways")
    print(f"{'seq':>6} {'inner':6} {'pass':17} {'reference ms':>13} {'ttt ms':>9} {'speed-up':>9} "
          f"{'products ms':>12} {'bound':>6}")
    rows = []
    for seq in args.seqs:
        for inner in args.inner:
            with on_mesh():  # parameters are created sharded, and both layers traced with its constraints
                ours, our_args = project_functions(inner, seq)
                theirs, their_args = reference_functions(reference, inner, seq)
                if args.devices > 1:  # the input, and the reference's parameters, whole on every device
                    their_args = jax.device_put(their_args, mesh_lib.replicated(mesh))
                    our_args = (our_args[0], jax.device_put(our_args[1], mesh_lib.replicated(mesh)))
                for mode in ours:
                    calls = {"reference": (theirs[mode], their_args), "ttt": (ours[mode], our_args)}
                    if mode == "forward" and args.devices == 1:
                        calls["products"] = layer_products(inner, seq, HIDDEN, HEADS, MINI_BATCH, REMAT_GROUP)
                    medians = interleaved_medians(calls, args.repeats)
                    row = dict(seq=seq, inner=inner, mode=mode, devices=args.devices, reference_s=medians["reference"],
                               ttt_s=medians["ttt"], speedup=medians["reference"] / medians["ttt"])
                    if "products" in medians:
                        row.update(products_s=medians["products"], bound=medians["reference"] / medians["products"])
                    rows.append(row)
                    products = f"{row['products_s'] * 1e3:12.1f} {row['bound']:5.2f}x" if "bound" in row else ""
                    print(f"{seq:6d} {inner:6} {mode:17} {row['reference_s'] * 1e3:13.1f} {row['ttt_s'] * 1e3:9.1f} "
                          f"{row['speedup']:8.2f}x {products}", flush=True)
    print(f"smallest speed-up: {min(r['speedup'] for r in rows):.2f}x")
    result = dict(rows=rows, jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                  load_average_end=os.getloadavg(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""), args=vars(args))
    write_json(result, args.out)


if __name__ == "__main__":
    main()
