"""Bad inputs through the public entry points: each gives one clear message (or, for a damaged latest checkpoint
during training, a warning and a resume from the newest intact one), never a traceback or a silent wrong answer."""

import dataclasses
import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.conftest import MICRO_MODEL
from ttt.configs.train import DataConfig
from ttt.models import generate
from ttt.models.inputs import check_token_ids
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import cli, dataset, loop


def _one_line(text: str) -> str:
    """tyro's boxed message as one line (the box wraps long messages)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("flag, message", [
    ("--steps=-1", "steps=-1; expected >= 1"),
    ("--optimizer.learning-rate=-1", "optimizer.learning_rate=-1.0; expected a positive finite number"),
    ("--optimizer.warmup-steps=-5", "optimizer.warmup_steps=-5; expected >= 0"),
    ("--optimizer.grad-clip-norm=nan", "optimizer.grad_clip_norm=nan; expected a finite norm >= 0"),
    ("--model.dtype=float8", "dtype='float8'; expected one of ('float32', 'bfloat16')"),
    ("--model.param-dtype=int8", "param_dtype='int8'; expected one of ('float32', 'bfloat16')"),
    ("--data.validation-fraction=1.5", "data.validation_fraction=1.5; expected a fraction strictly between"),
])
def test_nonsense_training_settings_are_usage_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.train_main([flag])
    assert exit_info.value.code == 2
    assert message in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "temperature=-1.0; expected a finite number >= 0"),
    ("--max-new-tokens=0", "max_new_tokens=0; expected >= 1"),
    ("--top-p=0", "top_p=0.0; expected a mass in (0, 1]"),
])
def test_nonsense_generation_settings_are_usage_errors(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.generate_main(["--checkpoint=unused", "--prompt=x", flag])
    assert exit_info.value.code == 2
    assert message in _one_line(capsys.readouterr().err)


def test_a_workdir_that_is_a_file_or_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for workdir, message in ((tmp_path / "file", "is an existing file; expected a folder"),
                             (tmp_path / "file" / "run", "cannot be created (Not a directory)")):
        with pytest.raises(SystemExit, match=re.escape(f"ttt-train: error: workdir '{workdir}' {message}")):
            cli.train_main([f"--workdir={workdir}"])


@pytest.mark.parametrize("name, content, message", [
    ("fake.model", b"not a protobuf", "not a SentencePiece model file"),
    ("fake.json", b'{"vocab": [1, 2]}', "not a Hugging Face tokenizers file"),
])
def test_a_tokenizer_file_that_is_not_what_it_claims_is_one_line(name, content, message, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit, match=f"ttt-train: error: tokenizer {re.escape(str(tmp_path / name))}: {message}"):
        cli.train_main([f"--workdir={tmp_path / 'run'}", f"--data.tokenizer={tmp_path / name}"])


def test_token_ids_are_checked_for_rank_dtype_and_range():
    with pytest.raises(ValueError, match=r"ids of shape \(5,\); expected \[batch, seq\]"):
        check_token_ids(np.arange(5), 256)
    with pytest.raises(ValueError, match="ids of dtype float32; expected integer token ids"):
        check_token_ids(np.zeros((1, 5), np.float32), 256)
    with pytest.raises(ValueError, match=r"2 token id\(s\) outside \[0, 256\), the first 256 at \[0, 2\]"):
        check_token_ids(np.array([[0, 1, 256], [300, 4, 5]]), 256)
    with pytest.raises(ValueError, match=r"outside \[0, 256\), the first -1 at \[1, 0\]"):
        check_token_ids(jnp.array([[0, 1], [-1, 2]]), 256)
    check_token_ids([[0, 255]], 256)
    # Under jit only rank and dtype can be checked: an out-of-range traced id passes.
    jax.jit(lambda ids: check_token_ids(ids, 256) or ids)(jnp.array([[999]]))
    with pytest.raises(ValueError, match="expected \\[batch, seq\\]"):
        jax.jit(lambda ids: check_token_ids(ids, 256) or ids)(jnp.array([999]))


def test_generate_refuses_a_prompt_id_outside_the_vocabulary(trained):
    for prompt in ([[1, MICRO_MODEL.vocab_size]], [[-3, 1]]):
        with pytest.raises(ValueError, match=rf"prompt_ids holds 1 token id\(s\) outside \[0, {MICRO_MODEL.vocab_size}\)"):
            generate(trained.model, np.array(prompt), 2)


def test_metrics_are_strict_json_lines(trained):
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    with open(os.path.join(trained.config.workdir, "metrics.jsonl")) as f:
        records = [json.loads(line, parse_constant=no_constants) for line in f]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["tokens_per_s"] is None  # no timed step yet: the first step includes compilation
    assert records[1]["tokens_per_s"] > 0 and all(np.isfinite(r["loss"]) for r in records)


def test_a_dataset_build_says_what_it_builds_from_what_without_progress_bar_noise(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(5):
        (folder / f"doc{i}.txt").write_text("x" * (1000 * (i + 1)))
    (folder / "blob.bin").write_bytes(b"\0\1\2")
    dataset.prepare(DataConfig(source=str(folder), data_dir=str(tmp_path / "data"), validation_fraction=0.3))
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"building a dataset from folder {folder}: 6 documents into ")
    assert re.fullmatch(r"read 5 documents, 0\.0 MB of text \(1 skipped: not readable text\): \d for training, "
                        r"\d held out", lines[1])
    assert lines[2].startswith("dataset written to ")
    assert "Downloading" not in captured.out + captured.err
    assert "\r" not in captured.out + captured.err and "\x1b" not in captured.out + captured.err


# Damaged checkpoints. The trained run has one checkpoint (step 2); each test damages a copy.

def _copy(trained, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(trained.config.workdir, workdir)
    return workdir


def _array_files(item_folder: str) -> list[str]:
    """The files holding the array data of a checkpoint item (model, params): orbax writes them in one OCDBT
    database per process; the item's top-level `d/` holds the merged index."""
    return sorted(glob.glob(os.path.join(item_folder, "ocdbt.process_*", "d", "*")))


def _flip_bytes(path: str, count: int = 64, places: int = 1) -> None:
    """Invert `count` bytes at `places` evenly spaced offsets (the first in the middle of the file)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for place in range(places):
            offset = (size // 2 + place * size // places) % size
            f.seek(offset)
            data = f.read(count)
            f.seek(offset)
            f.write(bytes(byte ^ 0xFF for byte in data))


def _damage(step_folder: str, how: str) -> None:
    files = _array_files(os.path.join(step_folder, "model"))
    assert files
    for path in files:
        if how == "flipped bytes":
            _flip_bytes(path)
        elif how == "truncated files":
            os.truncate(path, os.path.getsize(path) // 3)
        elif how == "missing files":
            os.remove(path)
    if how == "half-written step folder":
        shutil.rmtree(os.path.join(step_folder, "model"))
        shutil.rmtree(os.path.join(step_folder, checkpoint_lib.CHECKSUMS))


@pytest.mark.parametrize("how, detail", [
    ("flipped bytes", r"array model/\S+ differs from what was saved \(checksum [0-9a-f]{8}, recorded [0-9a-f]{8}\)"),
    ("truncated files", r"its files cannot be read \(OUT_OF_RANGE: Error reading \"\S+\""),
    ("missing files", r"its files cannot be read \("),
    ("half-written step folder", r"it has no checksums item"),
])
def test_eval_and_generate_refuse_a_damaged_checkpoint_in_one_line(how, detail, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    _damage(os.path.join(workdir, "checkpoints", "2"), how)
    for main, args in ((cli.eval_main, []), (cli.generate_main, ["--prompt=def "])):
        with pytest.raises(SystemExit) as exit_info:
            main([f"--checkpoint={workdir}", *args])
        message = str(exit_info.value.code)
        assert "\n" not in message
        assert re.match(rf"ttt-(eval|generate): error: checkpoint {re.escape(workdir)}/checkpoints/2 is damaged: "
                        rf"{detail}.*; it is the run's only checkpoint", message), message


def test_a_damaged_params_export_is_refused(trained, tmp_path):
    export = checkpoint_lib.export_params(trained.model, trained.config, str(tmp_path / "export"))
    # Several places per file: which parts of an OCDBT data file are still referenced depends on write timing.
    for path in _array_files(os.path.join(export, checkpoint_lib.EXPORT_PARAMS)):
        _flip_bytes(path, places=8)
    with pytest.raises(SystemExit, match=rf"ttt-generate: error: params export {re.escape(export)} is damaged: "):
        cli.generate_main([f"--checkpoint={export}", "--prompt=def "])


def test_training_resumes_from_the_newest_intact_checkpoint_with_a_warning(trained, tmp_path, capfd):
    """A copy of step 2 saved as step 4, then damaged: the run warns, sets step 4 aside and continues from 2."""
    workdir = _copy(trained, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(checkpoints, "2"), os.path.join(checkpoints, "4"))
    _damage(os.path.join(checkpoints, "4"), "flipped bytes")
    # steps=6, stop_after=3: the schedule of test_loop's resume test, so the compiled step is shared.
    run = loop.train(dataclasses.replace(trained.config, workdir=workdir, steps=6), stop_after=3)
    assert sorted(run.losses) == [3]
    err = capfd.readouterr().err
    assert re.search(rf"warning: checkpoint {re.escape(checkpoints)}/4 is damaged: array model/\S+ differs", err)
    assert f"resuming from step 2 instead; the damaged checkpoint is kept as {checkpoints}/4.damaged" in err
    assert sorted(os.listdir(checkpoints)) == ["2", "3", "4.damaged"]


def test_training_never_starts_over_silently_when_every_checkpoint_is_damaged(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    _damage(os.path.join(workdir, "checkpoints", "2"), "truncated files")
    with pytest.raises(checkpoint_lib.DamagedCheckpointError, match=r"every checkpoint in \S+ is damaged \(steps 2\)"):
        loop.train(dataclasses.replace(trained.config, workdir=workdir, steps=6))
