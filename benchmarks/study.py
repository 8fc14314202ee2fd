"""The study: every tiny family trained the same way, then scored on recall and on long documents.

    python benchmarks/study.py                      # the budget of docs/RESULTS.md (about 30 min on 2 CPU cores)
    python benchmarks/study.py --smoke --out /tmp/s # a few minutes: tiny models, a few steps (the tests run it)

Families (attention, sliding-window attention only, TTT-Linear, TTT-MLP, the SWA/TTT hybrid) share
depth, width, heads and vocabulary; each family's SwiGLU width is chosen so that its parameter
count is the closest to the attention model's (`matched_families`). TTT-E2E is its tiny preset
(`E2E_PRESET`) at the study's sizes and window (`e2e_config`).

Per family, two runs of `ttt.train.loop.train`, equal tokens for every family:
1. MQAR (Zoology) with the loss on labelled positions only (`--data.source=mqar`), scored on
   held-out rows every `eval_every` steps: the learning curve, the steps to reach 0.99 accuracy,
   and the final accuracy on the training setting and on a harder one (zero-shot in length).
2. Next-byte prediction on text, then loss by position on long documents (beyond the training
   length) and zero-shot passkey / needle accuracy by context length and depth.
Writes `study.json`, the plots and `RESULTS.md` under `--out`.
"""

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

from ttt import configs
from ttt.configs.presets import e2e_stages
from ttt.configs.train import DataConfig, OptimizerConfig, TrainConfig
from ttt.train import dataset, long_documents, loop, recall, step, task_data, tasks
from ttt.train import mesh as mesh_lib
from ttt.train.tokenizers import load_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study_report  # noqa: E402 (the script's own folder)

E2E_PRESET = "e2e-tiny"
STUDY_JSON = "study.json"
TARGET_ACCURACY = 0.99


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything the study spends; the defaults are the run of docs/RESULTS.md."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    mlp_hidden_size: int = 384
    sliding_window: int = 32
    mqar_length: int = 64
    mqar_pairs: int = 4
    harder_length: int = 128
    harder_pairs: int = 8
    mqar_steps: int = 200
    mqar_batch: int = 32
    eval_every: int = 25
    held_out_rows: int = 256
    text_source: str = "pystdlib"
    text_steps: int = 60
    text_batch: int = 8
    text_seq_len: int = 256
    text_max_documents: int = 0
    text_validation_fraction: float = 0.05
    long_length: int = 8192
    long_documents: int = 2
    needle_lengths: tuple[int, ...] = (512, 1024, 2048)
    needle_depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    needle_examples: int = 2


SMOKE = Budget(num_layers=2, hidden_size=32, num_heads=4, mlp_hidden_size=64, sliding_window=8, mqar_length=32,
               mqar_pairs=2, harder_length=48, harder_pairs=3, mqar_steps=2, mqar_batch=8, eval_every=2,
               held_out_rows=16, text_steps=2, text_batch=8, text_seq_len=32, text_max_documents=40,
               text_validation_fraction=0.2, long_length=512, long_documents=1,
               needle_lengths=(512,), needle_depths=(0.0, 1.0), needle_examples=1)

# Mixer settings of each family; the shared sizes come from the Budget.
FAMILIES = {
    "attention": dict(layer_pattern="attention"),
    "swa": dict(layer_pattern="swa"),
    "ttt-linear": dict(layer_pattern="ttt_linear", pre_conv=True),
    "ttt-mlp": dict(layer_pattern="ttt_mlp", pre_conv=True),
    "hybrid": dict(layer_pattern="ttt_linear,swa"),
}


def family_config(name: str, budget: Budget, mlp_hidden_size: int) -> configs.ModelConfig:
    if name == "ttt-e2e":
        return e2e_config(budget, mlp_hidden_size)
    fields = FAMILIES[name]
    return configs.ModelConfig(
        vocab_size=256, num_layers=budget.num_layers, hidden_size=budget.hidden_size, num_heads=budget.num_heads,
        mlp_hidden_size=mlp_hidden_size, max_seq_len=_max_seq_len(budget),
        attention=configs.AttentionConfig(sliding_window=budget.sliding_window if "swa" in fields["layer_pattern"]
                                          else None), **fields)


def e2e_config(budget: Budget, mlp_hidden_size: int) -> configs.ModelConfig:
    """TTT-E2E's tiny preset at the budget's sizes and window: the last quarter of the blocks (at least one)
    carry the prime MLPs; chunks of the preset's size or of the window, whichever is smaller (a chunk
    must fit in the window); `TrainConfig` checks that the training lengths are whole chunks."""
    preset = configs.get(E2E_PRESET)
    return configs.get(E2E_PRESET, num_layers=budget.num_layers, hidden_size=budget.hidden_size,
                       num_heads=budget.num_heads, mlp_hidden_size=mlp_hidden_size,
                       stages=e2e_stages(budget.num_layers, max(1, budget.num_layers // 4)),
                       attention=dataclasses.replace(preset.attention, sliding_window=budget.sliding_window),
                       max_seq_len=_max_seq_len(budget),
                       e2e=dataclasses.replace(preset.e2e, chunk_size=min(preset.e2e.chunk_size, budget.sliding_window)))


def _max_seq_len(budget: Budget) -> int:
    return max(budget.long_length, max(budget.needle_lengths))


def matched_families(budget: Budget, names: list[str]) -> dict[str, configs.ModelConfig]:
    """name -> config; every SwiGLU width (a multiple of 8) brings the count closest to attention's."""
    target = step.count_parameters(family_config("attention", budget, budget.mlp_hidden_size))
    chosen = {}
    for name in names:
        widths = range(8, 2 * budget.mlp_hidden_size + 1, 8)
        counts = {w: step.count_parameters(family_config(name, budget, w)) for w in widths}
        chosen[name] = family_config(name, budget, min(widths, key=lambda w: abs(counts[w] - target)))
    return chosen


def available_families() -> list[str]:
    """The families of this study."""
    return [*FAMILIES, "ttt-e2e"]


def mqar_config(model, budget: Budget, workdir: str) -> TrainConfig:
    return TrainConfig(model=model, workdir=workdir, steps=budget.mqar_steps, batch_size=budget.mqar_batch,
                       log_every=budget.eval_every, checkpoint_every=budget.eval_every, keep_checkpoints=1,
                       evaluate=False, data=DataConfig(source="mqar", seq_len=budget.mqar_length,
                                                       num_pairs=budget.mqar_pairs),
                       optimizer=OptimizerConfig(warmup_steps=min(30, budget.mqar_steps // 10)))


def text_config(model, budget: Budget, workdir: str, data_dir: str) -> TrainConfig:
    return TrainConfig(model=model, workdir=workdir, steps=budget.text_steps, batch_size=budget.text_batch,
                       log_every=max(1, budget.text_steps // 4), checkpoint_every=budget.text_steps,
                       keep_checkpoints=1, evaluate=False,
                       data=DataConfig(source=budget.text_source, seq_len=budget.text_seq_len, data_dir=data_dir,
                                       max_documents=budget.text_max_documents,
                                       validation_fraction=budget.text_validation_fraction),
                       optimizer=OptimizerConfig(warmup_steps=min(30, budget.text_steps // 10)))


def mqar_study(model, budget: Budget, workdir: str) -> dict:
    """Learning curve (held-out token accuracy every eval_every steps), steps to TARGET_ACCURACY, final scores."""
    config = mqar_config(model, budget, workdir)
    held_out = task_data.held_out_mqar(config.data, model.vocab_size, budget.held_out_rows)
    harder = tasks.mqar(budget.held_out_rows, budget.harder_length, budget.harder_pairs, model.vocab_size, seed=1)
    curve, started = [], time.perf_counter()
    for stop in range(budget.eval_every, budget.mqar_steps + 1, budget.eval_every):
        run = loop.train(config, progress=False, stop_after=stop)
        with mesh_lib.activate(run.mesh):
            curve.append({"step": stop, **recall.score(run.model, held_out, batch_size=budget.held_out_rows)})
        print(f"  mqar step {stop}: accuracy {curve[-1]['token_accuracy']:.3f}", flush=True)
    with mesh_lib.activate(run.mesh):
        harder_score = recall.score(run.model, harder, batch_size=64)
    reached = next((e["step"] for e in curve if e["token_accuracy"] >= TARGET_ACCURACY), None)
    return {"curve": curve, "final": curve[-1], "harder": harder_score, "steps_to_target": reached,
            "seconds": time.perf_counter() - started}


def text_study(model, budget: Budget, workdir: str, data_dir: str) -> dict:
    """Train on text, then long-document loss by position and zero-shot passkey / needle accuracy."""
    config = text_config(model, budget, workdir, data_dir)
    started = time.perf_counter()
    run = loop.train(config, progress=False)
    tokenizer = load_tokenizer(config.data.tokenizer)
    documents = long_documents.load_long_documents(budget.text_source, tokenizer, budget.long_length,
                                                   budget.long_documents)
    haystack = [example["text"].decode() for example in dataset.data_sources(run.data)["validation"]]
    passkeys = [tasks.passkey(tokenizer, length, budget.needle_depths, budget.needle_examples, seed=length)
                for length in budget.needle_lengths]
    needles = [tasks.needle_in_haystack(tokenizer, haystack, length, budget.needle_depths, budget.needle_examples,
                                        seed=length) for length in budget.needle_lengths]
    with mesh_lib.activate(run.mesh):
        result = {"long_documents": long_documents.evaluate_long_documents(run.model, documents, mesh=run.mesh),
                  "passkey": recall.score_needles(run.model, passkeys, batch_size=4),
                  "needle": recall.score_needles(run.model, needles, batch_size=4)}
    final_losses = [run.losses[s] for s in sorted(run.losses)[-10:]]
    return {**result, "training_loss": float(np.mean(final_losses)), "seconds": time.perf_counter() - started}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help="folder of RESULTS.md, study.json and the plots")
    parser.add_argument("--workdir", default="runs/study",
                        help="training runs; each family's folder is emptied first (a curve needs a fresh run)")
    # A rerun with the same budget and --out keeps the families already in study.json.
    parser.add_argument("--data-dir", default="", help="where the text dataset is built ('': the default cache)")
    parser.add_argument("--families", default=",".join(available_families()),
                        help=f"comma-separated subset of {available_families()}")
    parser.add_argument("--smoke", action="store_true", help="tiny models and a few steps (a few minutes)")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and the plots from study.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.families.split(",")) - set(available_families()))
    if unknown:
        parser.error(f"--families names {unknown}; expected a subset of {available_families()}")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, STUDY_JSON)) as f:
            results = json.load(f)
        study_report.write(results, args.out)
        return results
    budget = SMOKE if args.smoke else Budget()
    models = matched_families(budget, args.families.split(","))
    results = _earlier_results(args.out, budget)
    results["command"] = "python benchmarks/study.py " + shlex.join(argv)
    for name, model in models.items():
        if name in results["families"]:
            print(f"{name}: kept from {os.path.join(args.out, STUDY_JSON)}", flush=True)
            continue
        print(f"{name}: {step.count_parameters(model):,} parameters (SwiGLU width {model.mlp_hidden_size})", flush=True)
        shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
        results["families"][name] = {
            "parameters": step.count_parameters(model), "config": dataclasses.asdict(model),
            "mqar": mqar_study(model, budget, os.path.join(args.workdir, name, "mqar")),
            "text": text_study(model, budget, os.path.join(args.workdir, name, "text"), args.data_dir)}
        _save(results, args.out)  # each family as it finishes: an interrupted study resumes at the next
    study_report.write(results, args.out)
    return results


def _earlier_results(directory: str, budget: Budget) -> dict:
    """The families already measured in `directory` with the same budget (a rerun resumes); else none."""
    path = os.path.join(directory, STUDY_JSON)
    budget_json = json.loads(json.dumps(dataclasses.asdict(budget)))
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier.get("budget") == budget_json:
            return earlier
    return {"budget": budget_json, "families": {}}


def _save(results: dict, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, STUDY_JSON), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
