"""ListOps generator (LRA's tree distribution), evaluator and encoding."""

from __future__ import annotations

import numpy as np
import pytest

from attn_jax.data.listops import (
    END,
    OPERATORS,
    TOKENS,
    ListOpsConfig,
    encode,
    evaluate,
    generate_expression,
    make_listops,
    vocabulary,
)
from attn_jax.data.vocab import PAD, SPECIALS

_FUNCTIONS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(np.median(args)),
    "[SM": lambda args: sum(args) % 10,
}


def _parse(tokens, start=0, depth=1):
    """Independent recursive evaluator: ``(value, next index, tree depth, arities)``."""
    token = tokens[start]
    if token not in _FUNCTIONS:
        return int(token), start + 1, depth, []
    args, deepest, arities, i = [], depth, [], start + 1
    while tokens[i] != END:
        value, i, sub_depth, sub_arities = _parse(tokens, i, depth + 1)
        args.append(value)
        deepest, arities = max(deepest, sub_depth), arities + sub_arities
    return _FUNCTIONS[token](args), i + 1, deepest, [len(args), *arities]


CONFIGS = [
    ListOpsConfig(max_depth=10, max_args=10, min_length=32, max_length=128),
    ListOpsConfig(max_depth=4, max_args=5, min_length=1, max_length=60),
    ListOpsConfig(max_depth=3, max_args=3, min_length=5, max_length=15),
    ListOpsConfig(),  # LRA's sizes
]


@pytest.mark.parametrize("config", CONFIGS)
def test_examples_are_valid_trees_labelled_by_their_value(config):
    num = 100 if config.max_length > 1000 else 300
    expressions, labels = make_listops(config, num, seed=0)
    assert len(expressions) == num and labels.shape == (num,) and labels.dtype == np.int32
    for tokens, label in zip(expressions, labels, strict=True):
        assert config.min_length <= len(tokens) <= config.max_length
        assert set(tokens) <= set(TOKENS)
        value, end, depth, arities = _parse(tokens)
        assert end == len(tokens)  # one expression, nothing after it
        assert label == value == evaluate(tokens)
        assert depth <= config.max_depth
        assert all(2 <= n <= config.max_args for n in arities)
    assert set(labels.tolist()) == set(range(10))


def test_lengths_follow_the_lra_distribution_exactly():
    """Accepted lengths against their exact law under LRA's ``generate_tree``."""
    config = ListOpsConfig(max_depth=3, max_args=3, min_length=5, max_length=15)
    law = {1: 1.0}  # length -> probability, for a subtree rooted at max_depth
    for _ in range(config.max_depth - 1):
        above = {1: 0.75}
        for num_args in range(2, config.max_args + 1):
            sums = {0: 1.0}
            for _ in range(num_args):
                sums_next: dict[int, float] = {}
                for a, p in sums.items():
                    for b, q in law.items():
                        sums_next[a + b] = sums_next.get(a + b, 0.0) + p * q
                sums = sums_next
            for total, p in sums.items():
                above[total + 2] = above.get(total + 2, 0.0) + 0.25 / (config.max_args - 1) * p
        law = above
    law = {n: p for n, p in law.items() if config.min_length <= n <= config.max_length}
    expected = np.array(list(law.values())) / sum(law.values())
    expressions, _ = make_listops(config, 20_000, seed=0)
    counts = np.bincount([len(e) for e in expressions], minlength=config.max_length + 1)
    observed = counts[list(law)]
    assert observed.sum() == 20_000  # no length outside the law's support
    chi2 = (((observed - 20_000 * expected) ** 2) / (20_000 * expected)).sum()
    assert chi2 < 3 * len(law)  # dof = len(law) - 1; a wrong law gives thousands


def test_lone_digits_only_when_allowed():
    config = ListOpsConfig(max_depth=4, max_args=5, min_length=1, max_length=60)
    expressions, _ = make_listops(config, 400, seed=1)
    lone = sum(len(e) == 1 for e in expressions)
    assert 200 < lone < 400  # P(root is a digit) = 0.75
    expressions, _ = make_listops(ListOpsConfig(max_depth=1, min_length=1, max_length=1), 5, 0)
    assert all(len(e) == 1 and e[0].isdigit() for e in expressions)


@pytest.mark.parametrize(
    "tokens, value",
    [
        (["7"], 7),
        (["[MIN", "4", "2", "8", "]"], 2),
        (["[MAX", "4", "2", "8", "]"], 8),
        (["[MED", "3", "9", "1", "]"], 3),  # odd: the middle value
        (["[MED", "1", "2", "7", "8", "]"], 4),  # even: (2 + 7) / 2 = 4.5 -> 4
        (["[MED", "9", "2", "]"], 5),  # 5.5 -> 5
        (["[MED", "6", "0", "4", "6", "]"], 5),  # (4 + 6) / 2
        (["[SM", "7", "8", "9", "]"], 4),  # 24 mod 10
        (["[SM", "0", "0", "]"], 0),
        (["[MAX", "2", "9", "[MIN", "4", "7", "]", "0", "]"], 9),
        (["[SM", "[MED", "1", "5", "]", "[MAX", "3", "8", "]", "]"], 1),  # 3 + 8
        (["[MIN", "[SM", "9", "9", "]", "[MED", "[MAX", "1", "2", "]", "6", "]", "]"], 4),
    ],
)
def test_evaluate_by_hand(tokens, value):
    assert evaluate(tokens) == value
    assert _parse(tokens)[0] == value


@pytest.mark.parametrize(
    "tokens",
    [[], ["]"], ["[MIN", "]"], ["[MIN", "1"], ["1", "2"], ["[MAX", "1", "]", "]"], ["10"], ["x"]],
)
def test_evaluate_rejects_malformed_input(tokens):
    with pytest.raises(ValueError, match="evaluate"):
        evaluate(tokens)


def test_deterministic_by_seed():
    config = CONFIGS[0]
    a, b, c = (make_listops(config, 50, seed) for seed in (3, 3, 4))
    assert a[0] == b[0] and a[0] != c[0]
    np.testing.assert_array_equal(a[1], b[1])
    shorter = make_listops(config, 20, seed=3)  # a prefix of the longer draw
    assert shorter[0] == a[0][:20]
    np.testing.assert_array_equal(shorter[1], a[1][:20])
    first, second = (generate_expression(np.random.default_rng(7), config) for _ in range(2))
    assert first == second and config.min_length <= len(first) <= config.max_length
    expressions, labels = make_listops(config, 0, seed=0)
    assert expressions == [] and labels.shape == (0,) and labels.dtype == np.int32


def test_vocabulary_and_encoding_round_trip():
    vocab = vocabulary()
    assert vocab.tokens == [*SPECIALS, *(str(v) for v in range(10)), *OPERATORS, END]
    expressions, _ = make_listops(CONFIGS[2], 30, seed=0)
    ids = encode(expressions, 20)
    assert ids.shape == (30, 20) and ids.dtype == np.int32
    for row, tokens in zip(ids, expressions, strict=True):
        assert np.all(row[len(tokens) :] == PAD) and np.all(row[: len(tokens)] >= len(SPECIALS))
        assert vocab.decode(row) == tokens
    # "[MAX" = 3 + 11, "2" = 3 + 2, "9" = 3 + 9, "]" = 3 + 14
    np.testing.assert_array_equal(encode([["[MAX", "2", "9", "]"]], 6), [[14, 5, 12, 17, 0, 0]])
    with pytest.raises(ValueError):
        encode([["[MIN", "1", "2", "]"]], 3)  # longer than length
    with pytest.raises(ValueError):
        encode([["[MIN", "1", "x", "]"]], 8)  # unknown token


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"max_depth": 0}, "data.max_depth"),
        ({"max_args": 1}, "data.max_args"),
        ({"min_length": 0}, "data.min_length"),
        ({"max_length": 4}, "data.max_length"),
        ({"max_depth": 2, "max_args": 3, "min_length": 6}, "data.min_length"),  # longest is 5
        ({"max_depth": 1, "min_length": 2}, "data.min_length"),  # digits only
        ({"min_length": 2, "max_length": 3}, "data.min_length"),  # lengths 1, 4, 5, ...
        ({"max_depth": 3, "max_args": 2, "min_length": 8, "max_length": 9}, "data.min_length"),
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    config = ListOpsConfig(**{"min_length": 5, "max_length": 40, **fields})
    with pytest.raises(ValueError, match=message):
        config.validate()
    with pytest.raises(ValueError, match=message.replace("data", "config.data")):
        config.validate("config.data")
    with pytest.raises(ValueError, match=message):
        make_listops(config, 1, seed=0)


def test_reachable_but_improbable_bounds_give_up():
    # Length 122 needs all 11 operators with 10 arguments each: probability ~1e-17.
    config = ListOpsConfig(max_depth=3, max_args=10, min_length=122, max_length=122)
    config.validate()  # possible, so not rejected up front
    with pytest.raises(ValueError, match=r"data\.min_length"):
        generate_expression(np.random.default_rng(0), config, max_attempts=1000)
    with pytest.raises(ValueError, match="max_attempts"):
        generate_expression(np.random.default_rng(0), CONFIGS[0], max_attempts=0)
    with pytest.raises(ValueError, match="num_examples"):
        make_listops(CONFIGS[0], -1, seed=0)
