"""The task generators against their definitions: MQAR (Zoology), passkey (Landmark Attention), S-NIAH (RULER)."""

import itertools
import re

import numpy as np
import pytest

from ttt.train import tasks
from ttt.train.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()


def _within_sigmas(counts: np.ndarray, probabilities: np.ndarray, trials: int, sigmas: float = 5.0) -> bool:
    """Every count is within `sigmas` binomial standard deviations of trials * probability."""
    expected = trials * probabilities
    return bool(np.all(np.abs(counts - expected) <= sigmas * np.sqrt(expected * (1 - probabilities)) + 1))


@pytest.mark.parametrize("seq_len, num_pairs", [(64, 4), (128, 8), (256, 16), (512, 64), (30, 7)])
def test_mqar_rows_follow_the_definition(seq_len, num_pairs):
    vocab_size = 8192 if seq_len == 512 else 64
    examples = tasks.mqar(40, seq_len, num_pairs, vocab_size, seed=1)
    ids, mask = examples.ids, examples.mask
    assert ids.shape == mask.shape == (40, seq_len) and ids.dtype == np.int32
    context = 2 * num_pairs
    for row, labels in zip(ids, mask):
        keys, values = row[0:context:2], row[1:context:2]
        assert np.all((keys >= 1) & (keys < vocab_size // 2)) and len(set(keys)) == num_pairs
        assert np.all((values >= vocab_size // 2) & (values < vocab_size)) and len(set(values)) == num_pairs
        labelled = np.flatnonzero(labels)
        assert len(labelled) == num_pairs
        assert np.all((labelled >= context + 1) & ((labelled - context) % 2 == 1))
        # Every key is asked exactly once, and each label is the value paired with the key before it.
        assert sorted(row[labelled - 1]) == sorted(keys)
        pairs = dict(zip(keys.tolist(), values.tolist()))
        for t in labelled:
            assert row[t] == pairs[int(row[t - 1])]


def test_mqar_without_random_fill_leaves_zeros_and_is_seeded():
    examples = tasks.mqar(50, 64, 4, 64, seed=3, random_non_queries=False)
    query_region = examples.ids[:, 8:]
    asked = examples.mask[:, 8:] | np.roll(examples.mask[:, 8:], -1, axis=1)
    assert np.all(query_region[~asked] == 0) and np.all(query_region[asked] != 0)
    again = tasks.mqar(50, 64, 4, 64, seed=3, random_non_queries=False)
    assert np.array_equal(examples.ids, again.ids) and np.array_equal(examples.mask, again.mask)
    assert not np.array_equal(examples.ids, tasks.mqar(50, 64, 4, 64, seed=4, random_non_queries=False).ids)


def test_mqar_gaps_follow_zoologys_power_law():
    # One pair: the query slot is drawn from p(slot i) ~ (i + 1) ** (a - 1), computed here from the paper's formula.
    trials, slots, power_a = 20000, 7, 0.01
    examples = tasks.mqar(trials, 2 + 2 * slots, 1, 64, seed=5, power_a=power_a)
    slot = (np.flatnonzero(examples.mask.reshape(-1)) % examples.context_length - 3) // 2
    p = np.arange(1, slots + 1) ** (power_a - 1.0)
    p /= p.sum()
    assert _within_sigmas(np.bincount(slot, minlength=slots), p, trials)
    # Two pairs: slots drawn one after the other without replacement; slot s is used with probability
    # p_s + sum_{t != s} p_t p_s / (1 - p_t).
    examples = tasks.mqar(trials, 4 + 2 * slots, 2, 64, seed=6, power_a=power_a)
    rows, positions = np.nonzero(examples.mask)
    used = np.bincount((positions - 5) // 2, minlength=slots)
    inclusion = np.array([p[s] + sum(p[t] * p[s] / (1 - p[t]) for t in range(slots) if t != s) for s in range(slots)])
    assert np.all(np.bincount(rows) == 2)
    assert _within_sigmas(used, inclusion, trials)


@pytest.mark.parametrize("population, size", [(7, 3), (4, 4), (40, 2)])
def test_uniform_draws_are_distinct_and_uniform(population, size):
    # (7, 3) and (40, 2) take the rejection path, (4, 4) the Gumbel keys.
    trials = 12000
    draws = tasks.sample_without_replacement(np.random.default_rng(0), trials, population, size)
    assert draws.shape == (trials, size)
    assert all(len(set(row)) == size for row in draws.tolist())
    uniform = np.full(population, 1 / population)
    for column in range(size):  # every draw, in order, is uniform over the population
        assert _within_sigmas(np.bincount(draws[:, column], minlength=population), uniform, trials)
    ordered = {pair: 0 for pair in itertools.permutations(range(population), 2)}
    for first, second in draws[:, :2].tolist():
        ordered[(first, second)] += 1
    pair_probability = np.full(len(ordered), 1 / len(ordered))
    assert _within_sigmas(np.array(list(ordered.values())), pair_probability, trials)


@pytest.mark.parametrize("arguments, message", [
    (dict(seq_len=64, num_pairs=17, vocab_size=8192), "holds 1 .. 16 key-value pairs"),
    (dict(seq_len=64, num_pairs=0, vocab_size=8192), "holds 1 .. 16"),
    (dict(seq_len=64, num_pairs=8, vocab_size=16), "7 distinct keys"),
    (dict(seq_len=64, num_pairs=4, vocab_size=64, power_a=0.0), "power_a"),
])
def test_mqar_settings_that_cannot_exist_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        tasks.mqar(3, seed=0, **arguments)


def _needle_checks(examples, tokenizer, context_length, needle_texts, answers, intro_length):
    assert examples.ids.shape == (len(answers), context_length)
    for row, labels, start, needle, answer in zip(examples.ids, examples.mask, examples.needle_start, needle_texts,
                                                  answers):
        labelled = np.flatnonzero(labels)
        # The labelled positions are exactly the answer at the end of the row.
        assert labelled.tolist() == list(range(context_length - len(labelled), context_length))
        assert tokenizer.decode(row[labelled]).strip() == answer
        assert tokenizer.decode(row[start:]).startswith(needle)
        assert start >= intro_length


def test_passkey_hides_the_number_at_the_asked_depth():
    depths, length = [0.0, 0.25, 0.5, 1.0], 600
    examples = tasks.passkey(BYTES, length, depths, 3, seed=2)
    texts = [BYTES.decode(row) for row in examples.ids]
    answers = [text.rsplit(" ", 1)[1] for text in texts]
    assert all(len(answer) == 5 and answer.isdigit() for answer in answers)
    needles = [tasks.PASSKEY_NEEDLE.format(value=answer) for answer in answers]
    _needle_checks(examples, BYTES, length, needles, answers, len(tasks.PASSKEY_INTRO))
    for text, needle, answer in zip(texts, needles, answers):
        assert text.startswith(tasks.PASSKEY_INTRO)
        assert text.count(needle) == 1 and text.endswith(tasks.PASSKEY_QUESTION + " " + answer)
        assert text.replace(needle, "").count(answer) == 1  # only the answer: the filler never holds it
    # The needle starts at the filler-sentence boundary nearest the depth (sentences are at most 22 bytes).
    haystack = length - len(tasks.PASSKEY_INTRO) - len(needles[0]) - len(tasks.PASSKEY_QUESTION) - 6
    offsets = examples.needle_start - len(tasks.PASSKEY_INTRO)
    assert np.all(np.abs(offsets - examples.depth * haystack) <= 11)
    assert np.array_equal(examples.depth, np.repeat(depths, 3))


class WordTokenizer:
    """A tokenizer that is not byte-level: one id per whitespace-separated word or space run."""

    def __init__(self):
        self.vocabulary: dict[str, int] = {}

    def encode(self, text):
        words = re.findall(r"\s+|\S+", text)
        return np.array([self.vocabulary.setdefault(word, len(self.vocabulary)) for word in words], np.int32)

    def decode(self, ids):
        words = {i: word for word, i in self.vocabulary.items()}
        return "".join(words[int(i)] for i in ids)


def test_passkey_works_with_another_tokenizer():
    tokenizer = WordTokenizer()
    examples = tasks.passkey(tokenizer, 120, [0.0, 1.0], 2, seed=0)
    answers = [tokenizer.decode(row).rsplit(" ", 1)[1] for row in examples.ids]
    needles = [tasks.PASSKEY_NEEDLE.format(value=answer) for answer in answers]
    _needle_checks(examples, tokenizer, 120, needles, answers, len(tokenizer.encode(tasks.PASSKEY_INTRO)))


HAYSTACK = ["First document. It has short sentences; some end in semicolons.\nA new line starts here. " * 6,
            "Second document: another text! Does it ask? Yes. " * 8]


@pytest.mark.parametrize("tokenizer", [BYTES, WordTokenizer()], ids=["bytes", "words"])
def test_needle_is_in_real_text_at_a_sentence_boundary(tokenizer):
    length = 400 if tokenizer is BYTES else 160
    examples = tasks.needle_in_haystack(tokenizer, HAYSTACK, length, [0.0, 0.5, 1.0], 2, seed=4)
    texts = [tokenizer.decode(row) for row in examples.ids]
    answers = [text.rsplit(" ", 1)[1] for text in texts]
    keys = [text.split("What is the special magic number for ")[1].split(" ")[0] for text in texts]
    needles = [tasks.NEEDLE.format(key=key, value=answer) for key, answer in zip(keys, answers)]
    _needle_checks(examples, tokenizer, length, needles, answers, len(tokenizer.encode(tasks.NEEDLE_INTRO)))
    for text, row, start, needle in zip(texts, examples.ids, examples.needle_start, needles):
        assert len(text.split(" ")[-1]) == tasks.NEEDLE_VALUE_DIGITS and text.count(needle) == 1
        before = tokenizer.decode(row[:start])
        assert before == tasks.NEEDLE_INTRO or before.endswith(("\n", ". ", "; ", "! ", "? ", ": "))
        haystack = text.split(tasks.NEEDLE_INTRO, 1)[1].split(tasks.NEEDLE_QUESTION.split("{")[0])[0]
        assert haystack.replace(needle, "") in "".join(HAYSTACK) * 2


def test_needle_settings_that_cannot_exist_are_refused():
    with pytest.raises(ValueError, match="shorter than the needle prompt"):
        tasks.needle_in_haystack(BYTES, HAYSTACK, 100, [0.5], 1, seed=0)
    with pytest.raises(ValueError, match="shorter than the passkey prompt"):
        tasks.passkey(BYTES, 150, [0.5], 1, seed=0)
    with pytest.raises(ValueError, match="haystack documents hold"):
        tasks.needle_in_haystack(BYTES, ["Too short. "], 400, [0.5], 1, seed=0)
    with pytest.raises(ValueError, match="depths"):
        tasks.passkey(BYTES, 600, [1.5], 1, seed=0)
