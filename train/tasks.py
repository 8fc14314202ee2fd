"""Synthetic recall tasks: multi-query associative recall (MQAR), passkey retrieval, a needle in a haystack.

Every generator is pure numpy, seeded, and returns `TaskExamples`: token ids [n, seq] and a mask
[n, seq] of the positions whose token is scored (aligned with ids, so `LM.loss(ids, mask)` trains
on the labelled positions only). A labelled token at position t is predicted by the model after
reading ids[:, :t]; column 0 is never labelled.

- `mqar`: Zoology's multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and
  improving recall in efficient language models").
- `passkey`: the passkey prompt of Landmark Attention (Mohtashami & Jaggi 2023): a number hidden in
  repeated filler sentences, asked for at the end.
- `needle_in_haystack`: a single needle (a key and a 7-digit value) in real text, as RULER's S-NIAH
  (Hsieh et al. 2024), the haystack cut from documents the caller gives (held-out text).

Passkey and needle examples are built in token space, so every row has exactly the asked context
length with any tokenizer that has `encode(text) -> ids` and `decode(ids) -> text`.
"""

import dataclasses
import re

import numpy as np

# Rows sampled per block when drawing without replacement, so that memory stays [block, population].
_SAMPLING_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class TaskExamples:
    """Examples of one task at one sequence length.

    Attributes:
      ids: int32 [n, seq] token ids.
      mask: bool [n, seq], True where ids[:, t] is a labelled (scored) target; column 0 is False.
      depth: float64 [n] the needle's depth asked for (0 = start of the haystack, 1 = its end), or
        None for tasks without a needle.
      needle_start: int64 [n] the position of the needle's first token, or None.
    """

    ids: np.ndarray
    mask: np.ndarray
    depth: np.ndarray | None = None
    needle_start: np.ndarray | None = None

    @property
    def context_length(self) -> int:
        return self.ids.shape[1]


def sample_without_replacement(rng: np.random.Generator, rows: int, population: int, size: int,
                               weights: np.ndarray | None = None) -> np.ndarray:
    """int64 [rows, size]: per row, `size` distinct draws from range(population), in draw order.

    Each draw picks among the items not drawn yet with probability proportional to `weights`
    (uniform when None), as `numpy.random.choice(population, size, replace=False, p=weights)`.
    Vectorised over rows with the Gumbel-top-k trick (Kool et al. 2019): the items sorted by
    log(weight) + Gumbel noise, largest first, are such a sequence of draws.
    """
    if not 0 <= size <= population:
        raise ValueError(f"cannot draw {size} distinct items from a population of {population}")
    if weights is None and size * (size - 1) <= 2 * population:
        return _uniform_by_rejection(rng, rows, population, size)
    log_weights = np.zeros(population) if weights is None else np.log(weights)
    blocks = []
    for start in range(0, rows, _SAMPLING_BLOCK):
        keys = log_weights + rng.gumbel(size=(min(_SAMPLING_BLOCK, rows - start), population))
        top = np.argpartition(-keys, size - 1, axis=1)[:, :size] if 0 < size < population else np.argsort(-keys, 1)
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
        blocks.append(np.take_along_axis(top, order, axis=1)[:, :size])
    return np.concatenate(blocks) if blocks else np.zeros((0, size), np.int64)


def _uniform_by_rejection(rng: np.random.Generator, rows: int, population: int, size: int) -> np.ndarray:
    """Uniform draws without replacement, [rows, size]: independent draws, rows with a repeat drawn again.

    Rows without a repeat are uniform over ordered distinct tuples. With size * (size - 1) <=
    2 * population at least ~1/e of the rows are accepted each round (birthday bound), and this is
    ~15x faster than the Gumbel keys over a vocabulary of thousands.
    """
    draws = rng.integers(population, size=(rows, size))
    while True:
        ordered = np.sort(draws, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeated.any():
            return draws
        draws[repeated] = rng.integers(population, size=(int(repeated.sum()), size))


def mqar_gap_probabilities(slots: int, power_a: float) -> np.ndarray:
    """float64 [slots]: Zoology's power law over query slots, p(slot i) proportional to (i + 1) ** (power_a - 1)."""
    weights = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    return weights / weights.sum()


def mqar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, *, seed: int,
         power_a: float = 0.01, random_non_queries: bool = True) -> TaskExamples:
    """Multi-query associative recall as Zoology defines it.

    Each row: `num_pairs` key-value pairs `k1 v1 k2 v2 ...` first, keys drawn without replacement
    from 1 .. vocab_size // 2 - 1 and values from vocab_size // 2 .. vocab_size - 1 (disjoint
    halves; 0 is Zoology's padding token). The rest of the row holds (seq_len - 2 * num_pairs) // 2
    two-token slots; every key is asked once, in the slot Zoology's power law picks (small gaps
    after the pairs are likelier, `mqar_gap_probabilities`), each slot drawn without replacement.
    A query is the key followed by its value, and the value is the labelled token.

    One difference from Zoology's tensors, which keep inputs and labels apart: here the value is
    written into the row after its query (the labels are the row's own next tokens, as `LM.loss`
    expects), so a later query can see an earlier one's answer, which it already saw in the pairs.

    Args:
      num_examples: rows n.
      seq_len: tokens per row (Zoology's input_seq_len); standard settings (seq_len, num_pairs):
        (64, 4), (128, 8), (256, 16), (512, 64).
      num_pairs: key-value pairs per row; needs 4 * num_pairs <= seq_len.
      vocab_size: task vocabulary; needs num_pairs <= vocab_size // 2 - 1 keys.
      seed: the examples are a function of all arguments.
      power_a: Zoology's power-law parameter (1.0 is uniform over the slots).
      random_non_queries: fill the positions that are neither pair nor query with tokens uniform
        over the whole vocabulary (Zoology's default); False leaves them 0.
    Returns:
      `TaskExamples` with ids [num_examples, seq_len] and num_pairs labels per row.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples={num_examples}; expected 0 or more")
    if num_pairs < 1 or 4 * num_pairs > seq_len:
        raise ValueError(f"MQAR with seq_len={seq_len} holds 1 .. {seq_len // 4} key-value pairs (2 tokens per "
                         f"pair and 2 per query); got num_pairs={num_pairs}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(f"MQAR with vocab_size={vocab_size} has {max(vocab_size // 2 - 1, 0)} distinct keys "
                         f"(ids 1 .. vocab_size // 2 - 1); num_pairs={num_pairs} needs vocab_size >= "
                         f"{2 * num_pairs + 2}")
    if not power_a > 0:
        raise ValueError(f"power_a={power_a}; expected a positive power-law parameter")
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = 1 + sample_without_replacement(rng, num_examples, half - 1, num_pairs)
    values = half + sample_without_replacement(rng, num_examples, vocab_size - half, num_pairs)
    context = 2 * num_pairs
    slots = (seq_len - context) // 2
    gaps = sample_without_replacement(rng, num_examples, slots, num_pairs, mqar_gap_probabilities(slots, power_a))

    ids = np.zeros((num_examples, seq_len), np.int64)
    ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
    query = context + 2 * gaps
    if random_non_queries:
        ids[:, context:] = rng.integers(0, vocab_size, size=(num_examples, seq_len - context))
    np.put_along_axis(ids, query, keys, axis=1)
    np.put_along_axis(ids, query + 1, values, axis=1)
    mask = np.zeros(ids.shape, bool)
    np.put_along_axis(mask, query + 1, True, axis=1)
    return TaskExamples(ids.astype(np.int32), mask)


# The Landmark Attention passkey prompt: an instruction, filler repeated, the passkey sentence
# somewhere inside, and the question whose completion is the passkey.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

# RULER's single-needle template (number values, word keys).
NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {key} is: {value}. "
NEEDLE_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                   "The special magic number for {key} mentioned in the provided text is")
NEEDLE_KEY_WORDS = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gentle", "hollow", "ivory", "jolly",
                    "lanky", "mellow", "nimble", "olive", "plucky", "quiet", "rustic", "silver", "tidy", "vivid")
NEEDLE_KEY_NOUNS = ("harbor", "lantern", "meadow", "violin", "glacier", "orchard", "falcon", "compass", "pebble",
                    "canyon", "thimble", "walrus", "quarry", "saddle", "beacon", "marble", "tundra", "kettle")
NEEDLE_VALUE_DIGITS = 7


def _check_depths(depths) -> np.ndarray:
    depths = np.asarray(depths, np.float64).reshape(-1)
    if depths.size == 0 or np.any((depths < 0) | (depths > 1)):
        raise ValueError(f"needle depths {depths.tolist()}; expected one or more fractions in [0, 1]")
    return depths


def _random_numbers(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    """`count` decimal numbers of exactly `digits` digits, uniform."""
    if digits < 1:
        raise ValueError(f"digits={digits}; expected 1 or more")
    return [str(v) for v in rng.integers(10 ** (digits - 1), 10**digits, size=count)]


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), np.int64).reshape(-1)


def _needle_row(intro, haystack_pieces, needle, question, answer, context_length: int, depth: float):
    """One row `intro + haystack[:p] + needle + haystack[p:] + question + answer`, exactly context_length tokens.

    The haystack is the concatenation of `haystack_pieces` (token arrays: sentences or filler units),
    cut to the tokens left over; the needle goes between two pieces, at the boundary nearest
    `depth` of the haystack. The pieces must hold at least the tokens the haystack needs.
    Returns (ids [context_length], needle start, answer start).
    """
    haystack_length = context_length - len(intro) - len(needle) - len(question) - len(answer)
    haystack = np.concatenate([np.zeros(0, np.int64), *haystack_pieces])[:haystack_length]
    boundaries = np.concatenate([[0], np.cumsum([len(piece) for piece in haystack_pieces])])
    boundaries = boundaries[boundaries <= haystack_length]
    split = int(boundaries[np.argmin(np.abs(boundaries - depth * haystack_length))])
    row = np.concatenate([intro, haystack[:split], needle, haystack[split:], question, answer])
    return row, len(intro) + split, context_length - len(answer)


def _stack_rows(rows: list, depths: np.ndarray) -> TaskExamples:
    ids = np.stack([row for row, _, _ in rows]).astype(np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, (_, _, answer_start) in enumerate(rows):
        mask[i, answer_start:] = True
    return TaskExamples(ids, mask, depths, np.array([start for _, start, _ in rows], np.int64))


def _check_room(context_length: int, fixed_tokens: int, what: str) -> None:
    if context_length < fixed_tokens:
        raise ValueError(f"context_length={context_length} is shorter than the {what} ({fixed_tokens} tokens "
                         "without any haystack); expected a longer context")


def passkey(tokenizer, context_length: int, depths, examples_per_depth: int, *, seed: int,
            digits: int = 5) -> TaskExamples:
    """Passkey retrieval (Landmark Attention's prompt), each row exactly `context_length` tokens.

    Row: `PASSKEY_INTRO`, the filler `PASSKEY_FILLER` repeated (cut to fit), `PASSKEY_NEEDLE` with a
    random `digits`-digit passkey inserted between two filler sentences at the asked depth, then
    `PASSKEY_QUESTION`; the labelled tokens are the answer, the encoding of " " + passkey, at the
    row's end. Depth 0 puts the needle right after the intro, depth 1 right before the question.

    Args:
      tokenizer: anything with `encode(text) -> ids`.
      context_length: tokens per row, answer included.
      depths: fractions in [0, 1].
      examples_per_depth: rows per depth (each with its own passkey).
      seed: the examples are a function of all arguments.
      digits: passkey length (fixed, so the answer length is the same in every row with byte tokens).
    Returns:
      `TaskExamples` of len(depths) * examples_per_depth rows, depth-major.
    """
    depths = np.repeat(_check_depths(depths), examples_per_depth)
    rng = np.random.default_rng(seed)
    passkeys = _random_numbers(rng, len(depths), digits)
    intro, question = _encode(tokenizer, PASSKEY_INTRO), _encode(tokenizer, PASSKEY_QUESTION)
    filler = [_encode(tokenizer, sentence) for sentence in split_sentences(PASSKEY_FILLER)]
    rows = []
    for depth, value in zip(depths, passkeys):
        needle, answer = _encode(tokenizer, PASSKEY_NEEDLE.format(value=value)), _encode(tokenizer, " " + value)
        fixed = len(intro) + len(needle) + len(question) + len(answer)
        _check_room(context_length, fixed, "passkey prompt")
        rows.append(_needle_row(intro, _consecutive(filler, 0, context_length - fixed), needle, question, answer,
                                context_length, depth))
    return _stack_rows(rows, depths)


def split_sentences(text: str) -> list[str]:
    """Pieces of `text` that end after a sentence mark and its space, or after a newline; they join back to text."""
    return [piece for piece in re.split(r"(?<=[.!?;:][ \t])|(?<=\n)", text) if piece]


def _consecutive(pieces: list, start: int, tokens: int) -> list:
    """pieces[start], pieces[start + 1], ... (wrapping around), just enough to hold `tokens` tokens.

    `pieces` must hold at least one token.
    """
    chosen, held = [], 0
    while held < tokens:
        piece = pieces[(start + len(chosen)) % len(pieces)]
        chosen.append(piece)
        held += len(piece)
    return chosen


def needle_in_haystack(tokenizer, documents: list[str], context_length: int, depths, examples_per_depth: int, *,
                       seed: int) -> TaskExamples:
    """A single needle in a haystack of real text (RULER S-NIAH), each row exactly `context_length` tokens.

    Row: `NEEDLE_INTRO`, consecutive sentences of `documents` from a random start (wrapping around
    the end), `NEEDLE` inserted at the sentence boundary nearest the asked depth, `NEEDLE_QUESTION`;
    the labelled tokens are the answer, the encoding of " " + the needle's 7-digit value. Keys are
    "adjective-noun" pairs.

    Args:
      tokenizer: anything with `encode(text) -> ids`.
      documents: haystack texts (held-out documents); together at least context_length tokens.
      context_length: tokens per row, answer included.
      depths: fractions in [0, 1].
      examples_per_depth: rows per depth.
      seed: the examples are a function of all arguments.
    Returns:
      `TaskExamples` of len(depths) * examples_per_depth rows, depth-major.
    """
    depths = np.repeat(_check_depths(depths), examples_per_depth)
    sentences = [sentence for document in documents for sentence in split_sentences(document)]
    pieces = [_encode(tokenizer, sentence) for sentence in sentences]
    corpus_tokens = sum(len(piece) for piece in pieces)
    if corpus_tokens < context_length:
        raise ValueError(f"the haystack documents hold {corpus_tokens} tokens; a context of {context_length} "
                         "needs at least that many: give more or longer documents")
    rng = np.random.default_rng(seed)
    values = _random_numbers(rng, len(depths), NEEDLE_VALUE_DIGITS)
    intro = _encode(tokenizer, NEEDLE_INTRO)
    rows = []
    for depth, value in zip(depths, values):
        key = f"{rng.choice(NEEDLE_KEY_WORDS)}-{rng.choice(NEEDLE_KEY_NOUNS)}"
        needle = _encode(tokenizer, NEEDLE.format(key=key, value=value))
        question, answer = _encode(tokenizer, NEEDLE_QUESTION.format(key=key)), _encode(tokenizer, " " + value)
        _check_room(context_length, len(intro) + len(needle) + len(question) + len(answer), "needle prompt")
        rows.append(_needle_row(intro, _consecutive(pieces, int(rng.integers(len(pieces))), context_length),
                                needle, question, answer, context_length, depth))
    return _stack_rows(rows, depths)
