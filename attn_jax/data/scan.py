"""SCAN (Lake & Baroni, 2018): navigation commands to action sequences.

The phrase-structure grammar of the paper generates every command, and its interpretation
rules give each command's actions; there are exactly 20,910 commands::

    C -> S and S | S after S | S          S -> V twice | V thrice | V
    V -> D[1] opposite D[2] | D[1] around D[2] | D | U
    D -> U left | U right | turn left | turn right
    U -> walk | look | run | jump

``x and y`` runs x then y, ``x after y`` runs y then x, ``twice``/``thrice`` repeat,
``u left`` is ``LTURN u``, ``u opposite left`` is ``LTURN LTURN u``, ``u around left`` is
``(LTURN u)`` four times, and ``turn`` itself emits no action. Actions are named as in the
paper's data files: ``I_WALK I_LOOK I_RUN I_JUMP I_TURN_LEFT I_TURN_RIGHT``.

Splits (sizes as in the paper's repository):

- ``simple``: a random 80/20 split, 16,728 train / 4,182 test.
- ``length``: train on commands whose action sequence has at most 22 actions (16,990),
  test on those with 24 to 48 actions (3,920; no command has exactly 23).
- ``addprim_jump``: "jump" is seen only in isolation: train on every command without
  "jump" (13,203) plus the command "jump" repeated to make 10% of the training set
  (1,467 copies: 14,670 in all), test on every other command containing "jump" (7,706).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "PUBLISHED_EXACT_MATCH",
    "SPLITS",
    "SPLIT_SIZES",
    "all_pairs",
    "interpret",
    "make_split",
]

SPLITS = ("simple", "length", "addprim_jump")
# (train, test) sizes of the paper's data files.
SPLIT_SIZES = {
    "simple": (16_728, 4_182),
    "length": (16_990, 3_920),
    "addprim_jump": (14_670, 7_706),
}
# Best exact-match test accuracy reported by Lake & Baroni (2018) per split (percent).
PUBLISHED_EXACT_MATCH = {"simple": 99.8, "length": 20.8, "addprim_jump": 1.2}

_PRIMITIVES = ("walk", "look", "run", "jump")
_DIRECTIONS = ("left", "right")
_ACTION = {p: f"I_{p.upper()}" for p in _PRIMITIVES}
_TURN = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
_MAX_TRAIN_ACTIONS = 22  # length split: train on at most 22 actions, test on the rest


def _verb_phrases() -> list[str]:
    """Every V: 4 primitives, 10 directed, 10 opposite, 10 around (34 in all)."""
    subjects = [*_PRIMITIVES, "turn"]
    phrases = list(_PRIMITIVES)
    phrases += [f"{u} {d}" for u in subjects for d in _DIRECTIONS]
    phrases += [f"{u} opposite {d}" for u in subjects for d in _DIRECTIONS]
    phrases += [f"{u} around {d}" for u in subjects for d in _DIRECTIONS]
    return phrases


def _interpret_verb(words: list[str]) -> list[str]:
    subject = [] if words[0] == "turn" else [_ACTION[words[0]]]
    if len(words) == 1:
        return subject
    turn = [_TURN[words[-1]]]
    if len(words) == 2:  # u left
        return turn + subject
    if words[1] == "opposite":
        return turn + turn + subject
    return (turn + subject) * 4  # around


def _interpret_sentence(words: list[str]) -> list[str]:
    repeat = {"twice": 2, "thrice": 3}.get(words[-1])
    if repeat:
        return _interpret_verb(words[:-1]) * repeat
    return _interpret_verb(words)


def interpret(command: str) -> list[str]:
    """The action sequence of a SCAN command (raises ``ValueError`` if it is not one)."""
    words = command.split()
    try:
        for joiner in ("and", "after"):
            if joiner in words:
                i = words.index(joiner)
                first, second = (
                    _interpret_sentence(words[:i]),
                    _interpret_sentence(words[i + 1 :]),
                )
                return first + second if joiner == "and" else second + first
        return _interpret_sentence(words)
    except (KeyError, IndexError):
        raise ValueError(f"interpret: {command!r} is not a SCAN command") from None


@functools.cache
def all_pairs() -> tuple[tuple[str, str], ...]:
    """All 20,910 ``(command, actions)`` pairs, in a fixed (grammar) order; actions are
    space-separated."""
    verbs = _verb_phrases()
    sentences = [f"{v}{suffix}" for v in verbs for suffix in ("", " twice", " thrice")]
    commands = list(sentences)
    commands += [
        f"{a} {joiner} {b}" for joiner in ("and", "after") for a in sentences for b in sentences
    ]
    pairs = tuple((c, " ".join(interpret(c))) for c in commands)
    if len(pairs) != 20_910 or len({c for c, _ in pairs}) != 20_910:
        raise AssertionError("SCAN grammar: expected 20,910 distinct commands")
    return pairs


def make_split(split: str, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, test)`` lists of ``(command, actions)`` for one of :data:`SPLITS`.

    ``seed`` shuffles both lists (and draws the random ``simple`` split); the ``length`` and
    ``addprim_jump`` splits hold the same pairs for every seed.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    pairs = list(all_pairs())
    rng = np.random.default_rng(seed)
    if split == "simple":
        order = rng.permutation(len(pairs))
        cut = SPLIT_SIZES["simple"][0]
        return [pairs[i] for i in order[:cut]], [pairs[i] for i in order[cut:]]
    if split == "length":
        short = [p for p in pairs if len(p[1].split()) <= _MAX_TRAIN_ACTIONS]
        long = [p for p in pairs if len(p[1].split()) > _MAX_TRAIN_ACTIONS]
        train, test = short, long
    else:
        with_jump = [p for p in pairs if "jump" in p[0].split()]
        train = [p for p in pairs if "jump" not in p[0].split()]
        train += [("jump", "I_JUMP")] * (len(train) // 9)  # 10% of the training set
        test = [p for p in with_jump if p[0] != "jump"]
    return [train[i] for i in rng.permutation(len(train))], [
        test[i] for i in rng.permutation(len(test))
    ]
