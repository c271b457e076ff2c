"""Reading a child process's stdout and stderr as lines: timestamped as they arrive, masked,
and gathered into batches (what the process runtime sends of a job's output)."""

from __future__ import annotations

import os
import select
import time
from typing import IO

from gpubox import protocol
from gpubox.worker.lines import BATCH_LINES, GATHER_S, Masker, line_text

READ_BYTES = 256 * 1024


def timestamp() -> str:
    """Now, as Docker writes log timestamps (nine fraction digits)."""
    ns = time.time_ns()
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
    return f"{whole}.{ns % 1_000_000_000:09d}Z"


class Output:
    """A job's stdout and stderr, read as they come (no thread per pipe): lines timestamped
    as they arrive, masked, and due to be sent GATHER_S after the first one waiting, or at
    once when a batch is full."""

    def __init__(self, mask: Masker, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self._mask = mask
        self._pipes = {pipe.fileno(): pipe for pipe in (stdout, stderr)}
        self._names = {stdout.fileno(): "stdout", stderr.fileno(): "stderr"}
        self._partial = {fd: b"" for fd in self._pipes}
        self._poll = select.poll()
        for fd in self._pipes:
            self._poll.register(fd, select.POLLIN)
        self._held = 0
        self.due: float | None = None  # when the lines held must go out

    @property
    def closed(self) -> bool:
        return not self._pipes

    def read(self, wait_s: float) -> list[tuple[str, str, str]]:
        """Wait up to wait_s for output, then the complete lines that came."""
        if not self._pipes:
            return []
        lines: list[tuple[str, str, str]] = []
        for fd, _ in self._poll.poll(max(0, int(wait_s * 1000))):
            data = os.read(fd, READ_BYTES)
            if not data:  # closed: what was left without a newline is a line too
                self._poll.unregister(fd)
                self._pipes.pop(fd).close()
                data = self._partial.pop(fd)
                pieces = [data] if data else []
            else:
                pieces = (self._partial[fd] + data).split(b"\n")
                self._partial[fd] = rest = pieces.pop()
                while len(rest) > protocol.MAX_LINE:  # no newline in sight: send a piece
                    cut = _char_start(rest, protocol.MAX_LINE)
                    pieces.append(rest[:cut])
                    self._partial[fd] = rest = rest[cut:]
            if pieces:
                ts, name = timestamp(), self._names[fd]
                lines += [(ts, name, line_text(piece, self._mask)) for piece in pieces]
        if lines:
            if self.due is None:
                self.due = time.monotonic() + GATHER_S
            self._held += len(lines)
            if self._held >= BATCH_LINES:
                self.due = 0.0
        return lines

    def flush_due(self, now: float) -> bool:
        """Whether the lines held should go out now (and then they count as gone)."""
        if self.due is None or now < self.due:
            return False
        self.due, self._held = None, 0
        return True

    def rest(self) -> list[tuple[str, str, str]]:
        """What is left without a newline in pipes given up on while still open."""
        ts = timestamp()
        return [
            (ts, self._names[fd], line_text(data, self._mask))
            for fd, data in self._partial.items()
            if data
        ]

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.close()
        self._pipes.clear()


def _char_start(data: bytes, limit: int) -> int:
    """Where to cut `data` (longer than `limit`) so that the first piece holds at most `limit`
    bytes and no UTF-8 character is cut in two."""
    at = limit
    while at > 0 and data[at] & 0xC0 == 0x80:
        at -= 1
    return at or limit
