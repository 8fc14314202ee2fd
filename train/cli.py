"""Console scripts `ttt-train`, `ttt-eval`, `ttt-generate` (tyro): parse a config, call the library.

    ttt-train --config=ttt-linear-tiny --workdir=runs/tiny --steps=300 [--data.seq-len=128 ...]
    ttt-eval --checkpoint=runs/tiny
    ttt-generate --checkpoint=runs/tiny --prompt="def main("

`--config` names a model preset (`ttt.configs.names()`); every field of `TrainConfig` (and of
the model config, as `--model.FIELD`) can be overridden with `--key=value`.
"""

import argparse
import dataclasses
import math
import os
import sys

import jax
import numpy as np
import tyro

from ttt import configs
from ttt.configs.train import RECALL_SOURCES, MeshConfig, TrainConfig, require
from ttt.models import generate
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import dataset, evaluate, loop, memory_io, pipeline, step, task_eval
from ttt.train import memory as memory_lib
from ttt.train import mesh as mesh_lib
from ttt.train.tokenizers import load_tokenizer

DEFAULT_PRESET = "ttt-linear-tiny"
EXPORT = "export"
EVALUATION = "eval"
# Held-out rows scored after training on a recall task.
RECALL_EXAMPLES = 256
COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ttt", "jax")
# What a console script reports in one line: bad settings, paths and files (ValueError, with
# DamagedCheckpointError among them), what the system refused (OSError), a diverged run.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
# Every flag takes a value (`--evaluate=False`, not `--no-evaluate`), so any field is `--key=value`; a
# nested config that may be None (`model.e2e`) takes flags only when the preset sets it (no subcommand).
TYRO_MARKERS = (tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands)


def parse_train_args(argv: list[str]) -> TrainConfig:
    """`--config=NAME` picks the model preset; the other flags override TrainConfig fields.

    Raises ValueError for an unknown preset; tyro exits (SystemExit 2) on an unknown flag.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=DEFAULT_PRESET)
    known, rest = parser.parse_known_args(argv)
    default = TrainConfig(model=configs.get(known.config), config_name=known.config)
    return tyro.cli(TrainConfig, default=default, args=rest, prog="ttt-train", config=TYRO_MARKERS,
                    description=f"Train a model preset (--config, default {DEFAULT_PRESET}; one of "
                                f"{', '.join(configs.names())}).")


def _console_script(run, program: str):
    """The entry point of `run(argv)`: returns None (a console script's exit status) and ends user
    errors (bad paths, sizes, configs) with one clear line instead of a traceback."""

    def main(argv: list[str] | None = None) -> None:
        # Reruns (resuming, evaluating) then skip recompiling; JAX_COMPILATION_CACHE_DIR overrides.
        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
        try:
            run(sys.argv[1:] if argv is None else argv)
        except USER_ERRORS as error:
            raise SystemExit(f"{program}: error: {error}") from error

    main.__doc__ = run.__doc__
    return main


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def run_train(argv: list[str]) -> dict:
    """`ttt-train`: train (or resume) a run, export its parameters, evaluate it, print where the report is."""
    config = parse_train_args(argv)
    loop.prepare_workdir(config.workdir)
    if config.multihost:
        loop.initialize_distributed()
    if config.data.source in RECALL_SOURCES:
        return _train_on_recall_task(config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    sources = dataset.data_sources(loop.prepare_data(config))
    unigram = pipeline.unigram_entropy(sources["train"], tokenizer)
    num_params = step.count_parameters(config.model)
    _say(f"model {config.config_name or 'custom'}: {num_params / 1e6:.2f}M parameters; data {config.data.source}: "
         f"{len(sources['train'])} training / {len(sources['validation'])} held-out documents")
    _say(f"unigram entropy of the training data: {unigram['nats_per_token']:.3f} nats/token = "
         f"{unigram['bits_per_byte']:.3f} bits/byte (the loss of a model that ignores context)")
    run = loop.train(config)
    if not run.losses:
        _say(f"nothing to do: {config.workdir} already holds step {run.step} of {config.steps}")
    else:
        tail = [run.losses[s] for s in sorted(run.losses)[-10:]]
        _say(f"step {run.step}: training loss {np.mean(tail):.3f} nats/token (mean of the last {len(tail)} steps), "
             f"{np.mean(tail) / unigram['nats_per_token']:.0%} of the unigram entropy")
    if run.stopped_by_signal:
        return {"step": run.step, "stopped_by_signal": True}
    with mesh_lib.activate(run.mesh):
        export = checkpoint_lib.export_params(run.model, config, os.path.join(config.workdir, EXPORT))
        _say(f"checkpoints: {os.path.join(os.path.abspath(config.workdir), checkpoint_lib.CHECKPOINTS)}; "
             f"params-only export: {export}")
        if not config.evaluate:
            return {"step": run.step}
        report = evaluate.evaluate(run.model, tokenizer, sources["validation"], mesh=run.mesh,
                                   max_length=4 * config.data.seq_len, batch_size=config.batch_size,
                                   unigram=unigram, seed=config.seed)
    return _write_and_summarise(report, os.path.join(config.workdir, EVALUATION), config)


def _train_on_recall_task(config: TrainConfig) -> dict:
    """`ttt-train --data.source=mqar`: train on the labelled positions, then score held-out rows of the task."""
    _say(f"model {config.config_name or 'custom'}: {step.count_parameters(config.model) / 1e6:.2f}M parameters; "
         f"data: {config.data.source} ({config.data.seq_len} tokens, {config.data.num_pairs} pairs), loss on the "
         "labelled positions only")
    run = loop.train(config)
    if run.stopped_by_signal:
        return {"step": run.step, "stopped_by_signal": True}
    with mesh_lib.activate(run.mesh):
        export = checkpoint_lib.export_params(run.model, config, os.path.join(config.workdir, EXPORT))
        _say(f"params-only export: {export}")
        if not config.evaluate:
            return {"step": run.step}
        return _run_tasks(run.model, task_eval.own_task(config, RECALL_EXAMPLES),
                          os.path.join(config.workdir, EVALUATION), config, run.mesh)


def _run_tasks(model, prepared: dict, directory: str, config: TrainConfig, mesh) -> dict:
    results = task_eval.run(model, prepared, directory, config.config_name or "model", mesh)
    for setting, score in results.get("mqar", {}).items():
        _say(f"MQAR {setting}: token accuracy {score['token_accuracy']:.3f}, exact match {score['exact_match']:.3f}")
    for task in ("passkey", "needle"):
        for entry in results.get(task, {}).get("by_length", []):
            _say(f"{task} at {entry['context_length']} tokens: exact match {entry['exact_match']:.3f}")
    if "long_documents" in results:
        last = results["long_documents"]["by_position"][-1]
        _say(f"long documents: {results['long_documents']['bits_per_byte']:.3f} bits/byte overall, "
             f"{last['bits_per_byte']:.3f} at positions {last['positions'][0]}-{last['positions'][1]}")
    _say(f"task reports: {os.path.abspath(directory)}")
    return results


def _write_and_summarise(report: dict, directory: str, config: TrainConfig) -> dict:
    report_path, plot_path = evaluate.write_report(report, directory, f"{config.config_name} on {config.data.source}")
    _say(f"held-out loss {report['loss']:.3f} nats/token = {report['bits_per_byte']:.3f} bits/byte over "
         f"{report['documents']} documents")
    if "unigram_entropy" in report:
        unigram = report["unigram_entropy"]["bits_per_byte"]
        _say(f"unigram entropy of the data: {unigram:.3f} bits/byte; the model's held-out loss is "
             f"{report['bits_per_byte'] / unigram:.0%} of it")
    for sample in report["samples"][:1]:
        _say(f"sample: {sample['prompt']!r} -> {sample['continuation']!r}")
    _say(f"report: {os.path.abspath(report_path)}\nplot:   {os.path.abspath(plot_path)}")
    return report


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Evaluate a trained model on the held-out documents of its data.

    Attributes:
      checkpoint: a training workdir (its latest checkpoint) or a params-only export folder.
      max_length: tokens read from each held-out document (0: 4x the training sequence length).
      batch_size: documents per forward pass.
      max_documents: evaluate at most this many documents (0: all).
      out: folder of report.json and loss.png ("": <checkpoint>/eval).
      data_dir: where the dataset is (re)built ("": as in the run's config).
      mesh: the mesh to load the model onto (any; need not be the training mesh).
      memory: a memory folder (`ttt-read`): every document is read after what it holds ("": none).
      tasks: recall tasks and long documents to score as well (`--tasks.mqar=64:4,128:8`,
        `--tasks.passkey-lengths 1024 4096`, `--tasks.needle-lengths ...`, `--tasks.long-documents=kjv`).
    """

    checkpoint: str
    max_length: int = 0
    batch_size: int = 16
    max_documents: int = 0
    out: str = ""
    data_dir: str = ""
    mesh: MeshConfig = MeshConfig()
    memory: str = ""
    tasks: task_eval.TaskEvalArgs = task_eval.TaskEvalArgs()

    def __post_init__(self):
        require(bool(self.checkpoint.strip()), "checkpoint", self.checkpoint, "a training workdir or export folder")
        require(self.max_length == 0 or self.max_length >= 2, "max_length", self.max_length,
                "0 (4x the training sequence length) or >= 2 tokens")
        require(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        require(self.max_documents >= 0, "max_documents", self.max_documents, ">= 0 (0: all)")


def run_eval(argv: list[str]) -> dict:
    """`ttt-eval`: loss by position and context length on held-out documents (a recall-task run: its task's
    held-out rows), and the recall tasks and long documents of `--tasks.*`; JSON + PNG."""
    args = tyro.cli(EvalArgs, args=argv, prog="ttt-eval", config=TYRO_MARKERS)
    mesh = mesh_lib.make_mesh(args.mesh)
    with mesh_lib.activate(mesh):
        model, config = checkpoint_lib.load_trained_model(args.checkpoint, mesh)
    directory = args.out or os.path.join(args.checkpoint, EVALUATION)
    if config.data.source in RECALL_SOURCES:
        prepared = task_eval.prepare(args.tasks, config, None, None)
        prepared["mqar"] = {**task_eval.own_task(config, RECALL_EXAMPLES)["mqar"], **prepared["mqar"]}
        with mesh_lib.activate(mesh):
            return _run_tasks(model, prepared, directory, config, mesh)
    data_config = dataclasses.replace(config.data, data_dir=args.data_dir or config.data.data_dir)
    tokenizer = load_tokenizer(data_config.tokenizer)
    sources = dataset.data_sources(dataset.prepare(data_config))
    haystack = ([example["text"].decode("utf-8") for example in sources["validation"]]
                if args.tasks.needle_lengths else None)
    prepared = task_eval.prepare(args.tasks, config, tokenizer, haystack)  # impossible settings stop here
    unigram = pipeline.unigram_entropy(sources["train"], tokenizer)
    with mesh_lib.activate(mesh):
        memory = memory_io.load(args.memory, model, mesh) if args.memory else None
        report = evaluate.evaluate(model, tokenizer, sources["validation"], mesh=mesh,
                                   max_length=args.max_length or 4 * config.data.seq_len, batch_size=args.batch_size,
                                   max_documents=args.max_documents, unigram=unigram, seed=config.seed, memory=memory)
    if memory is not None:
        report["memory"] = {"directory": os.path.abspath(args.memory), "tokens_read": memory.info.tokens_read,
                            "sources": list(memory.info.sources)}
    report = _write_and_summarise(report, directory, config)
    if args.tasks.enabled:
        with mesh_lib.activate(mesh):
            report["tasks"] = _run_tasks(model, prepared, directory, config, mesh)
    return report


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """Continue a prompt with a trained model.

    Attributes:
      checkpoint: a training workdir or a params-only export folder.
      prompt: the text to continue.
      max_new_tokens: tokens to generate.
      temperature: sampling temperature (0: greedy).
      top_k: sample among the k most likely tokens (0: all).
      top_p: nucleus sampling mass (1: off).
      seed: sampling seed.
      memory: a memory folder (`ttt-read`): the prompt is read after what it holds ("": none).
    """

    checkpoint: str
    prompt: str
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    seed: int = 0
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1)
    memory: str = ""

    def __post_init__(self):
        require(bool(self.checkpoint.strip()), "checkpoint", self.checkpoint, "a training workdir or export folder")
        require(bool(self.prompt), "prompt", self.prompt, "some text to continue")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")
        require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
                "a finite number >= 0 (0: greedy)")
        require(self.top_k >= 0, "top_k", self.top_k, ">= 0 (0: all tokens)")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "a mass in (0, 1] (1: off)")


def run_generate(argv: list[str]) -> str:
    """`ttt-generate`: print the prompt's continuation."""
    args = tyro.cli(GenerateArgs, args=argv, prog="ttt-generate", config=TYRO_MARKERS)
    mesh = mesh_lib.make_mesh(args.mesh)
    with mesh_lib.activate(mesh):
        model, config = checkpoint_lib.load_trained_model(args.checkpoint, mesh)
        tokenizer = load_tokenizer(config.data.tokenizer)
        prompt = tokenizer.encode(args.prompt)
        if len(prompt) == 0:
            raise ValueError(f"prompt={args.prompt!r} encodes to no tokens; expected some text to continue")
        cache = memory_lib.to_cache(model, memory_io.load(args.memory, model, mesh)) if args.memory else None
        ids = generate(model, prompt[None, :], args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None,
                       rng=jax.random.key(args.seed), cache=cache)
    text = tokenizer.decode(np.asarray(ids)[0, len(prompt):])
    _say(args.prompt + text)
    return text


train_main = _console_script(run_train, "ttt-train")
eval_main = _console_script(run_eval, "ttt-eval")
generate_main = _console_script(run_generate, "ttt-generate")
