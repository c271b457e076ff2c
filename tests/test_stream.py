"""How a job's output is read from Docker (runner.LogReader over a log that behaves as
Docker's): the follow and the catch-up after the container exited never both take a line
(found by scripts/bench: a slow follow joined for 10 s, then catch_up ran beside it and
1,000,000 lines were stored as 1,632,733); the catch-up reads only the log's end when it can,
and never misses an entry Docker stored out of timestamp order; a re-attach after a restart
misses nothing of a stream that had nothing stored, nor the rest of a long line of which only
some pieces were stored."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

from gpubox import protocol
from gpubox.models import LogMarks
from gpubox.worker.dockerlogs import Entry
from gpubox.worker.lines import BATCH_BYTES, BATCH_LINES, LineBuffer, Masker, ts_ns
from gpubox.worker.logreader import CATCH_UP_TAIL, LogReader


def stamp(ms: int) -> bytes:
    """Docker's timestamp `ms` milliseconds into the minute."""
    return f"2026-01-01T00:00:{ms // 1000:02d}.{ms % 1000:03d}Z".encode()


class FakeLogs:
    """A container's log as Docker serves it: entries in Docker's order; a follow that is
    slow (a big backlog being copied) and may never send the last `follow_misses` entries; a
    one-shot read with `since` (by timestamp) or `tail` (the last entries)."""

    container_id = "fake"

    def __init__(self, log: list[Entry], delay_s: float = 0.0) -> None:
        self.log = log
        self.delay_s = delay_s
        self.follow_misses = 0
        self.follow_started = threading.Event()
        self.reads: list[str] = []

    def batches(
        self, follow: bool, since: float | None = None, tail: int | None = None
    ) -> Iterator[list[Entry]]:
        kept = [e for e in self.log if since is None or ts_ns(e[1].decode()) / 1e9 >= since]
        if follow:
            return self._slow(kept[: len(kept) - self.follow_misses])
        if tail is not None:
            self.reads.append("tail")
            return iter([kept[-tail:]])
        self.reads.append("since" if since is not None else "all")
        return iter([kept])

    def _slow(self, entries: list[Entry]) -> Iterator[list[Entry]]:
        self.follow_started.set()
        for entry in entries:
            time.sleep(self.delay_s)
            yield [entry]

    def close(self) -> None:
        """The follow goes on in Docker; the reader must take nothing more from it."""


def numbered(count: int) -> list[Entry]:
    return [("stdout", stamp(i), b"%d\n" % i) for i in range(count)]


def run(logs: FakeLogs, resume: LogMarks | None = None) -> list[tuple[str, str]]:
    """Follow to the end, catch up, and return (stream, line) as the buffer hands them out."""
    buffer = LineBuffer(1)
    reader = LogReader(logs, buffer, Masker([]), resume)
    reader.thread.start()
    reader.thread.join(30)
    reader.abandon()
    reader.catch_up()
    return [(line[1], line[2]) for _, lines in buffer.take(0) for line in lines]


def test_abandoning_a_slow_follow_then_catching_up_takes_each_line_once() -> None:
    logs = FakeLogs(numbered(3000), delay_s=0.001)
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
    # The last 1000 did not reach back to the follow: the whole log again (stderr has no
    # mark to start from), skipping what was taken.
    assert logs.reads == ["tail", "all"]


def test_what_a_finished_follow_missed_is_read_from_the_end_of_the_log() -> None:
    logs = FakeLogs(numbered(1500))
    logs.follow_misses = 5
    assert run(logs) == [("stdout", str(i)) for i in range(1500)]
    assert logs.reads == ["tail"]  # not the whole log again


def test_the_catch_up_takes_an_entry_docker_stored_after_a_later_stamped_one() -> None:
    # Docker's two copiers stamp and store in parallel: stdout's "late" (stamped 100 ms) was
    # stored after stderr's "early" (102 ms), the last entry the follow took.
    log = [*numbered(50), ("stderr", stamp(102), b"early\n"), ("stdout", stamp(100), b"late\n")]
    logs = FakeLogs(log)
    logs.follow_misses = 1
    assert run(logs)[-2:] == [("stdout", "late"), ("stderr", "early")]  # in time order
    assert logs.reads == ["tail"]


def test_entries_sharing_a_time_across_the_tail_window_fall_back_to_since() -> None:
    # The follow took the first two of three pieces stamped alike; the window starts at the
    # second, so counting in it would skip the third: the reader reads from its marks instead.
    pieces = [("stdout", stamp(5000), b"x" * 10)] * 3 + [("stdout", stamp(5000), b"\n")]
    errors = [("stderr", stamp(6000 + i), b"e%d\n" % i) for i in range(CATCH_UP_TAIL - 3)]
    logs = FakeLogs([*numbered(10), *pieces, *errors])  # the window starts at the 2nd piece
    logs.follow_misses = 2 + len(errors)  # it took 10 lines and two pieces
    lines = run(logs)
    assert lines == [
        *(("stdout", str(i)) for i in range(10)),
        ("stdout", "x" * 30),
        *(("stderr", f"e{i}") for i in range(len(errors))),
    ]
    assert logs.reads == ["tail", "all"]


def test_a_reattach_reads_a_stream_with_nothing_stored_from_the_start() -> None:
    # stderr printed a progress bar without a newline yet (pieces taken, no line stored);
    # stdout's lines are stored up to 2,000. After a restart stdout resumes after its mark,
    # and stderr from the log's start, so the bar's first piece is not lost.
    log = [("stderr", stamp(0), b"10%"), *numbered(2000), ("stderr", stamp(0), b" 20%\n")]
    log[1:2001] = [("stdout", stamp(1 + i), b"%d\n" % i) for i in range(2000)]
    logs = FakeLogs(log)
    last = ts_text(stamp(2000))
    assert run(logs, resume={"stdout": (last, 1)}) == [("stderr", "10% 20%")]


def ts_text(raw: bytes) -> str:
    from gpubox.worker.lines import normalize_ts

    return normalize_ts(raw.decode())


def long_line(at: int, size: int) -> tuple[list[Entry], str]:
    """A line of `size` bytes as Docker logs it: pieces of 16 KiB sharing one timestamp, the
    last with the newline; and the line."""
    text = "".join(chr(ord("a") + i % 26) for i in range(size))
    data = text.encode() + b"\n"
    cuts = range(0, len(data), 16 * 1024)
    return [("stdout", stamp(at), data[i : i + 16 * 1024]) for i in cuts], text


def test_a_reattach_completes_a_long_line_of_which_only_some_pieces_were_stored() -> None:
    # A 150 KiB line is stored as three pieces (64 KiB each at most); the worker died after
    # the first was stored. The new one reads that line again and sends the other two.
    entries, text = long_line(10, 150 * 1024)
    log = [*numbered(10), *entries, ("stdout", stamp(11), b"after\n")]
    pieces = protocol.split_line(text)
    assert len(pieces) == 3
    mark = ts_text(stamp(10))
    assert run(FakeLogs(log), resume={"stdout": (mark, 1)}) == [
        ("stdout", pieces[1]),
        ("stdout", pieces[2]),
        ("stdout", "after"),
    ]
    assert run(FakeLogs(log), resume={"stdout": (mark, 3)}) == [("stdout", "after")]


def test_a_reattach_takes_a_line_stamped_as_the_last_one_stored() -> None:
    log = [*numbered(5), ("stdout", stamp(5), b"first\n"), ("stdout", stamp(5), b"twin\n")]
    mark = ts_text(stamp(5))
    assert run(FakeLogs(log), resume={"stdout": (mark, 1)}) == [("stdout", "twin")]


def test_a_reattach_whose_follow_stops_early_does_not_send_the_other_streams_lines_again() -> None:
    # stdout is stored up to o8, stderr up to e12. The follow takes o9 and stops; the catch-up
    # must not take e10 and e11 (after o9 in the log, but stored: stderr's mark says so).
    log = [("stdout", stamp(i), b"o%d\n" % i) for i in range(10)]
    log += [("stderr", stamp(i), b"e%d\n" % i) for i in (10, 11, 12)]
    log += [("stdout", stamp(13), b"o13\n")]
    logs = FakeLogs(log)
    logs.follow_misses = 4
    marks = {"stdout": (ts_text(stamp(8)), 1), "stderr": (ts_text(stamp(12)), 1)}
    assert run(logs, resume=marks) == [("stdout", "o9"), ("stdout", "o13")]


def test_a_reattach_told_no_count_takes_every_entry_of_the_mark_as_stored() -> None:
    # What an older coordinator's JOB means (no resume_stored): the count is unknown.
    entries, _ = long_line(10, 150 * 1024)
    log = [*numbered(10), *entries, ("stdout", stamp(11), b"after\n")]
    assert run(FakeLogs(log), resume={"stdout": (ts_text(stamp(10)), -1)}) == [("stdout", "after")]


def test_the_buffer_hands_out_lines_in_time_order_in_batches_within_both_bounds() -> None:
    rng = random.Random(8)
    sizes = [rng.choice([1, 10, 200, 5_000, 30_000, 65_536]) for _ in range(600)]
    sizes += [1] * 2_500  # many short lines: cut by count
    lines = [(ts_text(stamp(i)), "stdout", "x" * size) for i, size in enumerate(sizes)]
    buffer = LineBuffer(7)
    buffer.add_many(lines[1::2])  # the other stream's copier stored these first
    buffer.add_many(lines[0::2])
    batches = buffer.take(0)
    # As a batch is filled line by line: a line that would take it past either bound
    # starts the next one.
    expected, current, size = [], [], 0
    for line in lines:
        if current and (len(current) >= BATCH_LINES or size + len(line[2]) > BATCH_BYTES):
            expected.append(current)
            current, size = [], 0
        current.append(list(line))
        size += len(line[2])
    expected.append(current)
    assert [batch for _, batch in batches] == expected
    firsts = [seq for seq, _ in batches]
    assert firsts[0] == 7
    assert all(
        b == a + len(batch) for a, b, (_, batch) in zip(firsts, firsts[1:], batches, strict=False)
    )
    assert buffer.next_seq == 7 + len(lines)
