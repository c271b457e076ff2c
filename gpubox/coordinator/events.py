"""Wake-ups for log followers: a per-job change counter that threads can wait on."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Changes:
    """Counts changes per job (new lines stored, status changed); followers wait for a change."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._versions: dict[int, int] = {}
        # Told of each notify and forget ("notify" or "forget", job id), after the followers
        # here: the hub passes them on to the coordinator's other HTTP processes.
        self.listeners: list[Callable[[str, int], None]] = []

    def version(self, job_id: int) -> int:
        with self._cond:
            return self._versions.get(job_id, 0)

    def notify(self, job_id: int) -> None:
        """Something about this job changed: wake its followers."""
        with self._cond:
            self._versions[job_id] = self._versions.get(job_id, 0) + 1
            self._cond.notify_all()
        for listener in self.listeners:
            listener("notify", job_id)

    def forget(self, job_id: int) -> None:
        """The job ended and its followers were woken: drop its counter. A follower that read
        the counter before that wake-up may then sleep out its wait timeout once before it
        sees the job ended."""
        with self._cond:
            self._versions.pop(job_id, None)
        for listener in self.listeners:
            listener("forget", job_id)

    def wait(self, job_id: int, seen: int, timeout_s: float) -> int:
        """Block until the job's version differs from `seen` or timeout_s passes; the version."""
        with self._cond:
            self._cond.wait_for(lambda: self._versions.get(job_id, 0) != seen, timeout_s)
            return self._versions.get(job_id, 0)
