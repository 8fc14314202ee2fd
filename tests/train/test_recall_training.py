"""Training and evaluating on a recall task: MQAR batches, the masked train step, ttt-train/ttt-eval flags, the study."""

import dataclasses
import json
import os
import re
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from tests.train.conftest import MICRO_FLAGS, MICRO_MODEL
from ttt import configs
from ttt.configs.train import DataConfig, TrainConfig
from ttt.models import LM
from ttt.train import cli, step, task_data, task_eval

MQAR_DATA = DataConfig(source="mqar", seq_len=32, num_pairs=3)
# The micro model with sliding-window attention only: the mask's path does not depend on the mixer, and
# this compiles fastest.
SWA_MODEL = dataclasses.replace(MICRO_MODEL, layer_pattern="swa")
MQAR_FLAGS = [flag for flag in MICRO_FLAGS if not flag.startswith("--data.")] + [
    "--model.layer-pattern=swa", "--data.source=mqar", "--data.seq-len=32", "--data.num-pairs=3", "--steps=2"]


def test_mqar_batches_are_the_task_rows_plus_an_unlabelled_pad_and_resume_exactly():
    batches = task_data.TaskBatches(MQAR_DATA, vocab_size=64, batch_size=4)
    first, _ = next(batches), next(batches)
    state = batches.get_state()
    third = next(batches)
    ids, mask = first
    assert ids.shape == mask.shape == (4, 33) and not mask[:, -1].any() and (ids[:, -1] == 0).all()
    # Labels sit where the task puts them: each follows its key, with the value paired with that key.
    assert (mask.sum(axis=1) == 3).all()
    for row, labels in zip(ids, mask):
        pairs = dict(zip(row[0:6:2].tolist(), row[1:6:2].tolist()))
        assert all(row[t] == pairs[int(row[t - 1])] for t in np.flatnonzero(labels))
    resumed = task_data.TaskBatches(MQAR_DATA, vocab_size=64, batch_size=4)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)[0], third[0])
    assert not np.array_equal(first[0], third[0])
    held_out = task_data.held_out_mqar(MQAR_DATA, 64, 4).ids
    assert not any((held_out == row[:32]).all(axis=1).any() for row in np.concatenate([first[0], third[0]]))


def test_masked_train_step_follows_the_labelled_positions_only():
    # The step's loss and update equal the mean loss over the labelled targets and its gradient, computed
    # here from the unmasked per-token losses.
    rows = task_data.mqar_rows(MQAR_DATA, SWA_MODEL.vocab_size, 4, (0,))
    tokens, mask = rows.ids[None], rows.mask[None]
    reference = LM(SWA_MODEL, rngs=nnx.Rngs(0))

    def labelled_mean(model):
        _, per_token = model.loss(rows.ids)
        labelled = rows.mask[:, 1:]
        return (per_token * labelled).sum() / labelled.sum()

    expected_loss, expected_grads = nnx.jit(nnx.value_and_grad(labelled_mean))(reference)
    model = LM(SWA_MODEL, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    result = step.train_step(model, optimizer, tokens, 1.0, mask)
    np.testing.assert_allclose(result["loss"], expected_loss, rtol=1e-5)
    # With SGD at rate 1, the update is minus the gradient.
    after = nnx.state(model, nnx.Param)
    moved = jax.tree.map(lambda b, a: b - np.asarray(a), before, after)
    jax.tree.map(lambda m, g: np.testing.assert_allclose(m, g, rtol=2e-4, atol=1e-7), moved,
                 jax.tree.map(np.asarray, expected_grads))


def test_train_and_eval_on_mqar_from_the_command_line(tmp_path):
    workdir = str(tmp_path / "run")
    trained = cli.run_train(MQAR_FLAGS + ["--workdir", workdir])
    with open(os.path.join(workdir, "eval", "mqar.json")) as f:
        stored = json.load(f)["settings"]
    assert stored == trained["mqar"] and set(stored) == {"32:3"} and stored["32:3"]["labelled_tokens"] == 256 * 3
    report = cli.run_eval(["--checkpoint", workdir, "--tasks.mqar=48:4", "--tasks.examples=16",
                           "--out", str(tmp_path / "eval")])
    # The run's own held-out rows score as after training; the extra setting has its own rows.
    assert report["mqar"]["32:3"] == stored["32:3"] and report["mqar"]["48:4"]["labelled_tokens"] == 16 * 4
    with pytest.raises(SystemExit, match="passkey, needle and long documents need a text model"):
        cli.eval_main(["--checkpoint", workdir, "--tasks.passkey-lengths", "512"])


@pytest.mark.parametrize("flags, message", [  # checked when the flags are parsed, or when the examples are made
    (["--tasks.mqar=16:5"], "MQAR with seq_len=16 holds 1 .. 4 key-value pairs"),
    (["--tasks.mqar=64x4"], "expected LENGTH:PAIRS"),
    (["--tasks.passkey-lengths", "100"], "context_length=100 is shorter than the passkey prompt"),
    (["--tasks.long-documents=pystdlib", "--tasks.long-length=1"], "tasks.long_length=1; expected >= 2"),
    (["--tasks.depths", "1.5"], "tasks.depths=.*fractions in \\[0, 1\\]"),
])
def test_impossible_task_settings_stop_before_any_work(trained, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stopped:
        cli.eval_main(["--checkpoint", trained.config.workdir, "--out", str(tmp_path)] + flags)
    said = re.sub(r"[\s│]+", " ", f"{stopped.value} {capsys.readouterr().err}")  # tyro boxes and wraps its errors
    assert re.search(message, said), said
    assert not os.path.exists(tmp_path / "report.json")


def test_lengths_full_attention_cannot_read_are_refused():
    config = TrainConfig(model=configs.get("transformer-tiny", max_seq_len=256))
    with pytest.raises(ValueError, match="MQAR setting 512:8 of 512 tokens exceeds max_seq_len=256"):
        task_eval.prepare(task_eval.TaskEvalArgs(mqar="512:8"), config, None, None)


def test_impossible_training_task_is_a_clear_error():
    with pytest.raises(ValueError, match="data.num_pairs=9; expected 1 .. 8"):
        dataclasses.replace(MQAR_DATA, num_pairs=9)
    with pytest.raises(ValueError, match="MQAR with vocab_size=6 has 2 distinct keys"):
        task_data.TaskBatches(MQAR_DATA, vocab_size=6, batch_size=2)


def test_study_smoke_writes_results_with_every_family_section(data_dir, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import study

    results = study.main(["--smoke", "--families=swa,ttt-e2e", "--out", str(tmp_path / "out"),
                          "--workdir", str(tmp_path / "runs"), "--data-dir", data_dir])
    for family in results["families"].values():
        assert [e["step"] for e in family["mqar"]["curve"]] == [2]
        assert family["text"]["long_documents"]["length"] == 512
    page = (tmp_path / "out" / "RESULTS.md").read_text()
    for heading in ("## Multi-query associative recall", "## Loss by position on long documents",
                    "## Passkey and needle in a haystack"):
        assert heading in page
    assert (tmp_path / "out" / "study_mqar_curves.png").read_bytes()[:4] == b"\x89PNG"
    # Parameter matching picks the SwiGLU width that brings the count closest to attention's.
    models = study.matched_families(study.SMOKE, ["attention", "ttt-mlp", "ttt-e2e"])
    counts = {name: step.count_parameters(config) for name, config in models.items()}
    assert abs(counts["ttt-mlp"] / counts["attention"] - 1) < 0.05
    assert abs(counts["ttt-e2e"] / counts["attention"] - 1) < 0.05
    assert models["attention"].mlp_hidden_size == study.SMOKE.mlp_hidden_size
