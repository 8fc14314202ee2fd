"""TTT-E2E against its baselines of the same shapes (sliding window only, full attention), tiny models on CPU.

- prefill: one forward (`model(ids)`, batch 1) at each context length; E2E reads the suffix chunk
  by chunk and takes an inner step after each chunk, so its time should grow linearly like SWA's,
  while full attention grows quadratically (skipped above `--full-attention-max`).
- training step: value and gradient of `model.loss` (E2E: through the inner steps, second order) at
  `--train-seq` tokens, batch `--train-batch`; the paper reports E2E 3.4x slower than full attention
  to train at 8K on H100.
- decode: milliseconds per token of `--decode-steps` one-token `extend` calls (a jitted scan, the
  loop of `generate`) after a prefill of each context length, E2E and SWA-only; E2E re-reads its
  pending chunk per token and steps once per chunk, so the time should stay flat in the context.
Times are medians of `--repeats` runs after a compiling warm-up.

Usage: python benchmarks/e2e.py [--contexts 1024 4096 ...] [--out benchmarks/results/e2e.json]
"""

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import time

import jax
from flax import nnx

from ttt import configs
from ttt.models import LM

MODELS = ("e2e-tiny", "e2e-swa-tiny", "e2e-fa-tiny")


def median_seconds(run, repeats: int) -> float:
    jax.block_until_ready(run())  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(name: str, max_seq_len: int):
    config = dataclasses.replace(configs.get(name), max_seq_len=max_seq_len)
    return config, nnx.split(LM(config, rngs=nnx.Rngs(0)))


def prefill_seconds(name: str, context: int, repeats: int) -> float:
    config, (graphdef, params) = build(name, context)
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    ids = jax.random.randint(jax.random.key(0), (1, context), 0, config.vocab_size)
    return median_seconds(lambda: forward(params, ids), repeats)


def train_step_seconds(name: str, seq: int, batch: int, repeats: int) -> float:
    config, (graphdef, params) = build(name, seq + 1)
    step = jax.jit(jax.value_and_grad(lambda params, ids: nnx.merge(graphdef, params).loss(ids)[0]))
    ids = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, config.vocab_size)
    return median_seconds(lambda: step(params, ids), repeats)


def decode_ms_per_token(name: str, context: int, steps: int, repeats: int) -> float:
    config, (graphdef, params) = build(name, context + steps * (repeats + 1))
    prompt = jax.random.randint(jax.random.key(0), (1, context), 0, config.vocab_size)
    _, cache = jax.jit(lambda params, ids: nnx.merge(graphdef, params).extend(ids))(params, prompt)
    tokens = jax.random.randint(jax.random.key(1), (steps, 1), 0, config.vocab_size)

    @jax.jit
    def decode(params, cache):
        @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def one_token(model, cache, token):
            logits, cache = model.extend(token[:, None], cache)
            return cache, logits[:, 0, 0]
        return one_token(nnx.merge(graphdef, params), cache, tokens)

    return 1e3 * median_seconds(lambda: decode(params, cache), repeats) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--full-attention-max", type=int, default=8192, help="longest full-attention prefill")
    parser.add_argument("--train-seq", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "e2e.json"))
    args = parser.parse_args(argv)

    prefill = []
    print(f"{'prefill':14s} " + " ".join(f"{context:>9d}" for context in args.contexts) + "  (seconds, batch 1)")
    for name in MODELS:
        cells = []
        for context in args.contexts:
            skip = name == "e2e-fa-tiny" and context > args.full_attention_max
            seconds = None if skip else prefill_seconds(name, context, args.repeats)
            prefill.append({"model": name, "context": context, "seconds": seconds})
            cells.append(f"{'-':>9s}" if seconds is None else f"{seconds:9.3f}")
        print(f"{name:14s} " + " ".join(cells), flush=True)

    decode = []
    print(f"\n{'decode':14s} " + " ".join(f"{context:>9d}" for context in args.contexts) + "  (ms per token, batch 1)")
    for name in ("e2e-tiny", "e2e-swa-tiny"):
        cells = []
        for context in args.contexts:
            milliseconds = decode_ms_per_token(name, context, args.decode_steps, args.repeats)
            decode.append({"model": name, "context": context, "ms_per_token": milliseconds})
            cells.append(f"{milliseconds:9.2f}")
        print(f"{name:14s} " + " ".join(cells), flush=True)

    training = {name: train_step_seconds(name, args.train_seq, args.train_batch, args.repeats) for name in MODELS}
    print(f"\ntraining step (value and gradient), {args.train_batch} x {args.train_seq} tokens:")
    for name, seconds in training.items():
        print(f"{name:14s} {seconds:8.3f} s  ({seconds / training['e2e-fa-tiny']:.2f}x full attention)")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "devices": [str(d) for d in jax.devices()]},
        "prefill": prefill,
        "decode": decode,
        "training_step": {"seq": args.train_seq, "batch": args.train_batch,
                          "seconds": training,
                          "e2e_over_full_attention": training["e2e-tiny"] / training["e2e-fa-tiny"]},
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
