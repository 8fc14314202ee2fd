"""The ablation ladder of Sun et al. 2024, Table 1, at tiny scale: one TTT-Linear model per rung.

    python benchmarks/ladder.py --out docs               # the budget of docs/RESULTS.md
    python benchmarks/ladder.py --smoke --out /tmp/l     # a few steps of micro models (the tests run it)

Every rung is the `ttt-linear-tiny` preset with some of its `TTTConfig` switches (configs/ttt.py)
turned off, trained by `study.text_config` on the same tokens (same data, seed, steps, batch and
sequence length) and scored by `ttt.train.evaluate.evaluate` on the same held-out documents. Rung 1
is "TTT equivalence", the TTT layer that equals causal linear attention (tests/ttt/test_ablations.py);
each later rung turns on one ingredient more, and the last is the preset itself. Everything outside
the TTT layers' switches is held fixed, the preset's residual pre-convolution of every block
(`pre_conv=True`) included. Writes `ladder.json` and `ladder.png` under `--out`, and when `--out`
holds the study's results (study.json), rewrites its RESULTS.md with the ladder's section
(benchmarks/ladder_report.py).
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time

import numpy as np
from matplotlib.figure import Figure

from ttt import configs
from ttt.train import dataset, evaluate, loop, step
from ttt.train import mesh as mesh_lib
from ttt.train.plots import save_line_plot
from ttt.train.tokenizers import load_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402 (the script's own folder)
from ladder_report import LADDER_JSON, LADDER_PLOT  # noqa: E402

PRESET = "ttt-linear-tiny"
# Table 1, bottom up: (the paper's row, the switches this rung turns on, the paper's perplexity; 125M
# parameters, Pile, 2K context). Linear attention itself (Katharopoulos et al.) scored 15.91 there;
# its "improved" variant and the TTT layer equivalent to it both 15.23. A learned per-position scale
# (`learn_token_scale`, the reference code's learnable token index) is not a row of the table: it
# enters with the learnable inner learning rate, the other learned factor of the inner step size.
RUNGS = (
    ("TTT equivalence (linear attention)", {}, 15.23),
    ("+ learnable W0", dict(learn_initial_weights=True), 15.27),
    ("+ LN and residual in f", dict(inner_norm=True), 14.05),
    ("+ mini-batch TTT", dict(mini_batch_size=16), 12.35),
    ("+ learnable eta", dict(learn_inner_lr=True, learn_token_scale=True), 11.99),
    ("+ Mamba backbone", dict(backbone="mamba"), 11.09),
)
# The budget of docs/RESULTS.md: study.Budget's text fields (the rest of it is not used here).
BUDGET = dataclasses.replace(study.Budget(), text_steps=80, text_batch=8, text_seq_len=256)
SMOKE = study.SMOKE
SMOKE_MODEL = dict(hidden_size=32, num_layers=2, mlp_hidden_size=64)
HELD_OUT_DOCUMENTS = {"full": 256, "smoke": 8}


def rung_models(base: configs.ModelConfig, seq_len: int) -> list[configs.ModelConfig]:
    """The model of each rung: `base` with rung 1's switches off, then each rung's turned back on."""
    ttt = dataclasses.replace(base.ttt, mini_batch_size=seq_len, backbone="transformer", inner_norm=False,
                              learn_initial_weights=False, learn_inner_lr=False, learn_token_scale=False)
    models = []
    for _, changes, _ in RUNGS:
        ttt = dataclasses.replace(ttt, **changes)
        models.append(dataclasses.replace(base, ttt=ttt))
    return models


def held_out(run, budget: study.Budget, documents: int) -> dict:
    """Loss and bits/byte on the first `documents` held-out documents, each read from its first token."""
    source = dataset.data_sources(run.data)["validation"]
    with mesh_lib.activate(run.mesh):
        report = evaluate.evaluate(run.model, load_tokenizer(run.config.data.tokenizer), source, mesh=run.mesh,
                                   max_length=budget.text_seq_len, batch_size=32, max_documents=documents,
                                   num_samples=0)
    return {key: report[key] for key in ("loss", "bits_per_byte", "documents", "tokens", "by_context_length")}


def train_rung(model: configs.ModelConfig, budget: study.Budget, workdir: str, data_dir: str,
               documents: int) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: the same tokens from step 1 for every rung
    started = time.perf_counter()
    run = loop.train(study.text_config(model, budget, workdir, data_dir), progress=False)
    final_losses = [run.losses[s] for s in sorted(run.losses)[-10:]]
    return {"held_out": held_out(run, budget, documents), "training_loss": float(np.mean(final_losses)),
            "seconds": time.perf_counter() - started}


def write_plot(results: dict, directory: str) -> str:
    """Change of held-out loss from rung 1: ours (nats per byte) and the paper's (log perplexity, nats per token)."""
    rungs = results["rungs"]
    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    x = range(1, len(rungs) + 1)
    axes.plot(x, [r["held_out"]["loss"] - rungs[0]["held_out"]["loss"] for r in rungs], "o-",
              label="ours: held-out loss - rung 1 (nats per byte token)")
    axes.plot(x, [math.log(r["paper_perplexity"] / rungs[0]["paper_perplexity"]) for r in rungs], "s--",
              label="Sun et al. 2024: log perplexity - rung 1 (nats per token)")
    axes.set_xticks(list(x), [r["name"] for r in rungs], rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("change from rung 1 (nats)")
    return save_line_plot(figure, axes, os.path.join(directory, LADDER_PLOT), "Table 1 ladder, tiny TTT-Linear")


def print_table(results: dict) -> None:
    print(f"{'rung':<40} {'parameters':>10} {'held-out loss':>14} {'bits/byte':>10} {'paper ppl':>10}")
    for index, rung in enumerate(results["rungs"], 1):
        print(f"{index}. {rung['name']:<37} {rung['parameters']:>10,} {rung['held_out']['loss']:>14.4f} "
              f"{rung['held_out']['bits_per_byte']:>10.4f} {rung['paper_perplexity']:>10.2f}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help=f"folder of {LADDER_JSON} and {LADDER_PLOT}")
    parser.add_argument("--workdir", default="runs/ladder", help="training runs; each rung's folder is emptied first")
    parser.add_argument("--data-dir", default="", help="where the text dataset is built ('': the default cache)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every rung (default: the budget's)")
    parser.add_argument("--smoke", action="store_true", help="micro models and a few steps (the tests run it)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps={args.steps}; expected >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    budget = SMOKE if args.smoke else BUDGET
    if args.steps is not None:
        budget = dataclasses.replace(budget, text_steps=args.steps)
    base = configs.get(PRESET, **(SMOKE_MODEL if args.smoke else {}))
    documents = HELD_OUT_DOCUMENTS["smoke" if args.smoke else "full"]
    results = {"command": "python benchmarks/ladder.py " + shlex.join(argv), "preset": PRESET,
               "budget": {key: value for key, value in dataclasses.asdict(budget).items() if key.startswith("text_")},
               "held_out_documents": documents, "rungs": []}
    for index, (model, (name, changes, perplexity)) in enumerate(zip(rung_models(base, budget.text_seq_len), RUNGS), 1):
        print(f"rung {index}: {name} ({step.count_parameters(model):,} parameters)", flush=True)
        measured = train_rung(model, budget, os.path.join(args.workdir, f"rung{index}"), args.data_dir, documents)
        results["rungs"].append({"name": name, "changes": changes, "paper_perplexity": perplexity,
                                 "parameters": step.count_parameters(model), "model": dataclasses.asdict(model),
                                 **measured})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, LADDER_JSON), "w") as f:
        json.dump(results, f, indent=2)
    write_plot(results, args.out)
    if os.path.exists(os.path.join(args.out, study.STUDY_JSON)):
        study.main(["--report-only", "--out", args.out])
    print_table(results)
    return results


if __name__ == "__main__":
    main()
