"""Batches built and placed on the devices ahead of the training step, on a daemon thread.

    with Prefetcher(make, place, start=step, stop=total_steps) as batches:
        for step, batch in batches:  # batch = place(make(step)), in step order
            ...

While the devices run step ``s``, the worker builds (``make``) and places (``place``, e.g.
an asynchronous ``jax.device_put``) the batches of the next steps, at most ``size`` of them
queued plus the one in hand. Batches stay a function of the step alone, so a resumed run
sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")

_POLL_SECONDS = 0.05  # how often a worker blocked on a full queue checks for close()


class _Failure:
    """What the worker raised, for the consumer to raise (with the worker's traceback)."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Prefetcher(Generic[T]):
    """Iterates over ``(step, place(make(step)))`` for ``step`` in ``range(start, stop)``.

    Use it as a context manager (or call :meth:`close`): leaving the ``with`` block, by the
    end of the steps, an early ``break`` or an exception, stops the worker thread and
    waits for it (at most the time of the batch it is building). An exception raised by
    ``make`` or ``place`` is raised by the iteration, at that step, with its original
    traceback.

    Args:
      make: ``step -> host batch``.
      place: ``host batch -> placed batch`` (e.g. the strategy's ``place_batch``).
      start, stop: the steps, ``start`` included, ``stop`` excluded.
      size: how many placed batches may wait in the queue.
    """

    def __init__(
        self,
        make: Callable[[int], Any],
        place: Callable[[Any], T],
        start: int,
        stop: int,
        size: int = 2,
    ):
        if size < 1:
            raise ValueError(f"Prefetcher: size must be >= 1, got {size}")
        self._make, self._place = make, place
        self._steps = range(start, stop)
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._closed = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Queues ``item`` unless closed first; whether it was queued."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for step in self._steps:
                if self._closed.is_set() or not self._put((step, self._place(self._make(step)))):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(_Failure(error))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[tuple[int, T]]:
        return self

    def __next__(self) -> tuple[int, T]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, _Failure):
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stops the worker and waits for it to exit; the iteration then ends."""
        self._done = True
        self._closed.set()
        self._thread.join()
        while not self._queue.empty():  # drop placed batches now, not with this object
            self._queue.get_nowait()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
