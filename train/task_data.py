"""Training batches of a synthetic recall task (`--data.source=mqar`): fresh rows every step, with label masks.

Batch number n of process p is `tasks.mqar(..., seed=(seed, p, n))`, a pure function of its
position, so the iterator's checkpointable state is just n: a resumed run sees exactly the rows
it would have seen. Each row is the task's `seq_len` tokens plus one unlabelled padding token
(training rows hold seq_len + 1 tokens: the model reads the first seq_len), so the model reads
precisely the task's row.
"""

import json

import numpy as np

from ttt.configs.train import DataConfig
from ttt.train import tasks

# Held-out evaluation rows use seeds from another stream than any training batch.
_TRAINING_STREAM, _HELD_OUT_STREAM = 0, 1


def task_vocab_size(data: DataConfig, model_vocab_size: int) -> int:
    """The vocabulary a recall task draws from: `data.task_vocab_size`, or the model's when 0."""
    vocab_size = data.task_vocab_size or model_vocab_size
    if vocab_size > model_vocab_size:
        raise ValueError(f"data.task_vocab_size={vocab_size} exceeds the model's vocab_size={model_vocab_size}; "
                         f"expected at most {model_vocab_size}")
    return vocab_size


def mqar_rows(data: DataConfig, vocab_size: int, num_rows: int, seed: tuple[int, ...]) -> tasks.TaskExamples:
    """MQAR rows of `data.seq_len` tokens and `data.num_pairs` pairs, padded by one unlabelled 0 column.

    Returns ids int32 and mask bool, both [num_rows, seq_len + 1].
    """
    examples = tasks.mqar(num_rows, data.seq_len, data.num_pairs, vocab_size,
                          seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
    pad = np.zeros((num_rows, 1), np.int32)
    return tasks.TaskExamples(np.concatenate([examples.ids, pad], axis=1),
                              np.concatenate([examples.mask, pad.astype(bool)], axis=1))


def held_out_mqar(data: DataConfig, vocab_size: int, num_rows: int) -> tasks.TaskExamples:
    """MQAR rows that no training batch holds (another seed stream), [num_rows, seq_len] (no padding)."""
    return tasks.mqar(num_rows, data.seq_len, data.num_pairs, vocab_size,
                      seed=int(np.random.SeedSequence((data.seed, _HELD_OUT_STREAM)).generate_state(1)[0]))


class TaskBatches:
    """Endless `(tokens int32, mask bool)` pairs, each [batch_size, seq_len + 1], of one process's MQAR rows.

    Checkpointable by grain's handler: `get_state` / `set_state` (JSON bytes of the next batch number).
    """

    def __init__(self, data: DataConfig, vocab_size: int, batch_size: int, process_index: int = 0):
        if data.source != "mqar":
            raise ValueError(f"data.source={data.source!r} is not a recall task; expected one of ['mqar']")
        self._data, self._vocab_size, self._batch_size = data, vocab_size, batch_size
        self._process_index, self._next = process_index, 0
        mqar_rows(data, vocab_size, 0, (data.seed,))  # impossible settings fail here, before any work

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        seed = (self._data.seed, _TRAINING_STREAM, self._process_index, self._next)
        rows = mqar_rows(self._data, self._vocab_size, self._batch_size, seed)
        self._next += 1
        return rows.ids, rows.mask

    def get_state(self) -> bytes:
        return json.dumps({"next_batch": self._next}).encode()

    def set_state(self, state: bytes) -> None:
        self._next = int(json.loads(state)["next_batch"])

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; nothing is prefetched here."""
