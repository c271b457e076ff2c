"""Threads a gpubox process cannot go on without, and how their end is noticed.

The coordinator's broker and HTTP threads, and a worker's agent, each carry a part of the
service. If one of them ends while the process is not stopping, the rest is half alive: the
port stays open and clients hang, and systemd sees nothing wrong. So each runs as an
`Essential` thread, which records why it ended, and the main thread watches them
(`first_dead`) and ends the process with a non-zero status and that reason, so the service
manager restarts it.

A thread can also be alive and stuck. Each of these loops ticks a `Loop` at every turn; a
loop that has not turned for a while is reported (/healthz answers 503 with why), and one
that stays stuck far longer ends the process the same way as a dead thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


# A loop stuck this long ends the process. Longer than a stall that /healthz reports: a
# store call may block for seconds in an outage (the PostgreSQL pool waits 2 s, SQLite's
# busy timeout 30 s), and a restart would not make the store come back sooner.
STUCK_S = 60.0


class Loop:
    """How a thread's loop is doing. The loop calls tick() at every turn; `stall_s` is how
    long it may go without one before it counts as stalled."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.last = time.monotonic()
        self.ended = ""  # why its thread ended, once it has (set by Essential)

    def tick(self) -> None:
        self.last = time.monotonic()

    def since(self) -> float:
        """Seconds since the last turn."""
        return time.monotonic() - self.last

    def trouble(self, stall_s: float | None = None) -> str:
        """Why the loop is not serving ("" while it turns): its thread ended, or it has not
        turned for longer than `stall_s` (its own stall_s by default)."""
        if self.ended:
            return f"stopped ({self.ended})"
        since = self.since()
        if since > (self.stall_s if stall_s is None else stall_s):
            return f"has not turned its loop for {since:.0f} s"
        return ""


class Essential(threading.Thread):
    """A daemon thread running `target`; `reason` says why it ended (an exception, or that it
    returned) once it has. With a `loop`, the target ticks it at every turn."""

    def __init__(self, name: str, target: Callable[[], None], loop: Loop | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self._run_target = target
        self.loop = loop
        self.reason = ""

    def run(self) -> None:
        try:
            self._run_target()
        except BaseException as exc:  # noqa: BLE001 - recorded, and the main thread ends the process
            self.reason = f"{type(exc).__name__}: {exc}"
            log.critical("the %s thread failed: %s", self.name, self.reason, exc_info=True)
        else:
            self.reason = "it returned"
        if self.loop is not None:
            self.loop.ended = self.reason

    def trouble(self) -> str:
        """Why the process cannot go on with this thread ("" while it serves)."""
        if not self.is_alive():
            return f"stopped ({self.reason or 'it ended'})"
        if self.loop is not None:
            return self.loop.trouble(max(STUCK_S, self.loop.stall_s))
        return ""


def first_dead(threads: Sequence[threading.Thread]) -> threading.Thread | None:
    """The first of `threads` that has ended, or whose loop is stuck; None while all serve."""
    for thread in threads:
        trouble = thread.trouble() if isinstance(thread, Essential) else ""
        if trouble or not thread.is_alive():
            return thread
    return None


def why(thread: threading.Thread) -> str:
    """One line for a thread the process cannot go on with: its name and what is wrong."""
    trouble = thread.trouble() if isinstance(thread, Essential) else ""
    return f"the {thread.name} thread {trouble or 'stopped (it ended)'}"
