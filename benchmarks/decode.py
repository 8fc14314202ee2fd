"""Per-token decode latency and cache bytes against context length, for tiny models on CPU.

For each model and context N (1K, 4K, 16K, 64K tokens) the cache is put in the state it has after
N tokens, then `steps` tokens are decoded by a jitted `lax.scan` of one-token `LM.extend` calls (the hot
loop of `ttt.models.generate`); latency per token is the median over `repeats` timed runs after
a warm-up (compilation) run.

Reaching context N without prefilling N tokens: the model prefills `prefix` real tokens (a
multiple of the mini-batch size and of the sliding window), and the cache is then advanced to N:
- TTT layers: unchanged. Their state (fast weights, gradient sum, position inside the mini-batch,
  conv window) has the same shapes after any number of tokens, and since N is a multiple of the
  mini-batch size its position inside the mini-batch is the one it has after N tokens.
- sliding-window layers: the ring buffer is already full; only the position counter becomes N
  (N is a multiple of the window, so the next token goes to the same slot as after N tokens).
- full attention (the baseline): the KV cache is preallocated for N plus the timed tokens
  (max_seq_len = N + steps * (repeats + 1)); slots prefix .. N-1 are filled with random
  keys/values and the position becomes N, so every decode step attends over N + t entries, as
  after N tokens.
The cost of a decode step depends on these shapes and positions, not on the values, so the
latencies are those of decoding at context N.

Usage: python benchmarks/decode.py [--out benchmarks/results/decode.json] [--steps 64] [--repeats 7]
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ttt import configs
from ttt.models import LM

MODELS = ("ttt-linear-tiny", "ttt-mlp-tiny", "hybrid-tiny", "transformer-tiny")
CONTEXTS = (1024, 4096, 16384, 65536)
PREFIX = 64


def advance_cache(config, cache, context: int, rng: jax.Array):
    """The cache after `PREFIX` real tokens, advanced to position `context` (see module docstring)."""
    (stage,) = config.model_stages
    blocks = []
    for mixer, block_state in zip(stage.pattern, cache["stages"][0]):
        state = block_state["mixer"]
        if mixer in ("attention", "swa"):
            state = dict(state, position=jnp.full_like(state["position"], context))
        if mixer == "attention":
            for name in ("key", "value"):
                rng, key = jax.random.split(rng)
                filled = state[name].at[:, :, PREFIX:context].set(
                    jax.random.normal(key, state[name][:, :, PREFIX:context].shape, state[name].dtype))
                state[name] = filled
        blocks.append(dict(block_state, mixer=state))
    return {"stages": [blocks]}


def prepare(name: str, context: int, steps: int, repeats: int):
    """(jitted decode of `steps` tokens, its parameters, the cache at `context`, the tokens to feed)."""
    config = configs.get(name)
    if "attention" in config.mixers:
        # The baseline KV cache is allocated for the context at hand plus the timed tokens.
        config = dataclasses.replace(config, max_seq_len=context + steps * (repeats + 1))
    for length in (config.ttt.mini_batch_size, config.attention.sliding_window or 1):
        if context % length or PREFIX % length:
            raise ValueError(f"context {context} and prefix {PREFIX} must be multiples of {length} for {name}")
    graphdef, params = nnx.split(LM(config, rngs=nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(1), (1, PREFIX), 0, config.vocab_size)
    _, cache = jax.jit(lambda params, ids: nnx.merge(graphdef, params).extend(ids))(params, prompt)
    cache = advance_cache(config, cache, context, jax.random.key(2))

    @functools.partial(jax.jit, donate_argnums=1)
    def decode(params, cache, tokens):
        @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def one_step(model, cache, token):
            logits, cache = model.extend(token[:, None], cache)
            return cache, logits[:, 0, 0]
        return one_step(nnx.merge(graphdef, params), cache, tokens)

    tokens = jax.random.randint(jax.random.key(3), (steps, 1), 0, config.vocab_size)
    return config, decode, params, cache, tokens


def measure(name: str, steps: int, repeats: int) -> list[dict]:
    """One row per context. Timed runs go round-robin over the contexts, so a change in machine
    load affects every context alike."""
    runs = {context: prepare(name, context, steps, repeats) for context in CONTEXTS}
    caches, timings = {}, {context: [] for context in CONTEXTS}
    for context, (_, decode, params, cache, tokens) in runs.items():
        caches[context], _ = jax.block_until_ready(decode(params, cache, tokens))  # compile + warm-up
    for _ in range(repeats):
        for context, (_, decode, params, _, tokens) in runs.items():
            start = time.perf_counter()
            caches[context], _ = jax.block_until_ready(decode(params, caches[context], tokens))
            timings[context].append((time.perf_counter() - start) / steps)
    return [{"model": name, "layer_pattern": runs[context][0].layer_pattern, "context": context,
             "ms_per_token": 1e3 * statistics.median(timings[context]),
             "ms_per_token_all": [1e3 * t for t in timings[context]],
             "cache_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(caches[context]))}
            for context in CONTEXTS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "decode.json"))
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs (median reported)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':18s} {'context':>8s} {'ms/token':>9s} {'cache MB':>9s}")
    for name in args.models:
        for row in measure(name, args.steps, args.repeats):
            rows.append(row)
            print(f"{name:18s} {row['context']:8d} {row['ms_per_token']:9.3f} {row['cache_bytes'] / 2**20:9.3f}", flush=True)
    summary = {}
    print(f"\n{'model':18s} {'64K/1K latency':>15s} {'64K/1K cache':>13s}")
    for name in args.models:
        first, last = (next(r for r in rows if r["model"] == name and r["context"] == c)
                       for c in (min(CONTEXTS), max(CONTEXTS)))
        summary[name] = {"latency_ratio": last["ms_per_token"] / first["ms_per_token"],
                         "cache_ratio": last["cache_bytes"] / first["cache_bytes"]}
        print(f"{name:18s} {summary[name]['latency_ratio']:15.2f} {summary[name]['cache_ratio']:13.2f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "steps": args.steps, "repeats": args.repeats,
                               "prefix": PREFIX, "backend": jax.default_backend(),
                               "machine": platform.processor() or platform.machine()}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
