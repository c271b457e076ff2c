"""The HTTP threads that long requests hold: log follow streams and long polls (?wait=) each
keep one of Waitress's threads until they end, so their number is capped, leaving threads for
every other request (/healthz and cancel included)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from gpubox import errors


class HeldThreads:
    """How many threads long requests hold now, and the most they may (see make_app). Long
    polls may take at most half of them: a crowd of waiters never shuts out log streams."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.follows = 0
        self.waits = 0
        self._lock = threading.Lock()

    def take_follow(self) -> None:
        """A place for a follow stream, or errors.Busy."""
        with self._lock:
            if self.follows + self.waits >= self.limit:
                raise errors.Busy(
                    f"{self.follows} log followers and {self.waits} waiters are connected, as"
                    " many as this coordinator serves at once (each holds an HTTP thread;"
                    " --http-threads sets how many there are): retry later, or poll"
                )
            self.follows += 1

    def releasing(self, stream: Iterator[str]) -> Iterator[str]:
        """The follow stream, giving its place back when it ends or is closed (Bottle starts a
        generator at once, to send the headers, so this `finally` always runs)."""
        try:
            yield from stream
        finally:
            with self._lock:
                self.follows -= 1

    def take_wait(self) -> bool:
        """A place for a long poll: False when there is none (the caller answers at once)."""
        with self._lock:
            if self.follows + self.waits >= self.limit or self.waits >= max(1, self.limit // 2):
                return False
            self.waits += 1
            return True

    def release_wait(self) -> None:
        with self._lock:
            self.waits -= 1
