"""Training batches through grain: built and placed ahead of the step, checkpointable.

    batches = TrainBatches(make, place, stop=total_steps, workers=0)
    batches.restore(loader_state_from_checkpoint)  # or batches.start_at(step)
    for step, batch in batches:                     # batch = place(make(step)), in order
        ...
        save(..., loader=batches.state())

The pipeline is a ``grain.MapDataset`` over the step indices ``0 .. stop - 1`` mapped to
``make(step)`` (a task's ``train.batch(step, batch_size)``: its own index sampler, a fresh
permutation of the examples per epoch drawn from ``config.seed`` and the epoch), read by a
``grain`` iterator that builds and places the next batches on background threads
(``ReadOptions``), or, with ``workers > 0``, builds them in that many worker processes
(``mp_prefetch``) and places them here. Batches stay a function of the step alone, so the
iterator's state is the next step (``{"next_index": step}`` for threads; grain's worker
states for processes), saved in each checkpoint and restored on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain

__all__ = ["TrainBatches"]


class _Step:
    """``step -> (step, place(make(step)))`` (a class, so that worker processes can pickle
    it when ``place`` is ``None``)."""

    def __init__(self, make: Callable[[int], Any], place: Callable[[Any], Any] | None):
        self.make, self.place = make, place

    def __call__(self, step: int) -> tuple[int, Any]:
        batch = self.make(int(step))
        return int(step), batch if self.place is None else self.place(batch)


class TrainBatches:
    """``(step, placed batch)`` for the steps from the current position to ``stop``.

    Args:
      make: ``step -> host batch``.
      place: ``host batch -> placed batch`` (e.g. an asynchronous ``jax.device_put``).
      stop: the number of steps (the last one is ``stop - 1``).
      workers: worker processes building batches (``config.data.workers``); 0: threads
        of this process.
      buffer: batches built ahead.
    """

    def __init__(
        self,
        make: Callable[[int], Any],
        place: Callable[[Any], Any],
        *,
        stop: int,
        workers: int = 0,
        buffer: int = 2,
    ):
        if workers < 0:
            raise ValueError(f"config.data.workers: expected an integer >= 0, got {workers}")
        self._place_here = place if workers else None
        steps = grain.MapDataset.range(stop).map(_Step(make, None if workers else place))
        # One reading thread keeps the batches in step order without reordering work; it
        # runs ahead of the training step by `buffer` batches.
        dataset = steps.to_iter_dataset(
            grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer)
        )
        if workers:
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self._iterator = iter(dataset)

    def start_at(self, step: int) -> None:
        """Continues from ``step`` (a resumed run whose checkpoint has no loader state)."""
        if step:
            self._iterator.set_state(_skipped_to(self._iterator.get_state(), step))

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`state` saved in a checkpoint."""
        self._iterator.set_state(state)

    def state(self) -> dict[str, Any]:
        """The iterator's state after the batches handed out so far (JSON)."""
        return self._iterator.get_state()

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        step, batch = next(self._iterator)
        if self._place_here is not None:
            batch = self._place_here(batch)
        return step, batch

    def close(self) -> None:
        """Stops the background threads or worker processes."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _skipped_to(state: dict[str, Any], step: int) -> dict[str, Any]:
    """A fresh iterator's ``state`` moved on to ``step``."""
    if "next_index" in state:
        return {**state, "next_index": step}
    raise ValueError(
        "the checkpoint has no data loader state, which config.data.workers > 0 needs to "
        "resume; resume with config.data.workers=0"
    )
