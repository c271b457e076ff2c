"""Python's cyclic garbage collector, held off while a turn of a broker's loop runs (see
CollectionDeferral)."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator


class CollectionDeferral:
    """Holds off Python's cyclic garbage collector while a turn of a broker's loop runs.

    A turn on a big fleet makes thousands of objects that live only for the turn (a view of
    each worker, the plan). A collection in the middle of the turn found them alive and
    moved them up to the oldest generation, which then filled fast enough for a full
    collection every couple of seconds: ~110 ms each at 1,000 workers, as it walks all of
    the fleet's objects, and the slowest scheduling rounds were those. Held off, the turn's
    objects are freed by reference counting as it ends, never reaching the oldest
    generation; the collections that came due run after the turn.

    The collector is the whole process's. With several brokers in one process (as in the
    tests), it stays off while any of them is in a turn, and comes back on once none is,
    unless something else had switched it off before. While a turn waits on a store that
    does not answer, no collection runs in the process: what the other threads leave to
    the collector meanwhile waits for the turn's end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns = 0  # turns running now, in every broker of this process
        self._was_on = False  # whether the collector was on when the first of them began

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        with self._lock:
            if not self._turns:
                self._was_on = gc.isenabled()
                gc.disable()
            self._turns += 1
        try:
            yield
        finally:
            with self._lock:
                self._turns -= 1
                if not self._turns and self._was_on:
                    gc.enable()


collection = CollectionDeferral()  # one for the process, as the collector is
