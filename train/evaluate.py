"""Evaluation on held-out documents: loss and bits/byte overall, by token position, by context length.

Every held-out document contributes its first `max_length` tokens (`pipeline.evaluation_rows`), so
position p always means "p tokens into a document". By position: the loss of predicting the token
at position p, averaged over log2 bins (1, 2-3, 4-7, ...). By context length L: the same tokens cut
into windows of L, each read from an empty state, so the loss shows how much a longer context helps.
"""

import json
import math
import os

import jax
import numpy as np
from matplotlib.figure import Figure

from ttt.models import generate
from ttt.models.inputs import check_token_ids
from ttt.train import memory as memory_lib
from ttt.train import mesh as mesh_lib
from ttt.train import metrics, pipeline, step
from ttt.train.tokenizers import Tokenizer

REPORT = "report.json"
PLOT = "loss.png"


def _global_rows(rows: np.ndarray, mesh) -> jax.Array:
    """The same full array on every process, sharded over `data` by rows."""
    return jax.make_array_from_callback(rows.shape, mesh_lib.batch_sharding(mesh), lambda index: rows[index])


def per_token_losses(model, tokens: np.ndarray, mesh, batch_size: int, memory=None) -> np.ndarray:
    """tokens int32 [rows, length] -> float32 [rows, length - 1], in fixed-size batches (one compilation),
    every row read from `memory` (a `ttt.train.memory.Memory`; None: from the initial state)."""
    rows = len(tokens)
    cache = None if memory is None else memory_lib.to_cache(model, memory, batch_size, mesh)
    padded = -(-rows // batch_size) * batch_size
    tokens = np.concatenate([tokens, np.zeros((padded - rows, tokens.shape[1]), tokens.dtype)])
    losses = [np.asarray(jax.device_get(step.per_token_losses(model, _global_rows(tokens[i:i + batch_size], mesh), cache)))
              for i in range(0, padded, batch_size)]
    return np.concatenate(losses)[:rows]


def _mean(losses: np.ndarray, mask: np.ndarray) -> float:
    return float((losses.astype(np.float64) * mask).sum() / max(mask.sum(), 1))


def context_lengths(max_length: int) -> list[int]:
    """max_length / 16, max_length / 4 and max_length (each length costs one compilation)."""
    return sorted({max(max_length // 16, 2), max(max_length // 4, 2), max_length})


def evaluate(model, tokenizer: Tokenizer, validation_source, *, mesh, max_length: int, batch_size: int,
             max_documents: int = 0, num_samples: int = 3, prompt_tokens: int = 32, sample_tokens: int = 128,
             unigram: dict | None = None, seed: int = 0, memory=None) -> dict:
    """The report: overall loss, by position, by context length, and a few generated samples; with a
    `memory` (`ttt.train.memory.Memory`), every document, window and sample is read after it."""
    tokens, mask, bytes_per_token = pipeline.evaluation_rows(validation_source, tokenizer, max_length, max_documents)
    check_token_ids(tokens, model.config.vocab_size, name="the held-out tokens")
    ways = mesh_lib.batch_ways(mesh)
    batch_size = -(-batch_size // ways) * ways
    to_bits_per_byte = 1 / math.log(2) / bytes_per_token
    losses = per_token_losses(model, tokens, mesh, batch_size, memory)
    targets = mask[:, 1:]
    overall = _mean(losses, targets)
    by_position = []
    for k in range(int(math.log2(max_length - 1)) + 1):
        first, last = 2**k, min(2 ** (k + 1), max_length) - 1  # positions of predicted tokens
        section = slice(first - 1, last)
        by_position.append({"positions": [first, last], "loss": _mean(losses[:, section], targets[:, section]),
                            "tokens": int(targets[:, section].sum())})
    by_context = []
    for length in context_lengths(max_length):
        usable = max_length // length * length
        windows = tokens[:, :usable].reshape(-1, length)
        window_mask = mask[:, :usable].reshape(-1, length)
        keep = window_mask[:, 1:].any(axis=1)
        window_losses = losses if length == max_length else per_token_losses(model, windows[keep], mesh, batch_size, memory)
        by_context.append({"context_length": length, "loss": _mean(window_losses, window_mask[keep][:, 1:])})
    for entry in by_position + by_context:
        entry["bits_per_byte"] = entry["loss"] * to_bits_per_byte
    report = {
        "documents": len(tokens), "tokens": int(targets.sum()), "bytes_per_token": bytes_per_token,
        "loss": overall, "bits_per_byte": overall * to_bits_per_byte,
        "by_position": by_position, "by_context_length": by_context,
        "samples": generate_samples(model, tokenizer, tokens[:num_samples, :prompt_tokens], sample_tokens, seed, memory),
    }
    if unigram is not None:
        report["unigram_entropy"] = unigram
    return report


def generate_samples(model, tokenizer: Tokenizer, prompts: np.ndarray, new_tokens: int, seed: int,
                     memory=None) -> list[dict]:
    """Continue each prompt row (temperature 0.8, top-k 40), after `memory` when given."""
    if len(prompts) == 0:
        return []
    cache = None if memory is None else memory_lib.to_cache(model, memory, len(prompts))
    out = np.asarray(generate(model, prompts, new_tokens, temperature=0.8, top_k=40, rng=jax.random.key(seed),
                              cache=cache))
    return [{"prompt": tokenizer.decode(row[:prompts.shape[1]]), "continuation": tokenizer.decode(row[prompts.shape[1]:])}
            for row in out]


def write_report(report: dict, directory: str, title: str) -> tuple[str, str]:
    """Write `report.json` and `loss.png` (bits/byte by position and by context length) on process 0."""
    report_path, plot_path = os.path.join(directory, REPORT), os.path.join(directory, PLOT)
    if jax.process_index() != 0:
        return report_path, plot_path
    os.makedirs(directory, exist_ok=True)
    with open(report_path, "w") as f:
        json.dump(metrics.json_safe(report), f, indent=2, allow_nan=False)
    # A bare Figure renders with Agg and never touches pyplot's global backend (notebooks keep theirs).
    figure = Figure(figsize=(11, 4))
    by_position, by_context = figure.subplots(1, 2)
    positions = [math.sqrt(e["positions"][0] * e["positions"][1]) for e in report["by_position"]]
    by_position.plot(positions, [e["bits_per_byte"] for e in report["by_position"]], "o-", label="model")
    by_context.plot([e["context_length"] for e in report["by_context_length"]],
                    [e["bits_per_byte"] for e in report["by_context_length"]], "o-", label="model")
    for axes, xlabel in ((by_position, "token position in the document"), (by_context, "context length (tokens)")):
        if "unigram_entropy" in report:
            axes.axhline(report["unigram_entropy"]["bits_per_byte"], color="gray", ls="--", label="unigram entropy")
        axes.set_xscale("log", base=2)
        axes.set_xlabel(xlabel)
        axes.set_ylabel("bits per byte")
        axes.grid(True, alpha=0.3)
        axes.legend()
    by_position.set_title("held-out loss by position")
    by_context.set_title("held-out loss by context length")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(plot_path, dpi=110)
    return report_path, plot_path
