"""Copy and induction-head generators for length generalisation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from attn_jax.data.copy_tasks import (
    SEP,
    TRIGGER,
    CopyConfig,
    InductionConfig,
    make_copy,
    make_induction,
)
from attn_jax.data.mqar import IGNORE
from attn_jax.data.vocab import BOS, EOS, PAD


def _check_copy(data: dict[str, np.ndarray], config: CopyConfig, lengths: range) -> list[int]:
    """Checks every row against the definition; returns the source lengths."""
    inputs, labels = data["inputs"], data["labels"]
    width = 2 * lengths.stop  # lengths.stop - 1 is L, the width is 2 * L + 2
    assert inputs.shape == labels.shape == (len(inputs), width)
    assert inputs.dtype == labels.dtype == np.int32
    seen = []
    for x, y in zip(inputs, labels, strict=True):
        n = int(np.flatnonzero(x == SEP)[0]) - 1
        assert n in lengths
        source = x[1 : n + 1]
        assert np.all((source >= 4) & (source < config.vocab_size))
        s = np.concatenate([[BOS], source, [SEP], source, [EOS]])
        np.testing.assert_array_equal(x[: 2 * n + 2], s[:-1])
        assert np.all(x[2 * n + 2 :] == PAD)
        np.testing.assert_array_equal(y[n + 1 : 2 * n + 2], s[n + 2 :])  # x1..xn, EOS
        assert np.all(y[: n + 1] == IGNORE) and np.all(y[2 * n + 2 :] == IGNORE)
        assert np.count_nonzero(y != IGNORE) == n + 1
        seen.append(n)
    return seen


def test_copy_examples_follow_the_definition():
    config = CopyConfig(num_symbols=8, min_len=2, max_len=10)
    data = make_copy(config, 400, seed=0)
    lengths = _check_copy(data, config, range(2, 11))
    assert set(lengths) == set(range(2, 11))  # every length drawn
    assert set(data["inputs"][:, 1:11].ravel().tolist()) >= set(range(4, 12))  # all symbols


def test_copy_at_a_longer_length():
    config = CopyConfig(num_symbols=16, min_len=1, max_len=8)
    data = make_copy(config, 200, seed=1, length=24)
    assert set(_check_copy(data, config, range(24, 25))) == {24}
    assert data["inputs"].shape == (200, 50)


def test_induction_examples_follow_the_definition():
    config = InductionConfig(num_symbols=10, seq_len=16)
    data = make_induction(config, 400, seed=0)
    inputs, positions, answers = data["inputs"], data["positions"], data["answers"]
    assert inputs.shape == (400, 16) and positions.shape == answers.shape == (400, 1)
    assert inputs.dtype == positions.dtype == answers.dtype == np.int32
    assert np.all(positions == 15)
    firsts = []
    for x, answer in zip(inputs, answers[:, 0], strict=True):
        triggers = np.flatnonzero(x == TRIGGER)
        assert len(triggers) == 2 and triggers[1] == 15 and triggers[0] <= 13
        assert answer == x[triggers[0] + 1]
        others = np.delete(x, triggers)
        assert np.all((others >= 4) & (others < config.vocab_size))
        firsts.append(int(triggers[0]))
    assert set(firsts) == set(range(14))  # trigger positions span [0, seq_len - 3]
    assert set(answers[:, 0].tolist()) == set(range(4, 14))


def test_induction_at_a_longer_length():
    data = make_induction(InductionConfig(seq_len=8), 300, seed=2, seq_len=64)
    inputs = data["inputs"]
    assert inputs.shape == (300, 64) and np.all(data["positions"] == 63)
    assert np.all((inputs == TRIGGER).sum(axis=1) == 2) and np.all(inputs[:, -1] == TRIGGER)
    first = np.argmax(inputs == TRIGGER, axis=1)
    np.testing.assert_array_equal(data["answers"][:, 0], inputs[np.arange(300), first + 1])


@pytest.mark.parametrize(
    "make, config",
    [(make_copy, CopyConfig()), (make_induction, InductionConfig())],
)
def test_deterministic_by_seed(make, config):
    a, b, c = (make(config, 50, seed) for seed in (3, 3, 4))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_vectorised_generation_is_fast():
    start = time.perf_counter()
    make_copy(CopyConfig(), 20_000, seed=0)
    make_induction(InductionConfig(), 20_000, seed=0)
    assert time.perf_counter() - start < 1.0  # < 0.5 s each


@pytest.mark.parametrize(
    "config, message",
    [
        (CopyConfig(num_symbols=0), r"^data\.num_symbols"),
        (CopyConfig(min_len=0), r"^data\.min_len"),
        (CopyConfig(min_len=5, max_len=4), r"^data\.max_len"),
        (InductionConfig(num_symbols=0), r"^data\.num_symbols"),
        (InductionConfig(seq_len=3), r"^data\.seq_len"),
    ],
)
def test_invalid_sizes_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        config.validate()
    make = make_copy if isinstance(config, CopyConfig) else make_induction
    with pytest.raises(ValueError, match=message):
        make(config, 4, seed=0)


def test_invalid_evaluation_lengths_name_the_argument():
    with pytest.raises(ValueError, match=r"^length"):
        make_copy(CopyConfig(), 4, seed=0, length=0)
    with pytest.raises(ValueError, match=r"^data\.seq_len"):
        make_induction(InductionConfig(), 4, seed=0, seq_len=3)


def test_vocab_sizes():
    assert CopyConfig(num_symbols=16).vocab_size == 20
    assert InductionConfig(num_symbols=30).vocab_size == 34
