"""The prefetcher: step order, building ahead (bounded), errors with their traceback, and
no thread left behind however the iteration ends."""

from __future__ import annotations

import threading
import time
import traceback

import pytest

from attn_jax.train.prefetch import Prefetcher


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefetch"]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    assert not _workers()
    yield
    assert not _workers(), "a prefetch thread outlived its Prefetcher"


def _eventually(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_batches_come_in_step_order_built_on_another_thread():
    threads = set()

    def make(step):
        threads.add(threading.current_thread())
        time.sleep(0.002 * (step % 3))  # uneven build times
        return {"step": step}

    with Prefetcher(make, lambda batch: ("placed", batch), start=3, stop=40) as batches:
        got = list(batches)
    assert got == [(s, ("placed", {"step": s})) for s in range(3, 40)]
    assert threading.current_thread() not in threads and len(threads) == 1


def test_the_worker_runs_ahead_by_at_most_the_queue_and_one_batch():
    made = []
    with Prefetcher(lambda step: made.append(step) or step, lambda b: b, 0, 1000) as batches:
        assert next(batches) == (0, 0)
        # while the consumer holds step 0: steps 1 and 2 queued, 3 built and waiting
        assert _eventually(lambda: len(made) == 4)
        time.sleep(0.2)
        assert made == [0, 1, 2, 3]
        assert [next(batches) for _ in range(3)] == [(1, 1), (2, 2), (3, 3)]
    assert len(made) <= 7


def test_nothing_is_built_for_an_empty_range():
    with Prefetcher(pytest.fail, pytest.fail, start=5, stop=5) as batches:
        assert list(batches) == []


def _broken_make(step):
    if step == 4:
        raise ValueError(f"no batch for step {step}")
    return step


def _broken_place(batch):
    if batch == 4:
        raise ValueError(f"cannot place batch {batch}")
    return batch


@pytest.mark.parametrize(
    "make, place, where",
    [
        (_broken_make, lambda b: b, "_broken_make"),
        (lambda s: s, _broken_place, "_broken_place"),
    ],
)
def test_an_error_of_the_worker_is_raised_at_its_step_with_its_traceback(make, place, where):
    got = []
    failure = r"(no batch for step|cannot place batch) 4"
    with (
        pytest.raises(ValueError, match=failure) as error,
        Prefetcher(make, place, start=0, stop=10) as batches,
    ):
        for step, batch in batches:
            got.append((step, batch))
    assert got == [(0, 0), (1, 1), (2, 2), (3, 3)]  # every step before the failing one
    frames = [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    assert frames[-1] == where  # the original traceback, down to the worker's frame


def test_early_break_stops_the_worker():
    made = []
    with Prefetcher(lambda s: made.append(s) or s, lambda b: b, 0, 10**9) as batches:
        for step, _ in batches:
            if step == 2:
                break
    count = len(made)
    time.sleep(0.1)
    assert len(made) == count <= 6  # stopped: builds nothing more


def test_an_error_in_the_consumer_stops_the_worker():
    with pytest.raises(KeyError), Prefetcher(lambda s: s, lambda b: b, 0, 10**9) as batches:
        for step, _ in batches:
            if step == 1:
                raise KeyError("consumer failed")


def test_close_waits_for_a_slow_batch_and_ends_the_iteration():
    started = threading.Event()

    def slow(step):
        started.set()
        time.sleep(0.3)
        return step

    batches = Prefetcher(slow, lambda b: b, 0, 10)
    assert started.wait(5)
    batches.close()  # returns once the batch in progress is done: the thread is gone
    assert not _workers()
    assert list(batches) == []


def test_a_queue_smaller_than_one_is_refused():
    with pytest.raises(ValueError, match="size must be >= 1"):
        Prefetcher(lambda s: s, lambda b: b, 0, 1, size=0)
