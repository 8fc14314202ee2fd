"""Scoring a model on a recall task (`ttt.train.tasks`): accuracy and loss on the labelled positions only.

A labelled token at position t counts as recalled when the argmax of the model's logits after
reading ids[:, :t] is that token. Two accuracies are reported:
- `token_accuracy`: recalled labelled tokens / labelled tokens (Zoology's MQAR accuracy, per query);
- `exact_match`: rows whose labelled tokens are all recalled / rows (passkey and needle accuracy:
  the whole multi-token answer must be right).
`loss` is the mean cross-entropy (nats per token) over the labelled tokens. Every other position is
read but never scored.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from matplotlib.figure import Figure

from ttt.train import mesh as mesh_lib
from ttt.train.tasks import TaskExamples
from ttt.train.plots import save_line_plot

REPORT = "recall.json"
ACCURACY_PLOT = "recall_accuracy.png"
HEATMAP_PLOT = "needle_heatmap_{model}.png"


@nnx.jit
def _score_batch(model, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ids: int32 [batch, seq], mask: bool [batch, seq] -> per row (recalled, labelled, loss sum), each [batch].

    One forward of ids[:, :-1]; positions :-1 predict ids[:, 1:], scored where mask[:, 1:].
    """
    logits = model(ids[:, :-1]).astype(jnp.float32)
    targets, labelled = ids[:, 1:], mask[:, 1:]
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    recalled = (jnp.argmax(logits, axis=-1) == targets) & labelled
    return recalled.sum(axis=1), labelled.sum(axis=1), jnp.where(labelled, losses, 0.0).sum(axis=1)


def _check(model, examples: TaskExamples) -> None:
    ids, mask = examples.ids, examples.mask
    if ids.ndim != 2 or ids.shape[1] < 2 or mask.shape != ids.shape:
        raise ValueError(f"task ids of shape {ids.shape} and mask of shape {mask.shape}; expected the same "
                         "[examples, seq] with seq >= 2")
    if mask[:, 0].any():
        raise ValueError("the task labels position 0, which no model can predict; labels start at position 1")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"the task uses token ids {ids.min()} .. {ids.max()}, but the model's vocab_size is "
                         f"{vocab_size}; generate the task with a vocabulary of at most {vocab_size}")


def padded_batches(arrays: list[np.ndarray], batch_size: int, mesh: Mesh | None = None):
    """Yield same-shaped batches of the rows of `arrays` (each [rows, ...]); the last is padded with zeros.

    With a mesh, the batch size is rounded up to a multiple of the ways the rules split a batch,
    and every batch is a global array sharded by rows (the same on every process), so a model
    loaded onto that mesh reads it. Every batch has the same shape: one compilation per shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected 1 or more")
    if mesh is not None:
        ways = mesh_lib.batch_ways(mesh)
        batch_size = -(-batch_size // ways) * ways
    rows = len(arrays[0])
    for start in range(0, rows, batch_size):
        batch = []
        for array in arrays:
            part = np.zeros((batch_size, *array.shape[1:]), array.dtype)
            part[:min(batch_size, rows - start)] = array[start:start + batch_size]
            if mesh is not None:
                sharding = mesh_lib.named_sharding(mesh, ("batch",) + (None,) * (part.ndim - 1))
                part = jax.make_array_from_callback(part.shape, sharding, lambda index, part=part: part[index])
            batch.append(part)
        yield batch


def score_rows(model, examples: TaskExamples, batch_size: int, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Per row of `examples`: `recalled` and `labelled` token counts (int64 [n]) and `loss_sum` (float64 [n]).

    Rows go through `model(ids) -> logits [batch, seq, vocab]` in `padded_batches` (padding rows
    are unlabelled and dropped), so each sequence length compiles once.
    """
    _check(model, examples)
    parts = [jax.device_get(_score_batch(model, ids, mask))
             for ids, mask in padded_batches([examples.ids, examples.mask], batch_size, mesh)]
    rows = len(examples.ids)
    recalled, labelled, loss_sum = (np.concatenate([np.asarray(p[k]) for p in parts])[:rows] for k in range(3))
    return {"recalled": recalled.astype(np.int64), "labelled": labelled.astype(np.int64),
            "loss_sum": loss_sum.astype(np.float64)}


def summarise(rows: dict[str, np.ndarray]) -> dict:
    """Accuracies and loss of some rows of `score_rows` (see the module docstring); rows without labels are skipped."""
    has_labels = rows["labelled"] > 0
    labelled = int(rows["labelled"].sum())
    return {
        "examples": int(has_labels.sum()),
        "labelled_tokens": labelled,
        "token_accuracy": float(rows["recalled"].sum() / max(labelled, 1)),
        "exact_match": float((rows["recalled"] == rows["labelled"])[has_labels].mean()) if has_labels.any() else 0.0,
        "loss": float(rows["loss_sum"].sum() / max(labelled, 1)),
    }


def score(model, examples: TaskExamples, batch_size: int = 8, mesh: Mesh | None = None) -> dict:
    """Accuracies and loss of `model` on `examples` (see the module docstring)."""
    return summarise(score_rows(model, examples, batch_size, mesh))


def score_needles(model, examples_by_length: list[TaskExamples], batch_size: int = 8,
                  mesh: Mesh | None = None) -> dict:
    """Passkey or needle accuracy by context length, and by context length x needle depth.

    Args:
      examples_by_length: one `TaskExamples` per context length, each with its rows' `depth`.
    Returns:
      {"by_length": [{"context_length", **summary}], "by_length_and_depth": [{"context_length",
      "depth", **summary}]}, summaries as `summarise`.
    """
    by_length, by_length_and_depth = [], []
    for examples in examples_by_length:
        if examples.depth is None:
            raise ValueError("score_needles needs examples with a needle depth per row (tasks.passkey or "
                             "tasks.needle_in_haystack)")
        rows = score_rows(model, examples, batch_size, mesh)
        by_length.append({"context_length": examples.context_length, **summarise(rows)})
        for depth in np.unique(examples.depth):
            chosen = {name: values[examples.depth == depth] for name, values in rows.items()}
            by_length_and_depth.append({"context_length": examples.context_length, "depth": float(depth),
                                        **summarise(chosen)})
    return {"by_length": by_length, "by_length_and_depth": by_length_and_depth}


def plot_accuracy_by_length(reports: dict[str, dict], path: str, *, metric: str = "exact_match",
                            title: str = "recall accuracy by context length") -> str:
    """One line per model: `metric` vs context length (log axis). `reports`: model name -> `score_needles` output."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name, report in reports.items():
        entries = report["by_length"]
        axes.plot([e["context_length"] for e in entries], [e[metric] for e in entries], "o-", label=name)
    axes.set_xscale("log", base=2)
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel(metric.replace("_", " "))
    return save_line_plot(figure, axes, path, title)


def plot_depth_heatmap(report: dict, path: str, *, metric: str = "exact_match", title: str = "") -> str:
    """Needle depth (rows) x context length (columns), colour = `metric`, for one `score_needles` report."""
    entries = report["by_length_and_depth"]
    lengths = sorted({e["context_length"] for e in entries})
    depths = sorted({e["depth"] for e in entries})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for e in entries:
        grid[depths.index(e["depth"]), lengths.index(e["context_length"])] = e[metric]
    figure = Figure(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    axes = figure.subplots()
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (row, column), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("needle depth")
    axes.set_title(title or metric.replace("_", " "))
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_needle_reports(reports: dict[str, dict], directory: str, task: str) -> list[str]:
    """`recall.json` (model name -> `score_needles` report), the accuracy plot and one heatmap per model.

    Writes on process 0 only; returns the paths written there.
    """
    if jax.process_index() != 0:
        return []
    os.makedirs(directory, exist_ok=True)
    report_path = os.path.join(directory, REPORT)
    with open(report_path, "w") as f:
        json.dump({"task": task, "models": reports}, f, indent=2)
    paths = [report_path, plot_accuracy_by_length(reports, os.path.join(directory, ACCURACY_PLOT),
                                                  title=f"{task}: accuracy by context length")]
    for name, report in reports.items():
        file_name = HEATMAP_PLOT.format(model="".join(c if c.isalnum() or c in "-_." else "_" for c in name))
        paths.append(plot_depth_heatmap(report, os.path.join(directory, file_name), title=f"{task}: {name}"))
    return paths
