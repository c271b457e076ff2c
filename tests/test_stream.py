"""How a job's output is read from Docker: the follow and the catch-up after the container
exited never both take a line (found by scripts/bench: a slow follow joined for 10 s, then
catch_up ran beside it and 1,000,000 lines were stored as 1,632,733)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from gpubox.worker.runner import LineBuffer, Masker, StreamReader, ts_ns


class SlowLogs:
    """A container whose follow stream is slow (a big backlog being copied), while a
    one-shot read returns everything at once, as Docker does."""

    short_id = "slow"

    def __init__(self, lines: int) -> None:
        self.entries = [
            f"2026-01-01T00:00:{i // 1000:02d}.{i % 1000:03d}000000Z {i}\n".encode()
            for i in range(lines)
        ]
        self.follow_started = threading.Event()

    def logs(self, follow: bool, since: float | None = None, **_: object) -> Iterator[bytes]:
        if not follow:
            cutoff = since or 0.0
            return iter(e for e in self.entries if stamp(e) >= cutoff)
        return self._slow()

    def _slow(self) -> Iterator[bytes]:
        self.follow_started.set()
        for entry in self.entries:
            time.sleep(0.001)
            yield entry


def stamp(entry: bytes) -> float:
    return ts_ns(entry.split(b" ")[0].decode()) / 1e9


def test_abandoning_a_slow_follow_then_catching_up_takes_each_line_once() -> None:
    logs = SlowLogs(3000)
    buffer = LineBuffer(1)
    reader = StreamReader(logs, "stdout", buffer, Masker([]))
    reader.thread.start()
    logs.follow_started.wait(5)
    time.sleep(0.3)  # the follow is part-way through
    reader.abandon()
    reader.catch_up()
    reader.thread.join(10)
    assert not reader.thread.is_alive()
    taken = [line[2] for _, lines in buffer.take(0) for line in lines]
    assert taken == [str(i) for i in range(3000)]
