"""Proof that converted ttt-lm-jax checkpoints compute what the paper's own code computes.

Two halves, run by two Python environments:

- the reference side (`reference` command) runs inside an environment that can import the
  reference repository (test-time-training/ttt-lm-jax: its jax/flax linen model code, with
  transformers, ml_collections, mlxu). For every model kind it builds the reference's full
  `CausalLM` at a tiny size with random weights, saves them with the reference's own
  `StreamingCheckpointer` (the msgpack stream its train script writes), reloads them with the
  same class, and writes the logits of fixed token ids. It imports nothing of this project.
- the project side (`compare`, and the default `run` that drives both) converts every
  checkpoint with `ttt.train.convert`, loads it into `ttt.models.LM` and reports the largest
  relative logit difference (max |a - b| / max |b|).

The reference is run unmodified except for harness-side shims, installed before its modules are
imported: `ttt.infra.jax_utils` is replaced by the four helpers its model and checkpoint code use
(the real module imports torch, wandb and PIL for training utilities), and `jnp.clip` accepts the
`a_min`/`a_max` keywords that jax 0.10 removed.

A reference environment that works (checked with jax 0.10.2 and flax 0.12.8, no torch):
  python -m venv REF_VENV && REF_VENV/bin/pip install jax flax ml_collections mlxu msgpack einops \
      "transformers>=4.41,<4.50"      (transformers 5 dropped the Flax classes model.py imports)

Usage:
  python benchmarks/reference_check.py run --reference-python /path/venv/bin/python \
      --reference-repo /path/ttt-lm-jax [--out benchmarks/results/reference_check.json]
  python benchmarks/reference_check.py reference --reference-repo DIR --workdir DIR   (reference env)
  python benchmarks/reference_check.py compare --workdir DIR                          (this project)
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import types

import numpy as np

# The tiny size every kind is built at. seq_len must equal the reference's max_sequence_length
# (its TTT layer reshapes by it) and be a multiple of mini_batch_size * remat_mini_batch_group_size.
TINY = dict(vocab_size=256, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
            max_sequence_length=64, mini_batch_size=8, remat_mini_batch_group_size=2)
BATCH = 2
# kind -> (reference preset, its overrides). The `-TTT` presets carry pre_conv=True; the reference
# ships scripts only for the Mamba-backbone blocks and the Transformer baseline, and a TTT block
# needs the TTT fields (mini_batch_size, ...) that only the `-TTT` presets hold, so the
# Transformer-backbone blocks are checked both on that preset and with pre_conv switched off.
KINDS = {
    "transformer": ("125m", {}),
    "ttt-linear": ("125m-TTT", dict(seq_modeling_block="ttt_linear", ttt_base_lr=1.0)),
    "ttt-mlp": ("125m-TTT", dict(seq_modeling_block="ttt_mlp", ttt_base_lr=0.1)),
    "ttt-linear-transformer-backbone": ("125m-TTT", dict(seq_modeling_block="ttt_linear_base", ttt_base_lr=1.0)),
    "ttt-mlp-transformer-backbone": ("125m-TTT", dict(seq_modeling_block="ttt_mlp_base", ttt_base_lr=0.1)),
    "ttt-linear-transformer-backbone-no-pre-conv": (
        "125m-TTT", dict(seq_modeling_block="ttt_linear_base", ttt_base_lr=1.0, pre_conv=False)),
    "ttt-mlp-transformer-backbone-no-pre-conv": (
        "125m-TTT", dict(seq_modeling_block="ttt_mlp_base", ttt_base_lr=0.1, pre_conv=False)),
}
CHECKPOINT = "streaming_params"
IDS = "ids.npy"
LOGITS = "logits.npy"
REFERENCE_CONFIG = "reference_config.json"
TOLERANCE = 1e-4


# -- reference side (reference environment; no import of this project) --------------------------

def _install_shims(repo: pathlib.Path) -> None:
    """Make the reference's model and checkpoint modules importable under jax 0.10 without torch."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(repo))
    import ttt as reference_package  # the reference's package is also called `ttt`

    if pathlib.Path(reference_package.__file__).resolve().parent != (repo / "ttt").resolve():
        raise RuntimeError(f"`import ttt` found {reference_package.__file__}, not the reference in {repo}; run the "
                           "reference side with the reference environment's python")

    utils = types.ModuleType("ttt.infra.jax_utils")
    # The original applies a constraint only when the active mesh has the named axes; none is active here.
    utils.with_sharding_constraint = lambda x, partition_specs: x
    utils.get_gradient_checkpoint_policy = lambda name: getattr(jax.checkpoint_policies, name)
    utils.get_jax_mesh = lambda axis_dims, names: None
    utils.tree_apply = lambda fns, tree: jax.tree.map(lambda fn, x: fn(x), fns, tree)
    dtypes = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp16": jnp.float16, "float16": jnp.float16,
              "fp32": jnp.float32, "float32": jnp.float32}

    def float_tensor_to_dtype(tensor, dtype):
        if not dtype:
            return tensor
        if getattr(tensor, "dtype", None) in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64):
            return tensor.astype(dtypes[dtype] if isinstance(dtype, str) else dtype)
        return tensor

    utils.float_tensor_to_dtype = float_tensor_to_dtype
    sys.modules["ttt.infra.jax_utils"] = utils

    clip = jnp.clip

    def clip_with_old_keywords(a, min=None, max=None, *, a_min=None, a_max=None):
        return clip(a, min if a_min is None else a_min, max if a_max is None else a_max)

    jnp.clip = clip_with_old_keywords


def _randomise(params, key):
    """Perturb every parameter the reference initialises to a constant (norm scales 1, biases 0,
    the token-scale offset 0), so a parameter mapped to the wrong place cannot go unnoticed."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) if float(jnp.std(leaf)) == 0.0 else leaf
              for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def reference_side(repo: pathlib.Path, workdir: pathlib.Path, kinds: list[str], float_dtype: str, seed: int) -> None:
    """Write, per kind, `workdir/<kind>/{streaming_params, reference_config.json, ids.npy, logits.npy}`."""
    _install_shims(repo)
    import jax
    import jax.numpy as jnp
    from ttt.infra.checkpoint import StreamingCheckpointer
    from ttt.models.model import CONFIGS, CausalLM, ModelConfig

    for index, kind in enumerate(kinds):
        preset, overrides = KINDS[kind]
        config_dict = {**CONFIGS[preset], **TINY, **overrides}
        config = ModelConfig.from_dict(config_dict)
        ids = np.asarray(jax.random.randint(jax.random.PRNGKey(seed + 1000), (BATCH, TINY["max_sequence_length"]),
                                            0, TINY["vocab_size"]), np.int32)
        model = CausalLM(config, dtype=jnp.float32)
        init_key, noise_key = jax.random.split(jax.random.PRNGKey(seed + index))
        params = _randomise(model.init(init_key, jnp.asarray(ids))["params"], noise_key)

        directory = workdir / kind
        checkpointer = StreamingCheckpointer(StreamingCheckpointer.get_default_config(
            dict(float_dtype=float_dtype, save_optimizer_state=False)), str(directory))
        checkpointer.save_checkpoint(params, CHECKPOINT)
        # Logits of the weights as stored (after the checkpoint's float dtype), read back by the reference itself.
        stored = StreamingCheckpointer.load_checkpoint(str(directory / CHECKPOINT))
        stored = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stored)
        logits = model.apply({"params": stored}, jnp.asarray(ids)).logits
        np.save(directory / IDS, ids)
        np.save(directory / LOGITS, np.asarray(logits, np.float32))
        (directory / REFERENCE_CONFIG).write_text(json.dumps(config_dict, indent=2))
        print(f"{kind}: reference logits {logits.shape}, checkpoint {directory / CHECKPOINT}")


# -- project side -----------------------------------------------------------------------------

def compare_kind(directory: pathlib.Path, rope_pairing: str) -> dict:
    """Convert one kind's checkpoint, run this project's LM on its ids, compare with the reference logits."""
    import jax.numpy as jnp
    from flax import nnx

    from ttt.models import LM
    from ttt.train import convert

    reference = json.loads((directory / REFERENCE_CONFIG).read_text())
    config = convert.model_config(reference, rope_pairing)
    converted, report = convert.convert_params(convert.read_checkpoint(str(directory / CHECKPOINT)), reference,
                                               rope_pairing)
    model = LM(config, rngs=nnx.Rngs(0))
    convert.load_into(model, converted)
    ids, expected = np.load(directory / IDS), np.load(directory / LOGITS)
    logits = np.asarray(model(jnp.asarray(ids)), np.float32)
    difference = float(np.max(np.abs(logits - expected)) / np.max(np.abs(expected)))
    return dict(max_relative_difference=difference, parameters=len(report), logits_shape=list(expected.shape),
                passed=difference < TOLERANCE)


def compare(workdir: pathlib.Path, kinds: list[str], rope_pairing: str) -> dict:
    """Compare every kind found in `workdir`; prints a table and returns {kind: result}."""
    results = {}
    print(f"{'kind':48s} {'max rel. diff':>14s}  params  ok")
    for kind in kinds:
        try:
            result = compare_kind(workdir / kind, rope_pairing)
        except (ValueError, TypeError) as error:
            result = dict(error=str(error), passed=False)
        results[kind] = result
        if "error" in result:
            print(f"{kind:48s} {'-':>14s}  {'-':>6s}  no: {result['error'][:100]}")
        else:
            print(f"{kind:48s} {result['max_relative_difference']:14.2e}  {result['parameters']:6d}  "
                  f"{'yes' if result['passed'] else 'NO'}")
    return results


def run_reference(reference_python: str, repo: pathlib.Path, workdir: pathlib.Path, kinds: list[str],
                  float_dtype: str, seed: int) -> None:
    """The reference side in a subprocess of `reference_python` (the reference environment)."""
    command = [reference_python, __file__, "reference", "--reference-repo", str(repo), "--workdir", str(workdir),
               "--float-dtype", float_dtype, "--seed", str(seed), "--kinds", *kinds]
    # The reference environment must not see this project's package (both are called `ttt`).
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run(command, check=True, env=environment)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "reference", "compare"))
    parser.add_argument("--reference-repo", type=pathlib.Path, default=os.environ.get("TTT_REFERENCE_REPO"))
    parser.add_argument("--reference-python", default=os.environ.get("TTT_REFERENCE_PYTHON"))
    parser.add_argument("--workdir", type=pathlib.Path,
                        help="where checkpoints, ids and logits go (default for run: a temporary folder)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--float-dtype", default="fp32", choices=("fp32", "bf16"),
                        help="dtype the checkpoint is saved in (the reference's train script defaults to bf16)")
    parser.add_argument("--rope-pairing", default="half", choices=("half", "interleaved"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.command in ("run", "reference") and args.reference_repo is None:
        parser.error("--reference-repo (or TTT_REFERENCE_REPO) is required")
    if args.command == "run" and args.reference_python is None:
        parser.error("--reference-python (or TTT_REFERENCE_PYTHON) is required")
    if args.command != "run" and args.workdir is None:
        parser.error(f"--workdir is required for {args.command}")

    if args.command == "reference":
        reference_side(args.reference_repo, args.workdir, args.kinds, args.float_dtype, args.seed)
        return None
    if args.command == "compare":
        results = compare(args.workdir, args.kinds, args.rope_pairing)
    else:
        with tempfile.TemporaryDirectory() as temporary:
            workdir = args.workdir or pathlib.Path(temporary)
            run_reference(args.reference_python, args.reference_repo, workdir, args.kinds, args.float_dtype,
                          args.seed)
            results = compare(workdir, args.kinds, args.rope_pairing)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(tolerance=TOLERANCE, float_dtype=args.float_dtype,
                                            rope_pairing=args.rope_pairing, results=results), indent=2))
    return results


if __name__ == "__main__":
    main()
