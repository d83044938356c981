"""English -> German number-word pairs: tokenizers, composition, generator."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from num2words import num2words

from attn_jax.data.numbers import (
    ENGLISH_TOKENS,
    GERMAN_TOKENS,
    MAX_DIGITS,
    NumberPair,
    detokenize_english,
    detokenize_german,
    english_vocabulary,
    english_words,
    german_vocabulary,
    german_words,
    make_number_pairs,
    number_pair,
    tokenize_english,
    tokenize_german,
)
from attn_jax.data.vocab import SPECIALS

_EN_VALUES = {t: i for i, t in enumerate(ENGLISH_TOKENS[:20])} | {
    t: 10 * i for i, t in enumerate(ENGLISH_TOKENS[20:28], start=2)
}
_DE_VALUES = {
    "null": 0, "ein": 1, "eins": 1, "eine": 1, "zwei": 2, "drei": 3, "vier": 4, "fünf": 5,
    "sechs": 6, "sech": 6, "sieben": 7, "sieb": 7, "acht": 8, "neun": 9, "zehn": 10,
    "elf": 11, "zwölf": 12, "zwanzig": 20, "dreißig": 30, "vierzig": 40, "fünfzig": 50,
    "sechzig": 60, "siebzig": 70, "achtzig": 80, "neunzig": 90,
}  # fmt: skip
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "tausend": 10**3}
_SCALES |= {w: 10**6 for w in ("Million", "Millionen")}
_SCALES |= {w: 10**9 for w in ("Milliarde", "Milliarden")}


def _value(tokens, values):
    """The number that a token sequence spells: an independent check of segmentation."""
    total = part = 0
    for token in tokens:
        if token in values:
            part += values[token]  # "ein und zwanzig", "sech zehn", "hundert eins": sums
        elif token in ("hundred", "hundert"):
            part *= 100
        elif token in _SCALES:
            total, part = total + part * _SCALES[token], 0
        else:
            assert token in ("and", "-", ",", "und", "_"), token
    return total + part


def test_reordering_example_and_segmentations():
    assert english_words(21) == "twenty-one" and german_words(21) == "einundzwanzig"
    pair = number_pair(21)
    assert pair == NumberPair(21, ("twenty", "-", "one"), ("ein", "und", "zwanzig"))
    assert tokenize_english(english_words(21)) == ["twenty", "-", "one"]
    assert tokenize_german(german_words(21)) == ["ein", "und", "zwanzig"]
    assert number_pair(16).target == ("sech", "zehn")
    assert number_pair(17).target == ("sieb", "zehn")
    assert number_pair(101).target == ("ein", "hundert", "eins")
    assert number_pair(1_000_001).target == ("eine", "_", "Million", "_", "eins")
    assert number_pair(101_000).target == ("ein", "hundert", "eins", "tausend")  # num2words
    assert tokenize_english("twenty-one thousand, five") == [
        "twenty", "-", "one", "thousand", ",", "five"
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"^text: .*'zwo'"):
        tokenize_german("eine Million zwo")


def test_tokenizers_round_trip_and_segment_exhaustively():
    """Greedy longest match never mis-segments: every German word of a number below 10**12
    is a word of a number below 10**6 (or eine / Million(en) / Milliarde(n))."""
    numbers = [*range(100_001), *range(0, 10**6, 1000), *range(101_001, 10**6, 7919)]
    for n in numbers:
        pair = number_pair(n)
        english, german = detokenize_english(pair.source), detokenize_german(pair.target)
        assert tokenize_english(english) == list(pair.source), n
        assert tokenize_german(german) == list(pair.target), n
        assert _value(pair.source, _EN_VALUES) == n == _value(pair.target, _DE_VALUES)


def test_composition_matches_num2words():
    rng = np.random.default_rng(0)
    digits = rng.integers(1, MAX_DIGITS + 1, size=1500)
    numbers = [int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d)) for d in digits]
    numbers += [k * 10**e + r for k in (1, 2, 101) for e in (3, 6, 9) for r in (0, 1, 21, 100)]
    numbers += [1_001_000_000, 1_000_001_000, 10**12 - 1]
    for n in numbers:
        pair = number_pair(n)
        assert detokenize_english(pair.source) == num2words(n), n
        assert detokenize_german(pair.target) == num2words(n, lang="de"), n
        assert tokenize_german(num2words(n, lang="de")) == list(pair.target), n
        assert _value(pair.source, _EN_VALUES) == n == _value(pair.target, _DE_VALUES)


def test_fixed_token_lists_are_exactly_the_tokens_used():
    used_en, used_de = set(), set()
    numbers = [*range(2000), *(k * 10**e + 1 for k in (1, 2) for e in (6, 9))]
    for n in numbers:
        pair = number_pair(n)
        used_en.update(pair.source)
        used_de.update(pair.target)
    assert used_en == set(ENGLISH_TOKENS) and len(set(ENGLISH_TOKENS)) == len(ENGLISH_TOKENS)
    assert used_de == set(GERMAN_TOKENS) and len(set(GERMAN_TOKENS)) == len(GERMAN_TOKENS)
    assert english_vocabulary().tokens == [*SPECIALS, *ENGLISH_TOKENS]
    assert german_vocabulary().tokens == [*SPECIALS, *GERMAN_TOKENS]


def test_pairs_are_distinct_round_trip_and_use_the_vocabularies():
    sizes = {"train": 3000, "valid": 200, "test": 300}
    splits = make_number_pairs(sizes, max_digits=9, seed=0)
    assert list(splits) == ["train", "valid", "test"]
    assert {name: len(pairs) for name, pairs in splits.items()} == sizes
    numbers = [p.number for pairs in splits.values() for p in pairs]
    assert len(set(numbers)) == len(numbers)  # within and across splits
    assert all(0 <= n < 10**9 for n in numbers)
    en, de = english_vocabulary(), german_vocabulary()
    for pair in splits["valid"] + splits["test"]:
        assert detokenize_english(pair.source) == num2words(pair.number)
        assert detokenize_german(pair.target) == num2words(pair.number, lang="de")
    for pair in (p for pairs in splits.values() for p in pairs):
        assert all(t in en for t in pair.source) and all(t in de for t in pair.target)
        en.encode(pair.source), de.encode(pair.target)  # raises on an unknown token


def test_deterministic_by_seed_and_split_order():
    sizes = {"train": 500, "test": 100}
    a, b, c = (make_number_pairs(sizes, 6, seed) for seed in (3, 3, 4))
    assert a == b
    assert [p.number for p in a["train"]] != [p.number for p in c["train"]]
    swapped = make_number_pairs({"test": 100, "train": 500}, 6, 3)  # order of sizes counts
    assert [p.number for p in swapped["test"]] == [p.number for p in a["train"][:100]]
    smaller = make_number_pairs({"train": 50}, 6, 3)  # a prefix of the same draw
    assert smaller["train"] == a["train"][:50]


def test_digit_counts_are_roughly_uniform():
    pairs = make_number_pairs({"train": 6000}, max_digits=12, seed=0)["train"]
    counts = Counter(len(str(p.number)) for p in pairs)
    assert counts[1] == 10 and counts[2] >= 80  # short numbers all but exhausted
    long = np.array([counts[d] for d in range(4, 13)])
    assert np.all(np.abs(long / long.mean() - 1) < 0.15), counts
    assert counts[3] > 300  # 900 three-digit numbers, partly drawn


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_digits": 0}, "^max_digits: expected 1..12, got 0"),
        ({"max_digits": 13}, "^max_digits: expected 1..12, got 13"),
        ({"max_digits": 2.5}, "^max_digits"),
        ({"sizes": {"train": -1}}, "^sizes: .*'train'"),
        ({"sizes": {"train": 1.5}}, "^sizes: "),
        ({"sizes": [10]}, "^sizes: "),
        ({"sizes": {"train": 90, "test": 11}, "max_digits": 2}, "^sizes: total 101"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_number_pairs(**{"sizes": {"train": 10}, "max_digits": 3, "seed": 0, **kwargs})


def test_all_numbers_available_and_number_range():
    splits = make_number_pairs({"a": 60, "b": 40}, max_digits=2, seed=1)
    assert sorted(p.number for pairs in splits.values() for p in pairs) == list(range(100))
    assert make_number_pairs({"train": 0}, 5, 0) == {"train": []}
    for bad in (-1, 10**12, 3.0, True):
        with pytest.raises(ValueError, match=r"^number: "):
            number_pair(bad)
