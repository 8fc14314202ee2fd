"""Console script `ttt-read`: read text files into a memory folder (appending when it holds one).

    ttt-read --checkpoint=runs/quickstart --input="notes/*.md" --memory=memories/notes
    ttt-generate --checkpoint=runs/quickstart --memory=memories/notes --prompt="..."
    ttt-eval --checkpoint=runs/quickstart --memory=memories/notes
"""

import dataclasses
import os

import numpy as np
import tyro

from ttt.configs.train import MeshConfig, require
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import memory as memory_lib
from ttt.train import memory_io
from ttt.train import mesh as mesh_lib
from ttt.train.cli import TYRO_MARKERS, _console_script, _say
from ttt.train.sources import open_source
from ttt.train.tokenizers import load_tokenizer


@dataclasses.dataclass(frozen=True)
class ReadArgs:
    """Read documents into a memory of a trained model, and save it.

    Attributes:
      checkpoint: a training workdir or a params-only export folder.
      input: a file, a glob ("notes/**/*.md"), a folder or a data preset; every document is read in
        order, each followed by the end-of-document token (as documents are in training).
      memory: the memory folder; when it holds a memory (of this model), reading continues from it.
      piece_length: tokens read per compiled call.
    """

    checkpoint: str
    input: str
    memory: str
    piece_length: int = 2048
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1)

    def __post_init__(self):
        require(bool(self.checkpoint.strip()), "checkpoint", self.checkpoint, "a training workdir or export folder")
        require(bool(self.input.strip()), "input", self.input, "a file, glob, folder or data preset")
        require(bool(self.memory.strip()), "memory", self.memory, "a folder to write the memory to")
        require(self.piece_length >= 1, "piece_length", self.piece_length, ">= 1")


def run_read(argv: list[str]) -> memory_lib.MemoryInfo:
    """`ttt-read`: read the input's documents into the memory folder; print what it holds."""
    args = tyro.cli(ReadArgs, args=argv, prog="ttt-read", config=TYRO_MARKERS)
    directory = os.path.expanduser(args.memory)
    appending = memory_io.is_memory(directory)
    if not appending and os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"--memory={args.memory} is a folder that holds files but no memory; give an empty or new "
                         "folder, or a memory folder to continue")
    documents = open_source(args.input)
    mesh = mesh_lib.make_mesh(args.mesh)
    with mesh_lib.activate(mesh):
        model, config = checkpoint_lib.load_trained_model(args.checkpoint, mesh)
        tokenizer = load_tokenizer(config.data.tokenizer)
        memory = memory_io.load(directory, model, mesh) if appending else None
        read = 0
        for name in documents.names:
            text = documents.read(name)
            if text is None:
                _say(f"skipped {name}: not readable text")
                continue
            ids = np.append(tokenizer.encode(text), tokenizer.end_of_document_id).astype(np.int32)
            memory = memory_lib.read(model, ids, memory, source=name, piece_length=args.piece_length)
            read += 1
        if memory is None:
            raise ValueError(f"--input={args.input}: none of its {len(documents.names)} documents is readable text")
        memory_io.save(memory, directory)
    info = memory.info
    _say(f"read {read} documents into {os.path.abspath(directory)}: {info.tokens_read} tokens in all from "
         f"{len(info.sources)} sources, {memory.nbytes / 2**20:.2f} MiB of state")
    return info


read_main = _console_script(run_read, "ttt-read")
