"""grain pipelines: packed training batches, held-out evaluation rows, the data's unigram entropy.

Document boundaries (the deliberate choice): documents are concatenated, each followed by the
tokenizer's end-of-document id, and the stream is cut into rows of `seq_len + 1` tokens (the model reads the first `seq_len` and
predicts the last `seq_len`). Nothing is
masked: the model learns to predict the end of a document and to start afresh after it, which is
also what it must do when it reads a stream at inference time. Rows therefore may start in the
middle of a document; evaluation by token position uses separate rows that each start at the
beginning of a held-out document.

The option (`DataConfig.reset_at_documents`): every mixer restarts at each document instead
(ttt/documents.py). Each document is padded to a multiple of the TTT mini-batch size, so that it
starts where a mini-batch begins, and rows carry the loss mask and the document starts.
"""

import json
import math

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, WindowShuffleIterDataset

from ttt.train.tokenizers import Tokenizer


def _document_tokens(tokenizer: Tokenizer):
    def tokenize(example) -> dict:
        ids = tokenizer.encode(example["text"].decode("utf-8"))
        return {"tokens": np.append(ids, tokenizer.end_of_document_id).astype(np.int32)}

    return tokenize


def _rows(batch) -> np.ndarray:
    return batch["tokens"]


def _padded_to_multiple(multiple: int, padding_id: int):
    def pad(document: dict) -> dict:
        ids = document["tokens"]
        padded = np.pad(ids, (0, -len(ids) % multiple), constant_values=padding_id)
        return {"tokens": padded, "real": np.arange(len(padded)) < len(ids)}

    return pad


def _aligned_rows(padding_id: int):
    def rows(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # A row's first token starts no document here: the row is read from the initial state anyway.
        segments = batch["tokens_segment_ids"]
        starts = np.pad(segments[:, 1:] != segments[:, :-1], [(0, 0), (1, 0)])
        # A document's first token is never predicted when the document is read alone; padding never is.
        mask = batch["real"] & ~starts
        target_column = lambda a, value: np.pad(a, [(0, 0), (0, 1)], constant_values=value)
        return target_column(batch["tokens"], padding_id), target_column(mask, False), target_column(starts, False)

    return rows


def training_batches(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                     shuffle_window: int, process_index: int = 0, process_count: int = 1,
                     document_alignment: int = 0) -> grain.IterDataset:
    """Endless batches `int32 [batch_size, seq_len + 1]` of this process's share of the documents.

    Process i reads documents i, i + process_count, ...; each epoch visits them in a new order;
    rows are shuffled within a window so that one batch mixes many documents. `iter()` of the
    result is a checkpointable grain iterator (`get_state` / `set_state`).

    With `document_alignment` b > 0 (a divisor of seq_len), each document (with its end-of-document
    id) is padded to a multiple of b with end-of-document ids, the stream is cut into rows of seq_len
    tokens, and each row gets one padding token as its last target; so every document starts at a
    multiple of b in its row. A batch is then `(tokens, mask, document_starts)`, each
    [batch_size, seq_len + 1] and aligned with the tokens: the mask is False on padding and on each
    document's first token (targets a document read alone never has); the starts are True at the
    first token of each document that begins after the row's first token.
    """
    documents = grain.MapDataset.source(source)
    if len(documents) < process_count:
        raise ValueError(f"{len(documents)} training documents cannot be shared by {process_count} processes")
    documents = documents[process_index::process_count].shuffle(seed=seed).repeat()
    tokens = documents.map(_document_tokens(tokenizer)).to_iter_dataset()
    if not document_alignment:
        rows = ConcatThenSplitIterDataset(tokens, length_struct={"tokens": seq_len + 1})
        rows = WindowShuffleIterDataset(rows, window_size=shuffle_window, seed=seed)
        return rows.batch(batch_size, drop_remainder=True).map(_rows)
    if seq_len % document_alignment:
        raise ValueError(f"seq_len={seq_len} is not a multiple of document_alignment={document_alignment}")
    padding_id = tokenizer.end_of_document_id
    tokens = tokens.map(_padded_to_multiple(document_alignment, padding_id))
    rows = ConcatThenSplitIterDataset(tokens, length_struct={"tokens": seq_len, "real": seq_len})
    rows = WindowShuffleIterDataset(rows, window_size=shuffle_window, seed=seed)
    return rows.batch(batch_size, drop_remainder=True).map(_aligned_rows(padding_id))


class CheckpointableIterator:
    """A grain iterator whose state is JSON bytes, for `grain.checkpoint.CheckpointSave/Restore`.

    grain 0.2.18's concat-then-split state holds tuples that its own JSON checkpoints turn into
    lists, and a restored list never equals the tuple marking "no remainder", so a restored
    iterator would skip ahead. The tuples are put back here before the state is set.
    """

    def __init__(self, dataset: grain.IterDataset):
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iterator)

    def get_state(self) -> bytes:
        return json.dumps(self._iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state, object_hook=_remainder_slices_as_tuples))

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; nothing is prefetched here."""


def _remainder_slices_as_tuples(mapping: dict) -> dict:
    if "remainder_slices" in mapping:
        mapping["remainder_slices"] = {name: tuple(span) for name, span in mapping["remainder_slices"].items()}
    return mapping


def evaluation_rows(source, tokenizer: Tokenizer, length: int, max_documents: int = 0):
    """The first `length` tokens of each held-out document, padded.

    Returns:
      tokens: int32 [documents, length] (a short document ends with end-of-document, then padding 0).
      mask: bool [documents, length], True on real tokens.
      bytes_per_token: UTF-8 bytes of the evaluated text per evaluated token (converts nats/token
        into bits/byte).
    """
    count = len(source) if not max_documents else min(max_documents, len(source))
    tokens = np.zeros((count, length), np.int32)
    mask = np.zeros((count, length), bool)
    total_bytes = 0
    tokenize = _document_tokens(tokenizer)
    for row in range(count):
        ids = tokenize(source[row])["tokens"][:length]
        tokens[row, :len(ids)] = ids
        mask[row, :len(ids)] = True
        total_bytes += len(tokenizer.decode(ids).encode("utf-8"))
    return tokens, mask, float(total_bytes / mask.sum())


def unigram_entropy(source, tokenizer: Tokenizer, max_tokens: int = 20_000_000) -> dict:
    """Entropy of the token frequencies of the documents (the loss of the best context-free model).

    Reads documents in order until `max_tokens` tokens are counted. Returns nats per token and
    bits per byte.
    """
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    total_bytes = 0
    tokenize = _document_tokens(tokenizer)
    for index in range(len(source)):
        example = source[index]
        ids = tokenize(example)["tokens"]
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
        total_bytes += len(example["text"])
        if counts.sum() >= max_tokens:
            break
    probabilities = counts[counts > 0] / counts.sum()
    nats = float(-(probabilities * np.log(probabilities)).sum())
    return {"nats_per_token": nats, "bits_per_byte": float(nats / math.log(2) * counts.sum() / total_bytes),
            "tokens_counted": int(counts.sum())}
