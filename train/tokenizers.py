"""Tokenizers: byte-level (built in), SentencePiece `.model` files, Hugging Face `tokenizers` `.json` files.

Each has `vocab_size`, `end_of_document_id` (the token appended after every document when
documents are packed), `encode(text) -> int32 [tokens]` and `decode(ids) -> str`.
"""

import os
from typing import Protocol

import numpy as np

# Names an end-of-document token has in common `tokenizers` vocabularies, tried in order.
END_OF_DOCUMENT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer(Protocol):
    vocab_size: int
    end_of_document_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Id 0 (the NUL byte, which readable text never contains) ends a document."""

    vocab_size = 256
    end_of_document_id = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if i != self.end_of_document_id)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model file; its `eos` piece ends a document."""

    def __init__(self, path: str):
        import sentencepiece

        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as error:
            raise ValueError(f"tokenizer {path}: not a SentencePiece model file ({error}); expected a .model "
                             "written by sentencepiece's trainer") from error
        self.vocab_size = self._processor.vocab_size()
        self.end_of_document_id = self._processor.eos_id()
        if self.end_of_document_id < 0:
            raise ValueError(f"SentencePiece model {path} has no end-of-sentence piece (eos_id=-1); documents "
                             "need one to be packed: train it with --eos_id set")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])


class HuggingFaceTokenizer:
    """A `tokenizers` JSON file; the first of `END_OF_DOCUMENT_TOKENS` in its vocabulary ends a document."""

    def __init__(self, path: str):
        import tokenizers

        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as error:  # the Rust library raises a bare Exception for any file it cannot parse
            raise ValueError(f"tokenizer {path}: not a Hugging Face tokenizers file ({error}); expected the .json "
                             "written by `tokenizers.Tokenizer.save`") from error
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        found = [self._tokenizer.token_to_id(token) for token in END_OF_DOCUMENT_TOKENS]
        found = [token_id for token_id in found if token_id is not None]
        if not found:
            raise ValueError(f"tokenizer {path} has none of the end-of-document tokens {END_OF_DOCUMENT_TOKENS}; "
                             "add one as a special token")
        self.end_of_document_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def load_tokenizer(name: str) -> Tokenizer:
    """`"byte"`, or the path of a SentencePiece `.model` or `tokenizers` `.json` file."""
    if name == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {name!r}: expected 'byte' or the path of an existing .model (SentencePiece) "
                         "or .json (Hugging Face tokenizers) file")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path)
    raise ValueError(f"tokenizer {name!r}: unknown file type; expected a .model (SentencePiece) or .json "
                     "(Hugging Face tokenizers) file")


def check_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise if the tokenizer produces ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
                         f"use a model with --model.vocab-size={tokenizer.vocab_size} or more, or a smaller tokenizer")
