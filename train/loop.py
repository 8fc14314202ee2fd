"""`train(config)`: the whole run, importable from a notebook; the CLI only builds the config.

A run resumes from the latest checkpoint in its workdir (model, optimizer, data position), so
running the same command again continues where it stopped, with the same loss trajectory.
SIGTERM (preemption) saves a checkpoint at the current step and stops cleanly.
"""

import dataclasses
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from ttt.configs.train import RECALL_SOURCES, TrainConfig
from ttt.models.inputs import check_token_ids
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import dataset, metrics, pipeline, step, task_data
from ttt.train import mesh as mesh_lib
from ttt.train.optim import inner_lr_scale_schedule, make_optimizer
from ttt.train.tokenizers import check_fits, load_tokenizer

# A run whose gradients stay non-finite this many steps in a row has diverged: stop it.
MAX_CONSECUTIVE_SKIPS = 25


@dataclasses.dataclass
class Run:
    """Everything a finished (or stopped) run leaves behind, for evaluation or a notebook."""

    config: TrainConfig
    mesh: jax.sharding.Mesh
    model: nnx.Module
    step: int
    losses: dict[int, float]
    data: dataset.TextDocuments | None  # None for a recall task (`RECALL_SOURCES`)
    stopped_by_signal: bool


def initialize_distributed() -> None:
    """`jax.distributed.initialize`, with an explicit coordinator when the environment names one."""
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def prepare_workdir(workdir: str) -> None:
    """Create `workdir` if needed; raise ValueError if it is not a writable folder."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} is an existing file; expected a folder (new or from an earlier run)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"workdir {workdir!r} cannot be created ({error.strerror}); expected a writable "
                         "folder") from error
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {workdir!r} is not writable; expected a folder this user can write to")


def check_batch(config: TrainConfig, mesh) -> int:
    """The per-process batch, after checking that the batch splits over processes, micro-batches and the mesh."""
    accumulation = config.optimizer.accumulation_steps
    data_ways = mesh_lib.batch_ways(mesh)
    processes = jax.process_count()
    if accumulation < 1 or config.batch_size % accumulation:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by accumulation_steps={accumulation}")
    micro_batch = config.batch_size // accumulation
    if micro_batch % data_ways or micro_batch % processes:
        raise ValueError(f"micro-batch of {micro_batch} sequences (batch_size / accumulation_steps) must be divisible "
                         f"by the mesh's data x fsdp axes ({data_ways}) and the number of processes ({processes})")
    return config.batch_size // processes


def prepare_data(config: TrainConfig) -> dataset.TextDocuments:
    """Build the dataset on process 0 while the others wait, then open it everywhere."""
    if jax.process_index() == 0:
        builder = dataset.prepare(config.data)
    multihost_utils.sync_global_devices("ttt dataset built")
    if jax.process_index() != 0:
        builder = dataset.prepare(config.data)
    return builder


class _StopOnSignal:
    """Records SIGTERM instead of dying, so the loop can save and exit."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config: TrainConfig, *, progress: bool | None = None, stop_after: int | None = None) -> Run:
    """Train (or resume) the run described by `config`; returns the final state and losses.

    Args:
      config: the run.
      progress: show a tqdm bar on process 0; None means only when stderr is a terminal.
      stop_after: save and stop after this step, as a preemption would (the schedule still spans
        `config.steps`); rerunning resumes.
    """
    prepare_workdir(config.workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    local_batch = check_batch(config, mesh)
    builder, data_iterator = _training_data(config, local_batch)
    checkpointer = checkpoint_lib.Checkpointer(config.workdir, keep=config.keep_checkpoints)
    with mesh_lib.activate(mesh):
        model = step.create_model(config.model, mesh, config.seed)
        optimizer = nnx.Optimizer(model, make_optimizer(config.optimizer, config.steps), wrt=nnx.Param)
        start = resume(checkpointer, config, model, optimizer, data_iterator)
        run = _loop(config, mesh, model, optimizer, data_iterator, checkpointer, start, local_batch, progress,
                    min(stop_after or config.steps, config.steps))
    checkpointer.close()
    return dataclasses.replace(run, data=builder)


def _training_data(config: TrainConfig, local_batch: int):
    """(the text dataset or None for a recall task, a checkpointable iterator of this process's batches)."""
    if config.data.source in RECALL_SOURCES:
        vocab_size = task_data.task_vocab_size(config.data, config.model.vocab_size)
        return None, task_data.TaskBatches(config.data, vocab_size, local_batch, jax.process_index())
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_fits(tokenizer, config.model.vocab_size)
    builder = prepare_data(config)
    batches = pipeline.training_batches(
        dataset.data_sources(builder)["train"], tokenizer, seq_len=config.data.seq_len, batch_size=local_batch,
        seed=config.data.seed, shuffle_window=config.data.shuffle_window, process_index=jax.process_index(),
        process_count=jax.process_count(),
        document_alignment=config.model.ttt.mini_batch_size if config.data.reset_at_documents else 0)
    return builder, pipeline.CheckpointableIterator(batches)


def resume(checkpointer: checkpoint_lib.Checkpointer, config: TrainConfig, model, optimizer, data_iterator) -> int:
    """Restore the newest intact checkpoint into model, optimizer and iterator; returns its step (0: none yet).

    A damaged newer checkpoint is renamed `<step>.damaged` with a warning, and the one before it is
    tried. Never starts silently from step 0 over damaged checkpoints: when all are damaged, raises
    DamagedCheckpointError. A checkpoint of an incompatible config raises ValueError (not a fallback).
    """
    damaged = []
    for candidate in reversed(checkpointer.all_steps()):
        try:
            checkpoint_lib.check_compatible(checkpointer.stored_config(candidate), config, checkpointer.directory)
            restored = checkpointer.restore(model, optimizer, data_iterator, candidate)
        except checkpoint_lib.DamagedCheckpointError as error:
            _warn(f"warning: {error}; trying the checkpoint before it")
            damaged.append(candidate)
            continue
        for step_number in damaged:
            _warn(f"warning: resuming from step {restored} instead; the damaged checkpoint is kept as "
                  f"{checkpointer.set_aside(step_number)}")
        return restored
    if damaged:
        raise checkpoint_lib.DamagedCheckpointError(
            f"every checkpoint in {checkpointer.directory} is damaged (steps {', '.join(map(str, sorted(damaged)))}); "
            "move them away to train again from step 0, or use a new --workdir")
    return 0


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _batch_parts(batch) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(token rows, loss mask or None, document starts or None) of a text, recall-task or document-aligned batch."""
    parts = batch if isinstance(batch, tuple) else (batch,)
    return parts + (None,) * (3 - len(parts))


def _loop(config, mesh, model, optimizer, data_iterator, checkpointer, start, local_batch, progress, last) -> Run:
    is_main = jax.process_index() == 0
    accumulation = config.optimizer.accumulation_steps
    global_shape = (accumulation, config.batch_size // accumulation, config.data.seq_len + 1)
    sharding = step.token_sharding(mesh)
    num_params = step.count_parameters(config.model)
    flops_per_token = metrics.training_flops_per_token(config.model, num_params, config.data.seq_len)
    peak = metrics.peak_flops_per_device(config.peak_flops_per_device) * jax.device_count()
    tokens_per_step = config.batch_size * config.data.seq_len
    inner_lr_scale_at = inner_lr_scale_schedule(config.optimizer)
    writer = metrics.MetricsWriter(config.workdir, tensorboard=config.tensorboard)
    show = is_main and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=config.steps, initial=start, disable=not show, desc="train", dynamic_ncols=True)
    losses, skipped_in_a_row, done = {}, 0, start
    window_start, window_steps = None, 0
    with _StopOnSignal() as stop:
        for current in range(start + 1, last + 1):
            # Text batches are token rows; recall-task batches come with the mask of their labels, document-aligned
            # ones with the mask of their padding and their document starts.
            local, *local_extras = _batch_parts(next(data_iterator))
            check_token_ids(local, config.model.vocab_size, name=f"the training batch of step {current}")
            tokens, mask, starts = (None if rows is None else jax.make_array_from_process_local_data(
                sharding, rows.reshape(accumulation, local_batch // accumulation, -1), global_shape)
                for rows in (local, *local_extras))
            inner_lr_scale = np.float32(inner_lr_scale_at(current - 1))
            result = jax.device_get(step.train_step(model, optimizer, tokens, inner_lr_scale, mask, starts))
            done = current
            if window_start is None:  # the first step includes compilation: time from its end
                window_start = time.perf_counter()
            else:
                window_steps += 1
            loss = float(result["loss"])
            losses[current] = loss
            skipped_in_a_row = 0 if result["finite"] else skipped_in_a_row + 1
            if not result["finite"]:
                tqdm.write(f"step {current}: non-finite loss or gradient (loss={loss}); update skipped")
                writer.write(current, {"skipped_update": True, "loss": loss})
            if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(f"{MAX_CONSECUTIVE_SKIPS} consecutive non-finite updates ending at step "
                                         f"{current}: the run diverged (lower --optimizer.learning-rate?)")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if current % config.log_every == 0 or current == last:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / elapsed if window_steps else float("nan")
                record = {"loss": loss, "grad_norm": float(result["grad_norm"]), "tokens_per_s": tokens_per_s,
                          "model_flops_per_s": tokens_per_s * flops_per_token}
                if config.optimizer.ttt_inner_lr_warmup_steps:
                    record["inner_lr_scale"] = float(inner_lr_scale)
                if peak:
                    record["mfu"] = record["model_flops_per_s"] / peak
                writer.write(current, record)
                if is_main and not show:  # no progress bar (not a terminal): a plain line instead
                    print(f"step {current}/{config.steps}: loss {loss:.3f}, {tokens_per_s:.0f} tokens/s", flush=True)
            if current % config.checkpoint_every == 0 or current == last or stop.received:
                checkpointer.save(current, model, optimizer, data_iterator, config)
            if stop.received:
                tqdm.write(f"SIGTERM: saved a checkpoint at step {current} in {checkpointer.directory}; stopping")
                break
        checkpointer.wait()
    bar.close()
    writer.close()
    return Run(config=config, mesh=mesh, model=model, step=done, losses=losses, data=None,
               stopped_by_signal=stop.received)
