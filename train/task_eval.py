"""`ttt-eval --tasks.*`: recall (MQAR, passkey, needle by length and depth) and long-document loss by position.

Every example is generated, and every setting checked against the model, before any scoring, so
an impossible setting (more pairs than the vocabulary holds, a context shorter than the needle's
prompt, a length full attention cannot read) stops with one clear line before any work.
Writes, under the evaluation folder: `mqar.json`, `passkey/` and `needle/` (`recall.json`, the
accuracy plot, a depth x length heatmap), `long_documents.json` + `long_documents.png`.
"""

import dataclasses
import json
import os

import jax

from ttt.configs.train import RECALL_SOURCES, require
from ttt.train import long_documents, recall, task_data, tasks

MQAR_REPORT = "mqar.json"


def parse_mqar_settings(text: str) -> tuple[tuple[int, int], ...]:
    """"64:4,128:8" -> ((64, 4), (128, 8)): (sequence length, key-value pairs) per setting."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        length, _, pairs = item.partition(":")
        if not (length.isdigit() and pairs.isdigit()):
            raise ValueError(f"tasks.mqar setting {item!r}; expected LENGTH:PAIRS, e.g. 64:4,128:8")
        settings.append((int(length), int(pairs)))
    return tuple(settings)


@dataclasses.dataclass(frozen=True)
class TaskEvalArgs:
    """Recall tasks and long documents to score (all off by default).

    Attributes:
      mqar: MQAR settings LENGTH:PAIRS, comma-separated (e.g. "64:4,128:8"), keys and values from
        the model's vocabulary (Zoology's rows).
      passkey_lengths: context lengths of the passkey task (tokens).
      needle_lengths: context lengths of the needle-in-a-haystack task, haystack from the held-out
        documents of the checkpoint's data (a text run).
      depths: needle depths, fractions in [0, 1].
      examples: rows per MQAR setting, and per (length, depth) of passkey and needle.
      long_documents: a text source (preset, folder or glob) whose long documents are scored by
        position ("": off).
      long_length: tokens read from each long document.
      long_max_documents: long documents scored (0: all that are long enough).
      seed: seed of the generated examples.
    """

    mqar: str = ""
    passkey_lengths: tuple[int, ...] = ()
    needle_lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    examples: int = 8
    long_documents: str = ""
    long_length: int = 8192
    long_max_documents: int = 4
    seed: int = 0

    def __post_init__(self):
        parse_mqar_settings(self.mqar)
        for name in ("passkey_lengths", "needle_lengths"):
            require(all(length >= 2 for length in getattr(self, name)), f"tasks.{name}", getattr(self, name),
                    "context lengths of at least 2 tokens")
        require(bool(self.depths) and all(0 <= d <= 1 for d in self.depths), "tasks.depths", self.depths,
                "one or more fractions in [0, 1]")
        require(self.examples >= 1, "tasks.examples", self.examples, ">= 1")
        require(self.long_length >= 2, "tasks.long_length", self.long_length, ">= 2 tokens")
        require(self.long_max_documents >= 0, "tasks.long_max_documents", self.long_max_documents, ">= 0 (0: all)")

    @property
    def enabled(self) -> bool:
        return bool(self.mqar or self.passkey_lengths or self.needle_lengths or self.long_documents)


def _check_length(model_config, length: int, what: str) -> None:
    if "attention" in model_config.mixers and length > model_config.max_seq_len:
        raise ValueError(f"{what} of {length} tokens exceeds max_seq_len={model_config.max_seq_len} of the model's "
                         "full-attention layers; expected lengths up to that")


def prepare(args: TaskEvalArgs, train_config, tokenizer, haystack: list[str] | None) -> dict:
    """Every example of `args`, generated and checked against the model before any scoring.

    Args:
      train_config: the checkpoint's TrainConfig (the model's vocabulary and lengths).
      tokenizer: the checkpoint's tokenizer (None for a recall-task run; then no passkey, needle
        or long document).
      haystack: held-out documents for the needle (None when the run has no text data).
    """
    model = train_config.model
    prepared = {"mqar": {}, "passkey": [], "needle": [], "long_documents": None}
    needs_text = args.passkey_lengths or args.needle_lengths or args.long_documents
    if needs_text and tokenizer is None:
        raise ValueError(f"passkey, needle and long documents need a text model; this checkpoint was trained on "
                         f"{train_config.data.source!r} (use --tasks.mqar)")
    for length, pairs in parse_mqar_settings(args.mqar):
        _check_length(model, length, f"MQAR setting {length}:{pairs}")
        prepared["mqar"][f"{length}:{pairs}"] = tasks.mqar(args.examples, length, pairs, model.vocab_size,
                                                           seed=args.seed)
    for length in args.passkey_lengths:
        _check_length(model, length, "a passkey context")
        prepared["passkey"].append(tasks.passkey(tokenizer, length, args.depths, args.examples, seed=args.seed))
    if args.needle_lengths and not haystack:
        raise ValueError("the needle task needs held-out text documents for its haystack; this run has none")
    for length in args.needle_lengths:
        _check_length(model, length, "a needle context")
        prepared["needle"].append(tasks.needle_in_haystack(tokenizer, haystack, length, args.depths, args.examples,
                                                           seed=args.seed))
    if args.long_documents:
        _check_length(model, args.long_length, "--tasks.long-length")
        prepared["long_documents"] = long_documents.load_long_documents(
            args.long_documents, tokenizer, args.long_length, args.long_max_documents)
    return prepared


def own_task(train_config, examples: int) -> dict:
    """The held-out rows of the task a recall-task run trained on, as `prepare` output."""
    data = train_config.data
    if data.source not in RECALL_SOURCES:
        raise ValueError(f"data.source={data.source!r} is not a recall task; expected one of {list(RECALL_SOURCES)}")
    vocab_size = task_data.task_vocab_size(data, train_config.model.vocab_size)
    rows = task_data.held_out_mqar(data, vocab_size, examples)
    return {"mqar": {f"{data.seq_len}:{data.num_pairs}": rows}, "passkey": [], "needle": [], "long_documents": None}


def run(model, prepared: dict, directory: str, name: str, mesh=None, batch_size: int = 8) -> dict:
    """Score `prepare` output; write the reports under `directory` (process 0). Returns what was measured."""
    results = {}
    if prepared["mqar"]:
        results["mqar"] = {setting: recall.score(model, rows, batch_size, mesh)
                           for setting, rows in prepared["mqar"].items()}
        if jax.process_index() == 0:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, MQAR_REPORT), "w") as f:
                json.dump({"model": name, "settings": results["mqar"]}, f, indent=2)
    for task in ("passkey", "needle"):
        if prepared[task]:
            results[task] = recall.score_needles(model, prepared[task], batch_size, mesh)
            recall.write_needle_reports({name: results[task]}, os.path.join(directory, task), task)
    if prepared["long_documents"] is not None:
        results["long_documents"] = long_documents.evaluate_long_documents(model, prepared["long_documents"],
                                                                           mesh=mesh)
        long_documents.write_long_document_reports({name: results["long_documents"]}, directory,
                                                   source=", ".join(results["long_documents"]["documents"][:3]))
    return results
