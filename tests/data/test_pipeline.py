"""The grain training pipeline: step order, building ahead, errors, state, workers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from absl import flags

from attn_jax.data.batching import ArrayDataset
from attn_jax.data.pipeline import TrainBatches

DATA = ArrayDataset({"x": np.arange(50)[:, None] * np.ones((1, 3), np.int32)}, seed=7)


def _make(step: int) -> dict[str, np.ndarray]:  # module level: worker processes pickle it
    return DATA.batch(step, 8)


def test_batches_are_the_datasets_in_step_order_built_on_another_thread():
    threads = set()

    def make(step):
        threads.add(threading.current_thread())
        time.sleep(0.002 * (step % 3))  # uneven build times
        return _make(step)

    with TrainBatches(make, lambda b: ("placed", b), stop=20) as batches:
        got = list(batches)
    assert [s for s, _ in got] == list(range(20))
    for step, (tag, batch) in got:
        assert tag == "placed"
        np.testing.assert_array_equal(batch["x"], DATA.batch(step, 8)["x"])
    assert threading.current_thread() not in threads


def test_the_state_resumes_where_it_stopped():
    made = []
    with TrainBatches(lambda s: made.append(s) or s, lambda b: b, stop=100, buffer=2) as first:
        assert [next(first) for _ in range(5)] == [(s, s) for s in range(5)]
        state = first.state()
        time.sleep(0.2)
        assert max(made) < 5 + 2 + 3  # bounded read-ahead
    assert state == {"next_index": 5}
    with TrainBatches(_make, lambda b: b, stop=12) as resumed:
        resumed.restore(state)
        assert [s for s, _ in resumed] == list(range(5, 12))
    with TrainBatches(_make, lambda b: b, stop=12) as started:
        started.start_at(10)  # a checkpoint without a loader state
        assert [s for s, _ in started] == [10, 11]


def _broken(step):
    if step == 4:
        raise ValueError(f"no batch for step {step}")
    return step


def test_an_error_building_a_batch_is_raised_at_its_step():
    seen = []
    with (
        pytest.raises(ValueError, match="no batch for step 4"),
        TrainBatches(_broken, lambda b: b, stop=10) as batches,
    ):
        for step, _ in batches:
            seen.append(step)
    assert seen == [0, 1, 2, 3]


def test_worker_processes_give_the_same_batches_and_resume():
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; launch.py parses them
        flags.FLAGS.mark_as_parsed()
    with TrainBatches(_make, lambda b: b, stop=9, workers=2) as batches:
        head = [next(batches) for _ in range(4)]
        state = batches.state()
    assert [s for s, _ in head] == [0, 1, 2, 3]
    for step, batch in head:
        np.testing.assert_array_equal(batch["x"], DATA.batch(step, 8)["x"])
    with TrainBatches(_make, lambda b: b, stop=9, workers=2) as resumed:
        resumed.restore(state)
        assert [s for s, _ in resumed] == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"config\.data\.workers"):
        TrainBatches(_make, lambda b: b, stop=9, workers=-1)
