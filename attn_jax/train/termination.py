"""Graceful stops: SIGTERM sets a process-wide flag that training loops check between steps.

Only the main thread can install signal handlers. Trials running in worker threads (a
parallel sweep) share the flag the main thread's handler sets, so one SIGTERM makes every
running trial save a checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["sigterm_stops", "stop_requested"]

_STOP = threading.Event()


def stop_requested() -> bool:
    """Whether SIGTERM arrived since the outermost :func:`sigterm_stops` was entered."""
    return _STOP.is_set()


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """In the main thread: clear the flag and route SIGTERM to it for the ``with`` body
    (the previous handler is restored after). Elsewhere, or when already routed: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is _handle:
        yield
        return
    _STOP.clear()
    previous = signal.signal(signal.SIGTERM, _handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _handle(signum, frame) -> None:
    del signum, frame
    _STOP.set()
