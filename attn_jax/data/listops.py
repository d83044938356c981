"""ListOps (Nangia & Bowman, 2018), as generated for the Long Range Arena (Tay et al., 2021).

An example is a prefix expression over the digits ``0..9`` with four list operators, e.g.
``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9; the label is the expression's value (10 classes):

- ``[MIN`` / ``[MAX``: the smallest / largest argument;
- ``[MED``: ``int(np.median(args))``, i.e. for an even number of arguments the floor of the
  mean of the two middle values;
- ``[SM``: the sum of the arguments modulo 10.

Trees follow ``generate_tree`` of the LRA generator (``lra_benchmarks/data/listops.py``):
a node at depth ``d`` (the root has depth 1) is an operator with probability
:data:`VALUE_P` while ``d < max_depth`` and a value otherwise; an operator has
``2..max_args`` arguments (uniform) and a uniform operator; a value is a uniform digit. A
tree's length counts its tokens: 1 for a value, ``2 + sum(children)`` for an operator (its
token and ``]``). Trees are drawn from the root until one has an accepted length. Here a
batch of trees is drawn at once, level by level with NumPy, and a tree is dropped as soon
as it must exceed ``max_length`` (see :func:`_batch`); the accepted trees' law is LRA's.

Differences from LRA: tokens carry no parentheses, length bounds are inclusive (see
:class:`ListOpsConfig`), examples are not de-duplicated (LRA keeps a set of trees), and
the random stream is NumPy's, so the examples differ while their distribution matches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import numpy as np

from attn_jax.data.vocab import Vocabulary, pad_sequences

__all__ = [
    "DIGITS",
    "END",
    "OPERATORS",
    "TOKENS",
    "VALUE_P",
    "ListOpsConfig",
    "encode",
    "evaluate",
    "generate_expression",
    "make_listops",
    "vocabulary",
]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(v) for v in range(10))
TOKENS = (*DIGITS, *OPERATORS, END)  # vocabulary order after the specials: ids 3..17
VALUE_P = 0.25  # P(operator) of a node above max_depth; _draw_level draws it as 20 in 80

_MIN, _MAX, _MED, _SM = range(4)  # operator codes; a token's code is its index in TOKENS
_OP_CODE, _END_CODE = len(DIGITS), len(DIGITS) + len(OPERATORS)  # 10 (+ op), 14
_NODE_BUDGET = 1 << 19  # a batch of attempts holds at most ~this many nodes per level
_MAX_BATCH = 1 << 13  # and at most this many attempts
_TOKEN_ARRAY = np.array(TOKENS, dtype=object)
# A node above max_depth draws w in [0, 80): operator w % 4 for w < 20, else digit w % 10.
_OP_DRAWS = 20
_NODE_CODES = np.array([_OP_CODE + w % 4 if w < _OP_DRAWS else w % 10 for w in range(80)])
_OPERATOR_IDS = {token: i for i, token in enumerate(OPERATORS)}
_DIGIT_VALUES = {token: i for i, token in enumerate(DIGITS)}


@dataclasses.dataclass(frozen=True)
class ListOpsConfig:
    """Tree shape and accepted lengths, ``min_length <= length <= max_length`` (tokens).

    LRA keeps ``500 < length < 2000`` (strict), i.e. ``min_length=501, max_length=1999``
    here; the defaults (500, 2000) also accept the two end lengths. ``max_depth`` counts
    levels (the root has depth 1: ``max_depth=1`` allows single digits only) and
    ``max_args`` is the largest number of arguments of an operator (at least 2).
    """

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def validate(self, prefix: str = "data") -> None:
        """Raises ``ValueError`` naming the offending field, also for unreachable lengths."""
        if self.max_depth < 1:
            raise ValueError(f"{prefix}.max_depth: must be >= 1, got {self.max_depth}")
        if self.max_args < 2:
            raise ValueError(f"{prefix}.max_args: must be >= 2, got {self.max_args}")
        if self.min_length < 1:
            raise ValueError(f"{prefix}.min_length: must be >= 1, got {self.min_length}")
        if self.max_length < self.min_length:
            raise ValueError(
                f"{prefix}.max_length: must be >= min_length ({self.min_length}), "
                f"got {self.max_length}"
            )
        longest = _longest(self.max_depth, self.max_args, self.min_length)
        if self.min_length > longest:
            raise ValueError(
                f"{prefix}.min_length: exceeds the longest expression that max_depth="
                f"{self.max_depth} and max_args={self.max_args} allow ({longest}), "
                f"got {self.min_length}"
            )
        reachable = _reachable_lengths(self.max_depth, self.max_args, self.max_length)
        if not reachable[self.min_length :].any():
            raise ValueError(
                f"{prefix}.min_length: no expression with max_depth={self.max_depth} and "
                f"max_args={self.max_args} has a length in [{self.min_length}, "
                f"{self.max_length}]"
            )


def _longest(max_depth: int, max_args: int, cap: int) -> int:
    """Length of the largest tree (every operator has ``max_args`` args), or one past ``cap``."""
    length = 1
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
        if length > cap:
            break
    return length


@functools.lru_cache(maxsize=64)
def _reachable_lengths(max_depth: int, max_args: int, max_length: int) -> np.ndarray:
    """``[max_length + 1]`` bool: whether some tree (any probability > 0) has that length."""
    size = max_length + 1
    level = np.zeros(size, bool)  # lengths of subtrees rooted at depth max_depth
    level[1] = True
    for _ in range(max_depth - 1):  # one level up: a digit, or 2 + the sum of 2..A subtrees
        child = level.astype(np.int64)
        above = np.zeros(size, bool)
        above[1] = True
        sums = child
        for _ in range(2, max_args + 1):  # sums of 2, 3, ..., max_args subtrees
            sums = (np.convolve(sums, child)[:size] > 0).astype(np.int64)
            if not sums.any():  # every longer sum exceeds max_length too
                break
            above[2:] |= sums[:-2] > 0
        if np.array_equal(above, level):  # a fixed point: higher levels add nothing
            break
        level = above
    level.flags.writeable = False  # shared by the cache
    return level


def _apply(op: int, args: list[int]) -> int:
    """Value of operator ``op`` (an index into :data:`OPERATORS`) on ``args``."""
    if op == _MIN:
        return min(args)
    if op == _MAX:
        return max(args)
    if op == _SM:
        return sum(args) % 10
    ordered = sorted(args)  # _MED: int(np.median(args)) for non-negative integers
    half = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[half]
    return (ordered[half - 1] + ordered[half]) // 2


def _apply_segments(
    ops: np.ndarray, values: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Vectorised :func:`_apply`: operator ``ops[i]`` on ``values[starts[i]:][:counts[i]]``.

    The segments are consecutive and cover ``values``; every count is at least 1.
    """
    mins = np.minimum.reduceat(values, starts)
    maxs = np.maximum.reduceat(values, starts)
    sums = np.add.reduceat(values, starts) % 10
    segment = np.repeat(np.arange(len(starts)), counts)
    ordered = values[np.lexsort((values, segment))]  # sorted within each segment
    meds = (ordered[starts + (counts - 1) // 2] + ordered[starts + counts // 2]) // 2
    return np.choose(ops, [mins, maxs, meds, sums])


def _draw_level(
    rng: np.random.Generator, config: ListOpsConfig, size: int, depth: int, root: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (indices into :data:`TOKENS`) and argument counts of ``size`` nodes at ``depth``.

    Above ``max_depth`` a node takes ``w`` uniform in ``[0, 80)``: it is an operator iff
    ``w < 20`` (probability ``VALUE_P``), the operator ``w % 4``, else the digit ``w % 10``
    (both uniform), and an operator then draws ``2..max_args`` arguments. With ``root`` and
    ``min_length > 1``, which rejects a lone digit anyway, roots are drawn as operators
    straight away (``w < 20``); that leaves the law of the accepted trees unchanged.
    """
    if depth >= config.max_depth:
        return rng.integers(0, 10, size=size), np.zeros(size, np.int64)
    high = _OP_DRAWS if root and config.min_length > 1 else len(_NODE_CODES)
    code = _NODE_CODES[rng.integers(0, high, size=size, dtype=np.int16)]
    num_args = np.zeros(size, np.int64)
    ops = code >= _OP_CODE
    num_args[ops] = rng.integers(2, config.max_args + 1, size=int(ops.sum()))
    return code, num_args


def _batch(
    rng: np.random.Generator, config: ListOpsConfig, num_attempts: int
) -> tuple[list[list[str]], np.ndarray]:
    """Draws ``num_attempts`` trees as LRA's ``generate_tree(1, max_depth, max_args)``.

    The trees grow together, level by level (each node's law depends on its depth only, so
    the order of the draws does not matter). A tree is dropped once its length is sure to
    exceed ``max_length``, i.e. when ``1 + sum(args + 1 over its operators so far)``, its
    length should every node still to draw be a digit, does: its remaining draws would
    only decide a rejected tree, so the accepted trees' law is unchanged.

    Returns:
      the accepted expressions in attempt order and their ``labels [num_accepted]`` int32.
    """
    length = np.ones(num_attempts, np.int64)  # lower bound, exact once a tree is complete
    attempt = np.arange(num_attempts)  # per node of the current level: its tree
    parent = np.zeros(num_attempts, np.int64)  # and its parent's index in the level above
    levels = []  # per level: (attempt, parent, code, num_args) of the trees still alive
    depth = 1
    while True:
        code, num_args = _draw_level(rng, config, len(attempt), depth, depth == 1)
        ops = np.flatnonzero(num_args)
        if not len(ops):
            levels.append((attempt, parent, code, num_args))
            break
        grown = np.bincount(attempt[ops], num_args[ops] + 1, num_attempts)
        length += grown.astype(np.int64)  # an operator: 1 token -> 2 + its arguments
        alive = length[attempt] <= config.max_length
        if not alive.all():
            attempt, parent, code = attempt[alive], parent[alive], code[alive]
            num_args = num_args[alive]
            ops = np.flatnonzero(num_args)
        levels.append((attempt, parent, code, num_args))
        attempt, parent = np.repeat(attempt[ops], num_args[ops]), np.repeat(ops, num_args[ops])
        depth += 1

    # Keep the accepted trees' nodes only; then the arguments of a level's operators are
    # the next level's nodes, consecutive and in the operators' order.
    accepted = (length >= config.min_length) & (length <= config.max_length)
    row = np.cumsum(accepted) - 1  # each accepted tree's index in the output
    nodes = []  # per level: (row, parent, code, num_args)
    index = np.zeros(0, np.int64)
    for attempt, parent, code, num_args in levels:
        keep = accepted[attempt]
        if not keep.any():
            break
        parent = index[parent[keep]] if nodes else parent[keep]
        nodes.append((row[attempt[keep]], parent, code[keep], num_args[keep]))
        index = np.cumsum(keep) - 1
    if not nodes:
        return [], np.zeros(0, np.int32)

    # Bottom-up: subtree values and lengths.
    values, sizes = [np.zeros(0, np.int64)] * len(nodes), [np.zeros(0, np.int64)] * len(nodes)
    for d in reversed(range(len(nodes))):
        _, _, code, num_args = nodes[d]
        value, size = np.where(code < _OP_CODE, code, 0), np.where(num_args > 0, 2, 1)
        ops = np.flatnonzero(num_args)
        if len(ops):
            counts = num_args[ops]
            starts = np.cumsum(counts) - counts
            value[ops] = _apply_segments(code[ops] - _OP_CODE, values[d + 1], starts, counts)
            size += np.bincount(nodes[d + 1][1], sizes[d + 1], len(code)).astype(np.int64)
        values[d], sizes[d] = value, size

    # Top-down: each node's position in its expression; write codes into one flat array.
    offsets = np.cumsum(sizes[0]) - sizes[0]  # each expression's start in the flat array
    flat = np.empty(int(sizes[0].sum()), np.int64)
    position = np.zeros(len(sizes[0]), np.int64)  # the roots'
    for d, (rows, parent, code, num_args) in enumerate(nodes):
        if d:
            _, _, _, parent_args = nodes[d - 1]
            counts = parent_args[parent_args > 0]
            before = np.cumsum(sizes[d]) - sizes[d]  # lengths of the earlier nodes
            first = np.repeat(np.cumsum(counts) - counts, counts)  # first sibling's index
            position = position[parent] + 1 + before - before[first]
        flat[offsets[rows] + position] = code
        ops = num_args > 0
        flat[offsets[rows[ops]] + position[ops] + sizes[d][ops] - 1] = _END_CODE
    tokens = _TOKEN_ARRAY[flat].tolist()
    ends = offsets + sizes[0]
    expressions = [
        tokens[start:end] for start, end in zip(offsets.tolist(), ends.tolist(), strict=True)
    ]
    return expressions, values[0].astype(np.int32)


def _expressions(
    rng: np.random.Generator, config: ListOpsConfig, max_attempts: int
) -> Iterator[tuple[list[list[str]], np.ndarray]]:
    """Endless batches of accepted ``(expressions, labels)``, each batch non-empty.

    Raises ``ValueError`` once ``max_attempts`` trees in a row miss the length bounds.
    """
    num_attempts = min(max(_NODE_BUDGET // config.max_length, 16), _MAX_BATCH, max_attempts)
    misses = 0
    while True:
        expressions, labels = _batch(rng, config, num_attempts)
        if expressions:
            misses = 0
            yield expressions, labels
            continue
        misses += num_attempts
        if misses >= max_attempts:
            raise ValueError(
                f"data.min_length: no expression of length in [{config.min_length}, "
                f"{config.max_length}] in {misses} attempts; such lengths are possible "
                f"but too unlikely with max_depth={config.max_depth} and "
                f"max_args={config.max_args}"
            )


def generate_expression(
    rng: np.random.Generator, config: ListOpsConfig, *, max_attempts: int = 1_000_000
) -> list[str]:
    """Tokens of one accepted expression, e.g. ``["[MAX", "2", "9", "[MIN", "4", "7", "]",
    "0", "]"]``, drawn by rejection from LRA's tree distribution.

    Draws a batch of trees at a time, so ``rng`` advances by more than one tree's draws.
    Raises ``ValueError`` for an invalid config, and when ``max_attempts`` trees in a row
    (rounded up to whole batches) all miss the length bounds.
    """
    config.validate()
    if max_attempts < 1:
        raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
    return next(_expressions(rng, config, max_attempts))[0][0]


def evaluate(tokens: Sequence[str]) -> int:
    """Value (``0..9``) of a prefix expression given as tokens, without parentheses.

    Raises ``ValueError`` for malformed input: an unknown token, an unmatched ``]``, an
    operator without arguments or left open, or not exactly one top-level expression.
    """
    stack: list[list] = [[None, []]]  # [operator index, argument values]; bottom: top level
    for token in tokens:
        if token == END:
            if len(stack) == 1:
                raise ValueError("evaluate: unmatched ']'")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"evaluate: {OPERATORS[op]} without arguments")
            stack[-1][1].append(_apply(op, args))
        elif token in _OPERATOR_IDS:
            stack.append([_OPERATOR_IDS[token], []])
        elif token in _DIGIT_VALUES:
            stack[-1][1].append(_DIGIT_VALUES[token])
        else:
            raise ValueError(f"evaluate: unknown token {token!r}")
    if len(stack) > 1:
        raise ValueError(f"evaluate: {len(stack) - 1} operator(s) left open")
    values = stack[0][1]
    if len(values) != 1:
        raise ValueError(f"evaluate: expected one expression, got {len(values)}")
    return values[0]


def make_listops(
    config: ListOpsConfig, num_examples: int, seed: int
) -> tuple[list[list[str]], np.ndarray]:
    """Generates ``num_examples`` ListOps examples, deterministically from ``seed``.

    Returns:
      the expressions (token lists, lengths within the config's bounds) and
      ``labels [num_examples]`` int32, their values.
    """
    config.validate()
    if num_examples < 0:
        raise ValueError(f"num_examples: must be >= 0, got {num_examples}")
    rng = np.random.default_rng(seed)
    expressions: list[list[str]] = []
    labels = [np.zeros(0, np.int32)]
    batches = _expressions(rng, config, 1_000_000)
    while len(expressions) < num_examples:
        batch, batch_labels = next(batches)
        expressions += batch
        labels.append(batch_labels)
    return expressions[:num_examples], np.concatenate(labels)[:num_examples]


def vocabulary() -> Vocabulary:
    """The task's vocabulary: the specials (ids 0..2), then :data:`TOKENS` (ids 3..17)."""
    return Vocabulary(TOKENS)


def encode(expressions: Sequence[Sequence[str]], length: int) -> np.ndarray:
    """``[num_examples, length]`` int32 token ids, right-padded with ``PAD`` (0).

    Raises ``ValueError`` for an unknown token or an expression longer than ``length``.
    """
    vocab = vocabulary()
    return pad_sequences([vocab.encode(tokens) for tokens in expressions], length)
