"""Threads a gpubox process cannot go on without, and how their end is noticed.

The coordinator's broker and HTTP threads, and a worker's agent, each carry a part of the
service. If one of them ends while the process is not stopping, the rest is half alive: the
port stays open and clients hang, and systemd sees nothing wrong. So each runs as an
`Essential` thread, which records why it ended, and the main thread watches them
(`first_dead`) and ends the process with a non-zero status and that reason, so the service
manager restarts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


class Essential(threading.Thread):
    """A daemon thread running `target`; `reason` says why it ended (an exception, or that it
    returned) once it has."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self._run_target = target
        self.reason = ""

    def run(self) -> None:
        try:
            self._run_target()
        except BaseException as exc:  # noqa: BLE001 - recorded, and the main thread ends the process
            self.reason = f"{type(exc).__name__}: {exc}"
            log.critical("the %s thread failed: %s", self.name, self.reason, exc_info=True)
        else:
            self.reason = "it returned"


def first_dead(threads: Sequence[threading.Thread]) -> threading.Thread | None:
    """The first of `threads` that has ended, or None while all run."""
    return next((thread for thread in threads if not thread.is_alive()), None)


def why(thread: threading.Thread) -> str:
    """One line for a thread that ended: its name and, for an Essential one, its reason."""
    reason = getattr(thread, "reason", "") or "it ended"
    return f"the {thread.name} thread stopped ({reason})"
