"""Recall scoring counts the labelled positions only; long-document loss by position is causal and bucketed right."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import MICRO_MODEL
from ttt.configs.train import MeshConfig
from ttt.train import long_documents, recall, step, tasks
from ttt.train import mesh as mesh_lib
from ttt.train.tokenizers import ByteTokenizer

CONFIDENCE = 10.0  # the fake models' logit of their predicted token (every other logit is 0)


def correct_loss(vocab_size: int) -> float:
    return math.log(1 + (vocab_size - 1) * math.exp(-CONFIDENCE))


def wrong_loss(vocab_size: int) -> float:
    return math.log(math.exp(CONFIDENCE) + vocab_size - 1)


class TableModel(nnx.Module):
    """A fake model that knows every row it will be asked about and what to predict there.

    `right[length]` (bool [rows, length - 1]) says where it predicts the true next token; elsewhere
    it predicts another token. Given a batch, it finds each row among the rows it knows.
    """

    def __init__(self, examples: list[tasks.TaskExamples], right: dict[int, np.ndarray], vocab_size: int):
        self.vocab_size = vocab_size
        tables = {}
        for task in examples:
            targets = task.ids[:, 1:]
            predictions = np.where(right[task.context_length], targets, (targets + 1) % vocab_size)
            tables[str(task.context_length - 1)] = nnx.Variable(jnp.stack([task.ids[:, :-1], predictions]))
        self.tables = nnx.Dict(tables)

    def __call__(self, ids):
        inputs, predictions = self.tables[str(ids.shape[1])][...]
        row = jnp.argmax((ids[:, None, :] == inputs[None]).all(axis=-1), axis=1)
        return CONFIDENCE * jax_one_hot(predictions[row], self.vocab_size)


def jax_one_hot(ids, vocab_size):
    return (ids[..., None] == jnp.arange(vocab_size)).astype(jnp.float32)


def test_accuracy_and_loss_count_the_labelled_positions_only():
    vocab = 64
    task = tasks.mqar(5, 32, 4, vocab, seed=0)
    labelled = task.mask[:, 1:]
    only_there = TableModel([task], {32: labelled}, vocab)
    everywhere_else = TableModel([task], {32: ~labelled}, vocab)
    # Rows 0 and 1 right on every label; rows 2, 3, 4 wrong on their first label only.
    some = labelled.copy()
    for row in (2, 3, 4):
        some[row, np.flatnonzero(labelled[row])[0]] = False
    partly = TableModel([task], {32: some}, vocab)

    # batch_size 2 pads the last batch of 5 rows: padding must not count.
    result = recall.score(only_there, task, batch_size=2)
    assert result["examples"] == 5 and result["labelled_tokens"] == 20
    assert result["token_accuracy"] == 1.0 and result["exact_match"] == 1.0
    # float32 log-softmax: x - logsumexp(x) near 10 carries an absolute error of a few ulps (1e-6 each).
    assert result["loss"] == pytest.approx(correct_loss(vocab), abs=1e-5)
    result = recall.score(everywhere_else, task, batch_size=2)
    assert result["token_accuracy"] == 0.0 and result["exact_match"] == 0.0
    assert result["loss"] == pytest.approx(wrong_loss(vocab), rel=1e-5)
    result = recall.score(partly, task, batch_size=2)
    assert result["token_accuracy"] == 17 / 20 and result["exact_match"] == 2 / 5
    assert result["loss"] == pytest.approx((17 * correct_loss(vocab) + 3 * wrong_loss(vocab)) / 20, rel=1e-5)


def test_needle_accuracy_by_length_and_depth(tmp_path):
    """Right on every row whose needle is at depth 0; at depth 1 right on all answer tokens but the last."""
    examples = [tasks.passkey(ByteTokenizer(), length, [0.0, 1.0], 2, seed=length) for length in (280, 320)]
    right = {}
    for task in examples:
        labelled = task.mask[:, 1:]
        right[task.context_length] = labelled.copy()
        right[task.context_length][task.depth == 1.0, -1] = False
    model = TableModel(examples, right, 256)
    report = recall.score_needles(model, examples, batch_size=4)
    answer_tokens = 6  # " " + 5 digits
    for entry in report["by_length"]:
        assert entry["exact_match"] == 0.5
        assert entry["token_accuracy"] == (4 * answer_tokens - 2) / (4 * answer_tokens)
    cells = {(e["context_length"], e["depth"]): e for e in report["by_length_and_depth"]}
    assert set(cells) == {(280, 0.0), (280, 1.0), (320, 0.0), (320, 1.0)}
    for length in (280, 320):
        assert cells[(length, 0.0)]["exact_match"] == 1.0 and cells[(length, 1.0)]["exact_match"] == 0.0
        assert cells[(length, 1.0)]["token_accuracy"] == (answer_tokens - 1) / answer_tokens

    paths = recall.write_needle_reports({"fake": report, "fake/2": report}, str(tmp_path), "passkey")
    assert [os.path.basename(p) for p in paths] == ["recall.json", "recall_accuracy.png", "needle_heatmap_fake.png",
                                                    "needle_heatmap_fake_2.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    with open(paths[0]) as f:
        assert json.load(f)["models"]["fake"]["by_length"][0]["context_length"] == 280


MESH = mesh_lib.make_mesh(MeshConfig())  # 8-way data parallel


@pytest.fixture(scope="module")
def tiny_lm():
    """The training tests' micro hybrid (TTT-Linear + sliding window), created by their compiled initializer."""
    with mesh_lib.activate(MESH):
        return step.create_model(MICRO_MODEL, MESH, seed=0)


def test_scoring_a_real_lm_matches_its_own_loss(tiny_lm):
    # 48 tokens: the shape of the long-document test below, so the compiled loss is shared.
    task = tasks.mqar(8, 48, 4, 64, seed=1)
    with mesh_lib.activate(MESH):
        result = recall.score(tiny_lm, task, batch_size=8, mesh=MESH)
        per_token = np.asarray(step.per_token_losses(tiny_lm, task.ids), np.float64)
    labelled = task.mask[:, 1:]
    assert result["labelled_tokens"] == 32 and 0.0 <= result["token_accuracy"] <= 1.0
    assert result["loss"] == pytest.approx(per_token[labelled].mean(), rel=1e-5)
    # The check above tells the two apart: the mean over every position is farther than its tolerance.
    assert abs(per_token.mean() - per_token[labelled].mean()) > 10 * 1e-5 * per_token[labelled].mean()


def test_settings_the_model_cannot_read_are_refused(tiny_lm):
    with pytest.raises(ValueError, match="model's vocab_size is 256"):
        recall.score(tiny_lm, tasks.mqar(2, 32, 4, 512, seed=0))
    task = tasks.mqar(2, 32, 4, 64, seed=0)
    with pytest.raises(ValueError, match="labels position 0"):
        recall.score(tiny_lm, tasks.TaskExamples(task.ids, np.ones_like(task.mask)))


@pytest.mark.parametrize("length, per_octave", [(2, 1), (33, 1), (1000, 2), (4097, 4)])
def test_position_buckets_partition_the_positions_on_a_log_scale(length, per_octave):
    buckets = long_documents.position_buckets(length, per_octave)
    assert buckets[0][0] == 1 and buckets[-1][1] == length - 1
    assert all(last + 1 == next_first for (_, last), (next_first, _) in zip(buckets[:-1], buckets[1:]))
    for first, last in buckets:
        assert first <= last and (last + 1) / first <= 2 ** (1 / per_octave) + 1 / first + 1e-9


def test_loss_by_position_averages_each_bucket():
    losses = np.random.default_rng(0).random((3, 99))
    report = long_documents.loss_by_position(losses, bytes_per_token=2.0, per_octave=2)
    for entry in report["by_position"]:
        first, last = entry["positions"]
        values = [losses[d, p - 1] for d in range(3) for p in range(first, last + 1)]
        assert entry["loss"] == pytest.approx(sum(values) / len(values))
        assert entry["bits_per_byte"] == pytest.approx(entry["loss"] / math.log(2) / 2.0)
        assert entry["tokens"] == len(values)
    assert report["loss"] == pytest.approx(losses.mean())


def test_long_documents_are_read_causally_and_reported(tiny_lm, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a_long.txt").write_text("To be, or not to be, that is the question. " * 3)
    (folder / "b_short.txt").write_text("Too short.")
    (folder / "c_long.txt").write_text("In the beginning was the word; " * 4)
    documents = long_documents.load_long_documents(str(folder), ByteTokenizer(), 48)
    assert documents["names"] == ["a_long.txt", "c_long.txt"] and documents["tokens"].shape == (2, 48)
    assert ByteTokenizer().decode(documents["tokens"][1]) == ("In the beginning was the word; " * 4)[:48]
    with pytest.raises(ValueError, match="no document .* holds 1000 tokens"):
        long_documents.load_long_documents(str(folder), ByteTokenizer(), 1000)

    # Score first: changing the last 16 tokens changes no loss of a token before them.
    with mesh_lib.activate(MESH):
        losses = long_documents.position_losses(tiny_lm, documents["tokens"] % 64, MESH)
        changed = documents["tokens"] % 64
        changed[:, 32:] = (changed[:, 32:] + 7) % 64
        changed_losses = long_documents.position_losses(tiny_lm, changed, MESH)
        report = long_documents.evaluate_long_documents(tiny_lm, {**documents, "tokens": documents["tokens"] % 64},
                                                        mesh=MESH)
    assert np.array_equal(losses[:, :31], changed_losses[:, :31])
    assert not np.allclose(losses[:, 31:], changed_losses[:, 31:])
    assert report["length"] == 48 and report["loss"] == pytest.approx(losses.mean(), rel=1e-6)
    paths = long_documents.write_long_document_reports({"tiny": report}, str(tmp_path / "out"), source="docs",
                                                       training_length=16)
    assert all(os.path.getsize(p) > 0 for p in paths)
