"""The "Table 1 ladder" section of RESULTS.md from the results of `ladder.py` (a dict, stored as ladder.json)."""

import json
import os

LADDER_JSON, LADDER_PLOT = "ladder.json", "ladder.png"
HEADING = "## Table 1 ladder: from linear attention to TTT-Linear (Sun et al. 2024)"


def load(directory: str) -> dict | None:
    """The ladder results stored in `directory`, or None when it holds none."""
    path = os.path.join(directory, LADDER_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _switches(changes: dict) -> str:
    return ", ".join(f"`{key}={value}`" for key, value in changes.items())


def _first_rung(rung: dict) -> str:
    ttt = rung["model"]["ttt"]
    return (f"`mini_batch_size={ttt['mini_batch_size']}` (the whole row), `backbone=transformer`, `inner_norm`, "
            "`learn_initial_weights`, `learn_inner_lr`, `learn_token_scale` all False")


def _verdict(rungs: list[dict]) -> str:
    steps = list(zip(rungs, rungs[1:]))
    better = [r["name"] for before, r in steps if r["held_out"]["loss"] < before["held_out"]["loss"]]
    worse = [r["name"] for before, r in steps if r["held_out"]["loss"] >= before["held_out"]["loss"]]
    agree = sum((r["held_out"]["loss"] < b["held_out"]["loss"]) == (r["paper_perplexity"] < b["paper_perplexity"])
                for b, r in steps)
    top = rungs[-1]["held_out"]["loss"] - rungs[0]["held_out"]["loss"]
    return (f"**Here**: the rungs that lower the held-out loss from the rung before: {', '.join(better) or 'none'}; "
            f"that raise it or keep it: {', '.join(worse) or 'none'}; the direction agrees with the paper's on "
            f"{agree} of {len(steps)} rungs. From the bottom rung to the top the loss changes by {top:+.3f} nats "
            "per byte token (the paper: log(11.09 / 15.23) = -0.317 nats per token).")


def section(results: dict) -> list[str]:
    """Markdown lines: setup, table, plot and verdict."""
    budget, rungs = results["budget"], results["rungs"]
    tokens = budget["text_steps"] * budget["text_batch"] * budget["text_seq_len"]
    model = rungs[-1]["model"]
    lines = [HEADING, "",
             f"```bash\n{results['command']}\n```", "",
             f"Every rung is the `{results['preset']}` preset ({model['num_layers']} layers, width "
             f"{model['hidden_size']}, {model['num_heads']} heads, SwiGLU {model['mlp_hidden_size']}, byte vocabulary, "
             "the residual pre-convolution in every block) with some of its TTT switches off (configs/ttt.py); "
             "everything else is held fixed: the shapes, `pre_conv=True`, the inner base LR, the optimizer and its "
             "schedule, the initialisation seed and the data order. Each trains on "
             f"{budget['text_source']} bytes, rows of {budget['text_seq_len']} tokens, {budget['text_steps']} steps "
             f"of {budget['text_batch']} rows ({tokens:,} tokens, the same tokens for every rung), then reads the "
             f"first {budget['text_seq_len']} tokens of {rungs[0]['held_out']['documents']} held-out documents from "
             "an empty state (`ttt.train.evaluate`). Rung 1 is the TTT layer that equals causal linear attention "
             f"(tests/ttt/test_ablations.py): {_first_rung(rungs[0])}. Each later rung turns on what its row "
             "names; `learn_token_scale` (the learned per-position scale of the paper's code, not a row of the table) "
             "enters with the learnable inner LR, the other learned factor of the inner step size. The top rung is "
             "the preset itself; as `pre_conv` is held on, its last step adds only the TTT layer's own Mamba parts "
             "(a shared q/k projection with a causal convolution for each, the output gate). Paper: 125M parameters, the Pile, 2K context; its \"Linear attention\" row, the "
             "layer of Katharopoulos et al. itself, scored 15.91, and its \"TTT equivalence\" 15.23.", "",
             "| rung | what changes | parameters | held-out loss (nats/token) | bits/byte | vs rung before | "
             "paper perplexity | paper vs row before |", "|---|---|---|---|---|---|---|---|"]
    for index, rung in enumerate(rungs):
        loss = rung["held_out"]["loss"]
        change = "" if index == 0 else f"{loss - rungs[index - 1]['held_out']['loss']:+.4f}"
        paper_change = "" if index == 0 else f"{rung['paper_perplexity'] - rungs[index - 1]['paper_perplexity']:+.2f}"
        what = _first_rung(rung) if index == 0 else _switches(rung["changes"])
        lines.append(f"| {index + 1}. {rung['name']} | {what} | {rung['parameters']:,} | {loss:.4f} | "
                     f"{rung['held_out']['bits_per_byte']:.4f} | {change} | {rung['paper_perplexity']:.2f} | "
                     f"{paper_change} |")
    lines += ["", f"![Table 1 ladder]({LADDER_PLOT})", "",
              "**Sun et al. 2024, Table 1**: every ingredient lowers the perplexity except the learnable W0 "
              "(+0.04); mini-batch TTT (-1.70) and LN and residual in f (-1.22) matter most.", "",
              _verdict(rungs) + " One seed per rung and a budget thousands of times smaller than the paper's: the "
              "spread between seeds is not measured, so differences of a few hundredths of a nat are no ordering, "
              "and a 0.9M-parameter byte model after so few tokens tests the paper's ladder only weakly.", ""]
    return lines
