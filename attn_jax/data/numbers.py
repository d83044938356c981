"""English -> German number words: a small seq2seq task whose alignments are easy to read.

Each example is a number in ``[0, 10**12)`` written out by ``num2words``: the source in
English, the target in German. German puts units before tens (``"twenty-one"`` ->
``"einundzwanzig"``, segmented ``ein und zwanzig``), so cross-attention visibly reorders.

Tokens: English is split on whitespace, with ``-`` and ``,`` as tokens of their own;
German words are segmented into number morphemes by greedy longest match over
``GERMAN_TOKENS`` (``sechzehn`` -> ``sech zehn``), with ``_`` for the space between words
(``"eine Million eins"`` -> ``eine _ Million _ eins``).

``num2words`` takes ~0.1 ms (English) to ~0.25 ms (German) a number, too slow for tens of
thousands of pairs, so :func:`number_pair` composes the tokens from the cached words of
0..999 by num2words' own merge rules, which for ``n = head * scale + rest``
(``scale`` = 1000, 10**6 or 10**9, ``head`` < 1000) are:

* English: ``"<head> <scale>"``, then ``" and <rest>"`` if ``0 < rest < 100``, else
  ``", <rest>"``.
* German: ``"eintausend"`` / ``"<head>tausend"`` glued to ``"<rest>"``; ``"eine Million"``
  / ``"<head> Millionen"`` (likewise ``Milliarde(n)``), then ``" <rest>"``.

The tests check the composition against num2words itself. num2words' German keeps
``eins`` inside compound heads: 101000 is ``"einhunderteinstausend"`` and 101 * 10**6
``"einhunderteins Millionen"``; the task reproduces num2words, quirks included.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping

import numpy as np
from num2words import num2words

from attn_jax.data.vocab import Vocabulary

__all__ = [
    "ENGLISH_TOKENS",
    "GERMAN_TOKENS",
    "MAX_DIGITS",
    "WORD_BREAK",
    "NumberPair",
    "detokenize_english",
    "detokenize_german",
    "english_vocabulary",
    "english_words",
    "german_vocabulary",
    "german_words",
    "make_number_pairs",
    "number_pair",
    "tokenize_english",
    "tokenize_german",
]

MAX_DIGITS = 12  # numbers are in [0, 10**MAX_DIGITS)
WORD_BREAK = "_"  # German token for the space between words

ENGLISH_TOKENS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    "hundred", "thousand", "million", "billion",
    "and", "-", ",",
)  # fmt: skip

_GERMAN_MORPHEMES = (
    "null", "ein", "eins", "eine", "zwei", "drei", "vier", "fünf", "sechs", "sech",
    "sieben", "sieb", "acht", "neun", "zehn", "elf", "zwölf",
    "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig",
    "hundert", "tausend", "und", "Million", "Millionen", "Milliarde", "Milliarden",
)  # fmt: skip
GERMAN_TOKENS: tuple[str, ...] = (*_GERMAN_MORPHEMES, WORD_BREAK)

# Alternatives longest first: at each position the regex takes the longest morpheme.
_MORPHEME = re.compile(
    "|".join(re.escape(m) for m in sorted(_GERMAN_MORPHEMES, key=len, reverse=True))
)
_ENGLISH_TOKEN = re.compile(r"[-,]|[^\s,-]+")
_DRAW_CHUNK = 1 << 16  # candidates drawn at a time (fixed, so the stream depends on seed only)

# (scale, English word, German singular, German plural), largest first.
_SCALES = (
    (10**9, "billion", "Milliarde", "Milliarden"),
    (10**6, "million", "Million", "Millionen"),
    (10**3, "thousand", "tausend", "tausend"),
)


def english_words(n: int) -> str:
    """``num2words(n)``, e.g. 21 -> ``"twenty-one"``."""
    return num2words(n)


def german_words(n: int) -> str:
    """``num2words(n, lang="de")``, e.g. 21 -> ``"einundzwanzig"``."""
    return num2words(n, lang="de")


def tokenize_english(text: str) -> list[str]:
    """Words split on whitespace, ``-`` and ``,`` kept as tokens of their own.

    ``"twenty-one thousand, five"`` -> ``["twenty", "-", "one", "thousand", ",", "five"]``.
    """
    return _ENGLISH_TOKEN.findall(text)


def detokenize_english(tokens: Iterable[str]) -> str:
    """Inverse of :func:`tokenize_english` on num2words output: ``-`` joins its
    neighbours, ``,`` attaches to the word before it, other tokens are space-separated."""
    out: list[str] = []
    for token in tokens:
        if out and token not in ("-", ",") and out[-1] != "-":
            out.append(" ")
        out.append(token)
    return "".join(out)


def _segment(word: str) -> list[str]:
    """``word`` split into German number morphemes by greedy longest match."""
    out, position = [], 0
    while position < len(word):
        match = _MORPHEME.match(word, position)
        if match is None:
            raise ValueError(
                f"text: cannot segment the word {word!r} into number morphemes "
                f"(stuck at {word[position:]!r})"
            )
        out.append(match.group())
        position = match.end()
    return out


def tokenize_german(text: str) -> list[str]:
    """Number morphemes of each space-separated word, with ``WORD_BREAK`` between words.

    ``"eine Million einundzwanzig"`` -> ``["eine", "_", "Million", "_", "ein", "und",
    "zwanzig"]``. Raises ``ValueError`` naming a word that is not made of morphemes.
    """
    tokens: list[str] = []
    for i, word in enumerate(text.split()):
        if i:
            tokens.append(WORD_BREAK)
        tokens.extend(_segment(word))
    return tokens


def detokenize_german(tokens: Iterable[str]) -> str:
    """Inverse of :func:`tokenize_german`: morphemes glued, ``WORD_BREAK`` -> a space."""
    return "".join(" " if token == WORD_BREAK else token for token in tokens)


def english_vocabulary() -> Vocabulary:
    """``Vocabulary(ENGLISH_TOKENS)``: the specials, then every English token."""
    return Vocabulary(ENGLISH_TOKENS)


def german_vocabulary() -> Vocabulary:
    """``Vocabulary(GERMAN_TOKENS)``: the specials, then every German token."""
    return Vocabulary(GERMAN_TOKENS)


@dataclasses.dataclass(frozen=True)
class NumberPair:
    """One example: ``source`` English tokens and ``target`` German tokens of ``number``."""

    number: int
    source: tuple[str, ...]
    target: tuple[str, ...]


@functools.cache
def _small_tokens() -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """English and German tokens of 0..999 (num2words, 2,000 calls, cached)."""
    english = tuple(tuple(tokenize_english(english_words(n))) for n in range(1000))
    german = tuple(tuple(tokenize_german(german_words(n))) for n in range(1000))
    return english, german


def _compose(n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """English and German tokens of ``0 <= n < 10**12``, by num2words' merge rules."""
    english, german = _small_tokens()
    if n < 1000:
        return english[n], german[n]
    scale, en_scale, de_one, de_many = next(s for s in _SCALES if n >= s[0])
    head, rest = divmod(n, scale)
    source = (*english[head], en_scale)
    if scale == 1000:
        target = ("ein", de_one) if head == 1 else (*german[head], de_one)
    else:
        target = ("eine", WORD_BREAK, de_one) if head == 1 else (*german[head], WORD_BREAK, de_many)
    if rest:
        rest_source, rest_target = _compose(rest)
        source = (*source, "and" if rest < 100 else ",", *rest_source)
        target = (*target, *(() if scale == 1000 else (WORD_BREAK,)), *rest_target)
    return source, target


def number_pair(number: int) -> NumberPair:
    """The :class:`NumberPair` of ``number`` in ``[0, 10**12)``.

    Equal to tokenizing ``english_words(number)`` / ``german_words(number)``, but
    ~100x faster (composed from cached words of 0..999).
    """
    if isinstance(number, bool) or not isinstance(number, int | np.integer):
        raise ValueError(f"number: expected an integer, got {number!r}")
    if not 0 <= number < 10**MAX_DIGITS:
        raise ValueError(f"number: expected 0..{10**MAX_DIGITS - 1}, got {number}")
    number = int(number)
    return NumberPair(number, *_compose(number))


def _draw_numbers(count: int, max_digits: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct numbers, in draw order: digit count ``d`` uniform in
    ``1..max_digits``, then uniform over the ``d``-digit numbers (0 counts as 1-digit);
    repeats are skipped. Candidates come in fixed-size chunks, so the first ``k`` numbers
    do not depend on ``count``."""
    parts: list[np.ndarray] = []
    seen = np.zeros(0, np.int64)  # sorted
    found = 0
    while found < count:
        digits = rng.integers(1, max_digits + 1, size=_DRAW_CHUNK)
        low = np.where(digits == 1, 0, 10 ** (digits - 1))
        candidates = rng.integers(low, 10**digits)
        _, first = np.unique(candidates, return_index=True)
        fresh = candidates[np.sort(first)]  # first occurrences, in draw order
        fresh = fresh[~np.isin(fresh, seen, assume_unique=True)][: count - found]
        parts.append(fresh)
        found += len(fresh)
        seen = np.union1d(seen, fresh)
    return np.concatenate(parts).tolist() if parts else []


def make_number_pairs(
    sizes: Mapping[str, int], max_digits: int, seed: int
) -> dict[str, list[NumberPair]]:
    """Distinct random numbers turned into English -> German pairs, split by ``sizes``.

    Args:
      sizes: split name -> number of pairs, e.g. ``{"train": 20000, "valid": 1000,
        "test": 2000}``. Splits take consecutive stretches of one draw, in the order of
        ``sizes``; no number occurs twice within or across splits.
      max_digits: 1..12. Each number's digit count is uniform in ``1..max_digits``, then
        the number is uniform among those with that many digits (``d = 1`` includes 0),
        repeats rejected; so short and long inputs are both common (until the short
        classes run out: there are only 10 one-digit numbers).
      seed: seeds ``np.random.default_rng``; the output is a function of the arguments.

    Returns:
      ``{name: list of NumberPair}``, keys in the order of ``sizes``.
    """
    if isinstance(max_digits, bool) or not isinstance(max_digits, int | np.integer):
        raise ValueError(f"max_digits: expected an integer 1..{MAX_DIGITS}, got {max_digits!r}")
    if not 1 <= max_digits <= MAX_DIGITS:
        raise ValueError(f"max_digits: expected 1..{MAX_DIGITS}, got {max_digits}")
    if not isinstance(sizes, Mapping):
        raise ValueError(f"sizes: expected a mapping of split name to size, got {sizes!r}")
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(f"sizes: expected non-negative integers, got {name!r}: {size!r}")
    total, available = sum(int(s) for s in sizes.values()), 10 ** int(max_digits)
    if total > available:
        raise ValueError(
            f"sizes: total {total} exceeds the {available} numbers of at most {max_digits} digits"
        )
    numbers = _draw_numbers(total, int(max_digits), np.random.default_rng(seed))
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [NumberPair(n, *_compose(n)) for n in numbers[start : start + int(size)]]
        start += int(size)
    return out
