"""A TFDS builder that writes the documents of a text source into ArrayRecord shards.

The train/validation split is by document: a document's name is hashed, and the document goes to
validation when the hash falls below `validation_fraction`, so adding files never moves an
existing document between splits, and no document is ever cut between the two splits.
Works without TensorFlow (`file_format="array_record"`, read back with `as_data_source`).

A build says what it builds from what (documents, bytes, files skipped) instead of tfds' messages
about downloads, which would be about nothing here; tfds' progress bars show only on a terminal.
"""

import hashlib
import os
import sys

import tensorflow_datasets as tfds

from ttt.configs.train import DataConfig
from ttt.train.sources import DocumentSource, open_source

SPLITS = ("train", "validation")


def validation_names(names, validation_fraction: float) -> set[str]:
    """Names of the documents held out; at least one, and never all of them."""
    if len(names) < 2:
        raise ValueError(f"the data source has {len(names)} document(s); at least 2 are needed to hold one out "
                         "for validation")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction}; expected a fraction between 0 and 1")

    def position(name: str) -> float:
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64

    ranked = sorted(names, key=position)
    held_out = {name for name in ranked if position(name) < validation_fraction}
    held_out = held_out or {ranked[0]}
    return held_out - {ranked[-1]}


class TextDocuments(tfds.core.GeneratorBasedBuilder):
    """Named text documents, split into train and validation by document."""

    VERSION = tfds.core.Version("1.0.0")

    # No checksums file lives next to this code (nothing is downloaded). Saying so also keeps tfds
    # from resolving the module's folder through `importlib_resources`, a package it does not
    # declare as a dependency.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(self, *, documents: DocumentSource, validation_fraction: float, **kwargs):
        self._documents = documents
        self._validation_fraction = validation_fraction
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._documents.description,
            features=tfds.features.FeaturesDict({"name": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    def _log_download_bytes(self) -> None:
        print(f"building a dataset from {self._documents.description}: {len(self._documents.names)} documents "
              f"into {self.data_dir}", flush=True)

    def _log_download_done(self) -> None:
        print(f"dataset written to {self.data_dir}", flush=True)

    def _split_generators(self, dl_manager):
        texts = {name: self._documents.read(name) for name in self._documents.names}
        texts = {name: text for name, text in texts.items() if text is not None}
        if not texts:
            raise ValueError(f"{self._documents.description}: none of its {len(self._documents.names)} files is "
                             f"readable text (UTF-8 without NUL bytes, not blank), e.g. {self._documents.names[0]}")
        held_out = validation_names(tuple(texts), self._validation_fraction)
        skipped = len(self._documents.names) - len(texts)
        print(f"read {len(texts)} documents, {sum(len(t.encode()) for t in texts.values()) / 1e6:.1f} MB of text"
              f"{f' ({skipped} skipped: not readable text)' if skipped else ''}: {len(texts) - len(held_out)} for "
              f"training, {len(held_out)} held out", flush=True)
        return {
            "train": self._generate_examples({n: t for n, t in texts.items() if n not in held_out}),
            "validation": self._generate_examples({n: t for n, t in texts.items() if n in held_out}),
        }

    def _generate_examples(self, texts: dict[str, str]):
        for name, text in texts.items():
            yield name, {"name": name, "text": text}


def default_data_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "ttt", "datasets")


def prepare(config: DataConfig) -> TextDocuments:
    """Build the ArrayRecord shards of `config.source` unless an identical build exists; return the builder.

    Builds are keyed by the source's fingerprint (its files' paths, sizes and times), so an edited
    source is rebuilt and an unchanged one is reused. Sets tfds' progress bars (a process-wide setting)
    on when stderr is a terminal, off otherwise.
    """
    documents = open_source(config.source, config.max_documents)
    key = f"{documents.fingerprint}-{config.validation_fraction}"
    data_dir = os.path.join(os.path.expanduser(config.data_dir or default_data_dir()), key)
    builder = TextDocuments(documents=documents, validation_fraction=config.validation_fraction, data_dir=data_dir)
    # tfds' progress bars write carriage returns and escape codes: noise in a log file.
    tfds.display_progress_bar(sys.stderr.isatty())
    builder.download_and_prepare()
    return builder


def data_sources(builder: TextDocuments) -> dict:
    """`{split: random-access source of {"name": bytes, "text": bytes}}`."""
    return {split: builder.as_data_source(split=split) for split in SPLITS}
