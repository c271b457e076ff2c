"""How a running job is asked to stop: by its submitter (CANCEL), or by the worker itself for
a reason that makes it an error (the idle-GPU policy). The runtimes watch the request, stop
the job's container or process, and end the job as `outcome` says."""

from __future__ import annotations

import threading
from typing import Any

from gpubox import models
from gpubox.worker.lines import LineBuffer
from gpubox.worker.process_output import timestamp


class JobStop(threading.Event):
    """Set to stop a job. Plainly set (a cancel), the job ends CANCELLED; set through
    `because`, it ends ERROR with that error. It also carries the worker's own notes into the
    job's log, once the runtime has attached the job's line buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.error: str | None = None
        self._buffer: LineBuffer | None = None
        self._lock = threading.Lock()

    def because(self, error: str) -> None:
        """Stop the job as an ERROR with `error`; nothing if a stop was asked for already."""
        with self._lock:
            if self.is_set():
                return
            self.error = error
            self.set()

    def attach(self, buffer: LineBuffer) -> None:
        with self._lock:
            self._buffer = buffer

    def note(self, text: str) -> bool:
        """Add a line of the worker's own (stream gpubox) to the job's log; False when no
        runtime has attached the job's buffer yet."""
        with self._lock:
            buffer = self._buffer
        if buffer is None:
            return False
        buffer.add(timestamp(), models.GPUBOX_STREAM, f"[gpubox: {text}]")
        return True


def attach(stop: threading.Event, buffer: LineBuffer) -> None:
    """Let a JobStop write notes into `buffer` (a plain Event, as tests pass, takes none)."""
    if isinstance(stop, JobStop):
        stop.attach(buffer)


def outcome(stop: threading.Event, exit_code: int | None) -> dict[str, Any]:
    """How a job that was asked to stop ended: CANCELLED, or ERROR with the stop's error."""
    error = getattr(stop, "error", None)
    if error:
        return {"status": "ERROR", "exit_code": exit_code, "error": error}
    return {"status": "CANCELLED", "exit_code": exit_code, "error": "cancelled"}
