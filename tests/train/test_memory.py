"""Memory: reading in two calls against one, a hybrid's pieces against one pass, save and load, refusal, size,
and the command lines (ttt-read, ttt-generate --memory, ttt-eval --memory)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import MICRO_MODEL
from ttt.models import LM, generate
from ttt.models import memory as memory_state_lib
from ttt.models.info import abstract_model
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import cli, memory_cli, memory_io
from ttt.train import memory as memory_lib
from ttt.train import mesh as mesh_lib
from ttt.train.tokenizers import ByteTokenizer

# Every layer learns while it reads (one TTT-Linear, one TTT-MLP block, both with the pre-convolution):
# reading continues exactly across calls.
TTT_MODEL = dataclasses.replace(MICRO_MODEL, layer_pattern="ttt_linear,ttt_mlp",
                                attention=dataclasses.replace(MICRO_MODEL.attention, sliding_window=None),
                                pre_conv=True)
PIECE = 16  # = the mini-batch size; the reads below use pieces of 16 and 5 tokens only


@pytest.fixture(scope="module")
def ttt_model():
    return LM(TTT_MODEL, rngs=nnx.Rngs(0))


def _tokens(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (1, length)).astype(np.int32)


def _assert_states_close(actual, expected):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("split", [16, 21], ids=["at-a-mini-batch-boundary", "inside-a-mini-batch"])
def test_reading_a_then_b_equals_reading_a_plus_b(ttt_model, split):
    ids = _tokens(37)
    parameters = jax.tree.map(np.asarray, nnx.state(ttt_model, nnx.Param))
    whole = memory_lib.read(ttt_model, ids, piece_length=PIECE, source="a+b")
    first = memory_lib.read(ttt_model, ids[:, :split], piece_length=PIECE, source="a")
    both = memory_lib.read(ttt_model, ids[:, split:], first, piece_length=PIECE, source="b")
    _assert_states_close(both.state, whole.state)
    assert (both.info.tokens_read, both.info.sources, whole.info.sources) == (37, ("a", "b"), ("a+b",))
    position = both.state["stages"][0][0]["mixer"]["ttt"]["position"]
    np.testing.assert_array_equal(position, [37 % TTT_MODEL.ttt.mini_batch_size])
    # Reading trains the fast weights of the memory, never the model's own parameters.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(ttt_model, nnx.Param)), parameters)
    # A reset is the initial memory: reading from it equals reading from nothing.
    _assert_states_close(memory_lib.read(ttt_model, ids[:, :split], memory_lib.initial(ttt_model),
                                         piece_length=PIECE).state, first.state)


def test_a_hybrid_reads_pieces_as_one_pass_and_keeps_no_attention_state():
    """Within one read, attention is carried from piece to piece (exact); the memory drops it."""
    model = LM(MICRO_MODEL, rngs=nnx.Rngs(0))
    ids = _tokens(48, seed=1)
    memory = memory_lib.read(model, ids, piece_length=PIECE)
    _, cache = nnx.jit(lambda model, ids: model.extend(ids))(model, ids)
    _assert_states_close(memory.state, memory_state_lib.memory_state(model, cache))
    ttt_block, attention_block = memory.state["stages"][0]
    assert set(ttt_block) == {"mixer"} and set(attention_block) == set()
    assert set(ttt_block["mixer"]) == {"ttt", "conv"}


def test_saved_memory_loads_bit_identical_and_reads_on_identically(ttt_model, tmp_path):
    memory = memory_lib.read(ttt_model, _tokens(21), piece_length=PIECE, source="doc")
    loaded = memory_io.load(memory_io.save(memory, str(tmp_path / "memory")), ttt_model)
    assert loaded.info == memory.info and loaded.nbytes == memory.nbytes

    def assert_identical(a, b):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    jax.tree.map(assert_identical, loaded.state, memory.state)
    more = _tokens(PIECE, seed=2)
    jax.tree.map(assert_identical, memory_lib.read(ttt_model, more, loaded, piece_length=PIECE).state,
                 memory_lib.read(ttt_model, more, memory, piece_length=PIECE).state)


def test_memory_of_another_model_is_refused(ttt_model, tmp_path):
    directory = memory_io.save(memory_lib.initial(ttt_model), str(tmp_path / "memory"))
    # The configuration is compared before any parameter is looked at: abstract models suffice.
    wider = abstract_model(dataclasses.replace(TTT_MODEL, hidden_size=64))
    with pytest.raises(ValueError, match="made by a model of another configuration"):
        memory_io.load(directory, wider)
    retrained = LM(TTT_MODEL, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="same configuration but other parameters"):
        memory_io.load(directory, retrained)
    with pytest.raises(ValueError, match="same configuration but other parameters"):
        memory_lib.read(retrained, _tokens(5), memory_lib.initial(ttt_model))
    with pytest.raises(ValueError, match="learns nothing while it reads"):
        memory_lib.initial(abstract_model(dataclasses.replace(MICRO_MODEL, layer_pattern="swa")))


def test_memory_size_does_not_depend_on_tokens_read(ttt_model):
    """The memory after 1K and after 100K tokens, abstractly (nothing is run)."""

    def memory_after(num_tokens):
        ids = jax.ShapeDtypeStruct((1, num_tokens), np.int32)
        return nnx.eval_shape(lambda model, ids: memory_state_lib.memory_state(model, model.extend(ids)[1]),
                              ttt_model, ids)

    short, long = memory_after(1_000), memory_after(100_000)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), short) == jax.tree.map(lambda a: (a.shape, a.dtype), long)
    initial = memory_lib.initial(ttt_model)
    assert jax.tree.map(lambda a: a.shape, initial.state) == jax.tree.map(lambda a: a.shape, long)
    assert initial.nbytes == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(long))


def test_read_append_generate_and_evaluate_from_the_command_line(trained, tmp_path):
    documents = {"a.txt": "def first(x):\n    return x + 1\n", "b.txt": "def other(y):\n    return y * 2\n"}
    for name, text in documents.items():
        (tmp_path / name).write_text(text)
    directory = str(tmp_path / "memory")
    common = ["--checkpoint", trained.config.workdir, "--memory", directory]
    assert memory_cli.run_read(common + ["--input", str(tmp_path / "a.txt")]).sources == ("a.txt",)
    info = memory_cli.run_read(common + ["--input", str(tmp_path / "b.txt")])
    assert info.sources == ("a.txt", "b.txt") and info.tokens_read == sum(len(t) + 1 for t in documents.values())

    mesh = mesh_lib.make_mesh(cli.GenerateArgs.__dataclass_fields__["mesh"].default)
    with mesh_lib.activate(mesh):
        model, _ = checkpoint_lib.load_trained_model(trained.config.workdir, mesh)
        memory = memory_io.load(directory, model, mesh)
        prompt = ByteTokenizer().encode("def ")[None]
        expected = generate(model, prompt, 6, temperature=0, cache=memory_lib.to_cache(model, memory))
    text = cli.run_generate(common + ["--prompt", "def ", "--max-new-tokens=6", "--temperature=0"])
    assert text == ByteTokenizer().decode(np.asarray(expected)[0, 4:])

    report = cli.run_eval(common + ["--max-length=32", "--batch-size=8", "--max-documents=8", "--out", str(tmp_path)])
    assert report["memory"]["tokens_read"] == info.tokens_read and np.isfinite(report["loss"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a memory")
    with pytest.raises(SystemExit, match="holds files but no memory"):
        memory_cli.read_main(["--checkpoint", trained.config.workdir, "--memory", str(tmp_path / "other"),
                              "--input", str(tmp_path / "a.txt")])
