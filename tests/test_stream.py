"""How a job's output is read from Docker: the follow and the catch-up after the container
exited never both take a line (found by scripts/bench: a slow follow joined for 10 s, then
catch_up ran beside it and 1,000,000 lines were stored as 1,632,733)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from gpubox.worker.dockerlogs import Entry
from gpubox.worker.runner import LineBuffer, LogReader, Masker, ts_ns


class SlowLogs:
    """A container whose follow stream is slow (a big backlog being copied), while a
    one-shot read returns everything at once, as Docker does."""

    container_id = "slow"

    def __init__(self, lines: int) -> None:
        self.log = [
            ("stdout", f"2026-01-01T00:00:{i // 1000:02d}.{i % 1000:03d}Z".encode(), b"%d\n" % i)
            for i in range(lines)
        ]
        self.follow_started = threading.Event()

        self.reads: list[str] = []
        self.follow_misses = 0  # entries at the end a follow never sends

    def batches(
        self, follow: bool, since: float | None = None, tail: int | None = None
    ) -> Iterator[list[Entry]]:
        if follow:
            return self._slow()
        if tail is not None:
            self.reads.append("tail")
            return iter([self.log[-tail:]])
        self.reads.append("since")
        cutoff = since or 0.0
        return iter([[e for e in self.log if ts_ns(e[1].decode()) / 1e9 >= cutoff]])

    def _slow(self) -> Iterator[list[Entry]]:
        self.follow_started.set()
        for entry in self.log[: len(self.log) - self.follow_misses]:
            time.sleep(0.001)
            yield [entry]

    def close(self) -> None:
        """The follow goes on in Docker; the reader must take nothing more from it."""


def test_abandoning_a_slow_follow_then_catching_up_takes_each_line_once() -> None:
    logs = SlowLogs(3000)
    buffer = LineBuffer(1)
    reader = LogReader(logs, buffer, Masker([]))
    reader.thread.start()
    logs.follow_started.wait(5)
    time.sleep(0.3)  # the follow is part-way through
    reader.abandon()
    reader.catch_up()
    reader.thread.join(10)
    assert not reader.thread.is_alive()
    taken = [line[2] for _, lines in buffer.take(0) for line in lines]
    assert taken == [str(i) for i in range(3000)]
    assert logs.reads == ["tail", "since"]  # the last 1000 did not reach back to the follow


def test_what_a_finished_follow_missed_is_read_from_the_end_of_the_log() -> None:
    logs = SlowLogs(1500)
    logs.follow_misses = 5
    buffer = LineBuffer(1)
    reader = LogReader(logs, buffer, Masker([]))
    reader.thread.start()
    reader.thread.join(30)
    reader.abandon()
    reader.catch_up()
    taken = [line[2] for _, lines in buffer.take(0) for line in lines]
    assert taken == [str(i) for i in range(1500)]
    assert logs.reads == ["tail"]  # not the whole log again
