"""MQAR generator and step-indexed batching."""

from __future__ import annotations

import numpy as np
import pytest

from attn_jax.data.batching import ArrayDataset
from attn_jax.data.mqar import IGNORE, MQARConfig, make_mqar


def test_examples_follow_the_task_definition():
    config = MQARConfig(vocab_size=512, seq_len=64, num_kv_pairs=8)
    inputs, labels = make_mqar(config, 200, seed=0)
    assert inputs.shape == labels.shape == (200, 64)
    assert inputs.dtype == labels.dtype == np.int32
    assert inputs.min() >= 0 and inputs.max() < 512
    half = 512 // 2
    for x, y in zip(inputs, labels, strict=True):
        keys, values = x[0:16:2], x[1:16:2]
        assert np.all((keys >= 1) & (keys < half)) and len(set(keys)) == 8
        assert np.all(values >= half) and len(set(values)) == 8
        answers = np.flatnonzero(y != IGNORE)
        assert len(answers) == 8 and answers.min() >= 16  # queries come after the pairs
        table = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for position in answers:  # the label at a query key is that key's value
            assert y[position] == table[int(x[position])]
        assert sorted(x[answers].tolist()) == sorted(keys.tolist())  # each key asked once


def test_deterministic_by_seed():
    config = MQARConfig(vocab_size=256, seq_len=32, num_kv_pairs=4)
    a, b, c = (make_mqar(config, 50, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_query_gaps_follow_a_decaying_power_law():
    config = MQARConfig(vocab_size=8192, seq_len=64, num_kv_pairs=4)
    _, labels = make_mqar(config, 4000, seed=0)
    slots = (np.nonzero(labels != IGNORE)[1] - 8) // 2  # query slot after the pairs
    counts = np.bincount(slots, minlength=28)
    assert counts[0] > counts[5] > counts[20] > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"seq_len": 63}, "data.seq_len"),
        ({"num_kv_pairs": 20}, "data.seq_len"),
        ({"vocab_size": 32}, "data.vocab_size"),
        ({"num_kv_pairs": 0}, "data.num_kv_pairs"),
        ({"power_a": 0.0}, "data.power_a"),
    ],
)
def test_invalid_sizes_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MQARConfig(**{"vocab_size": 512, "seq_len": 64, "num_kv_pairs": 4, **fields}).validate()


def test_step_indexed_batches_cover_each_epoch_and_are_reproducible():
    data = ArrayDataset({"x": np.arange(10), "y": np.arange(10) * 2}, seed=1)
    epoch = np.concatenate([data.batch(step, 5)["x"] for step in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch: every example once
    straddling = data.batch(3, 4)["x"]  # positions 12..15: all in epoch 1
    np.testing.assert_array_equal(straddling, ArrayDataset(data.arrays, seed=1).batch(3, 4)["x"])
    np.testing.assert_array_equal(data.batch(7, 3)["y"], 2 * data.batch(7, 3)["x"])
    assert not np.array_equal(
        ArrayDataset(data.arrays, seed=2).batch(0, 10)["x"], data.batch(0, 10)["x"]
    )
    evaluated = np.concatenate([b["x"] for b in data.batches(4)])
    np.testing.assert_array_equal(evaluated, np.arange(10))
