"""A job attempt's output, whatever runs the job: lines from both streams gathered into
batches with consecutive sequence numbers (`LineBuffer`), secrets masked, handed to the
agent (`send_lines`), copied to the worker's own log within a bound (`OutputCopy`), and the
one "done" report (`emit_done`). The Docker and the process runtimes both use it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
import threading
from collections.abc import Callable, Iterable
from typing import IO, Any

from gpubox import models, protocol

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]

BATCH_LINES = 1000
BATCH_BYTES = 64 * 1024
FLUSH_S = 0.1
GATHER_S = 0.005
# Text a job's line buffer holds before its log readers wait for the runner to take some: the
# bound on a job's output in the worker's memory between Docker and the link. Without it, the
# reader of a job printing 60 KB lines outran the link and took the worker from 42 MiB to
# 2.5 GiB in 20 s (scripts/bench-flood).
BUFFER_BYTES = 4 * 1024 * 1024
MASK = "[MASKED]"


def normalize_ts(ts: str) -> str:
    """Docker's timestamp with exactly nine fraction digits (Docker drops trailing zeros), so
    that timestamps sort as text."""
    if len(ts) == 30:  # 2026-01-02T03:04:05.123456789Z already
        return ts
    head, _, frac = ts.rstrip("Z").partition(".")
    return f"{head}.{(frac + '000000000')[:9]}Z"


def ts_ns(ts: str) -> int:
    """Docker's RFC 3339 nanosecond timestamp as integer nanoseconds (trailing zeros vary)."""
    head, _, frac = ts.rstrip("Z").partition(".")
    whole = models.parse_time(head + "Z")
    assert whole is not None
    return int(whole.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


class Masker:
    """Replaces every secret value in a line with [MASKED], longest value first."""

    def __init__(self, values: Iterable[str]) -> None:
        self.values = sorted(
            {v for v in values if len(v) >= models.MIN_SECRET}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text


def line_text(data: bytes, mask: Masker) -> str:
    """One line of output as stored: UTF-8 (bad bytes replaced), without its newline, NUL
    replaced (PostgreSQL text cannot hold it), secrets masked."""
    text = data.decode("utf-8", "replace").removesuffix("\n")
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return mask(text) if mask.values else text


def secret_values(job: protocol.WireJob) -> list[str]:
    """What must never show in a job's stored output: its secrets and its registry password."""
    values = list((job.secrets or {}).values())
    if job.auth and job.auth.get("password"):
        values.append(job.auth["password"])
    return values


_TS, _TEXT = operator.itemgetter(0), operator.itemgetter(2)


class LineBuffer:
    """Lines from both streams, handed out in batches with consecutive sequence numbers.

    A reader in another thread than the one that takes (the Docker runtime's log readers)
    calls wait_for_room() before it adds: it then waits while the buffer holds max_bytes of
    text or more, so the buffer holds at most that plus one read."""

    def __init__(self, first_seq: int, max_bytes: int = BUFFER_BYTES) -> None:
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # lines came: for take()
        self._room = threading.Condition(lock)  # take() made room: for wait_for_room()
        self._lines: list[tuple[str, str, str]] = []
        self._bytes = 0
        self._woken = False
        self.max_bytes = max_bytes
        self.next_seq = first_seq
        self.waiting = 0  # readers waiting for room now
        # Bytes of these lines copied to the worker's own log (send_lines); -1 once the copy
        # stopped at its bound.
        self.copied = 0

    def wait_for_room(self, give_up: Callable[[], bool] | None = None) -> None:
        """Wait while the buffer is full, until take() makes room, or until `give_up()` is
        true when looked at (after each take() or release())."""
        with self._room:
            self.waiting += 1
            try:
                self._room.wait_for(
                    lambda: self._bytes < self.max_bytes or (give_up is not None and give_up())
                )
            finally:
                self.waiting -= 1

    def release(self) -> None:
        """Make readers waiting for room look at their `give_up` again."""
        with self._room:
            self._room.notify_all()

    def wake(self) -> None:
        """End a take() waiting for lines now: something else happened (the job's process
        exited, its output ended), and the runner should look."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def add(self, ts: str, stream: str, text: str) -> None:
        self.add_many([(ts, stream, text)])

    def add_many(self, lines: list[tuple[str, str, str]]) -> None:
        """Lines as (timestamp, stream, text); a text over protocol.MAX_LINE is split."""
        if not lines:
            return
        if max(map(len, map(_TEXT, lines))) * 4 > protocol.MAX_LINE:
            lines = [(ts, s, piece) for ts, s, text in lines for piece in protocol.split_line(text)]
        size = sum(map(len, map(_TEXT, lines)))
        with self._cond:
            before = len(self._lines)
            self._lines += lines
            self._bytes += size
            self._wake(before)

    def _wake(self, before: int) -> None:
        count = len(self._lines)
        if before == 0 or count >= BATCH_LINES or self._bytes >= BATCH_BYTES:
            self._cond.notify()

    def take(self, wait_s: float) -> list[tuple[int, list[list[str]]]]:
        """Wait up to wait_s for lines, then return all pending ones as batches of
        (first seq, [[ts, stream, line], …]), ordered by timestamp within the take. With
        wait_s 0 it returns at once with what it holds."""
        with self._cond:
            # Wait for a first line, then briefly for its companions: a quiet job's line goes
            # out at once, a chatty job's lines still travel in full batches.
            self._cond.wait_for(lambda: self._lines or self._woken, wait_s)
            if (
                wait_s > 0
                and self._lines
                and not self._woken
                and len(self._lines) < BATCH_LINES
                and self._bytes < BATCH_BYTES
            ):
                self._cond.wait(GATHER_S)
            pending, self._lines, self._bytes, self._woken = self._lines, [], 0, False
            self._room.notify_all()
        # Timestamps are normalised (nine fraction digits, Z): as text they sort in time order.
        pending.sort(key=_TS)
        # Cut where a batch would pass BATCH_LINES lines or BATCH_BYTES of text (a batch has
        # one line at least), found on the running total of the lines' sizes.
        ends = list(itertools.accumulate(map(len, map(_TEXT, pending))))
        batches: list[tuple[int, list[list[str]]]] = []
        start, cut_bytes = 0, 0  # the first line of the next batch; the bytes before it
        while start < len(pending):
            fits = bisect.bisect_right(ends, cut_bytes + BATCH_BYTES)
            end = min(start + BATCH_LINES, max(start + 1, fits))
            batches.append((self.next_seq, list(map(list, pending[start:end]))))
            self.next_seq += end - start
            start, cut_bytes = end, ends[end - 1]
        return batches


def emit_done(
    emit: Emit, outcome: dict[str, Any], executed_at: str | None, buffer: LineBuffer
) -> None:
    """The attempt's last report: how it ended, and the last line it sent."""
    emit(
        "done",
        {
            "exit_code": outcome.get("exit_code"),
            "status": outcome["status"],
            "error": outcome.get("error"),
            "executed_at": executed_at,
            "finished_at": models.format_time(models.utcnow()),
            "last_seq": buffer.next_seq - 1,
        },
    )


class OutputCopy:
    """The worker's own log (its stderr: the journal under systemd) as the place where it
    copies its jobs' lines, each tagged with the job and container: at most
    `max_bytes_per_job` of each job attempt's output, then one line saying the rest is not
    copied. A flood once wrote 4.5 GB a minute into a worker's journal."""

    def __init__(self, stream: IO[str], max_bytes_per_job: int) -> None:
        self.stream = stream
        self.max_bytes_per_job = max_bytes_per_job

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def send_lines(
    buffer: LineBuffer,
    emit: Emit,
    tee: IO[str] | OutputCopy,
    lock: threading.Lock,
    prefix: str,
    wait_s: float,
) -> None:
    """Take what the buffer holds (waiting up to wait_s), copy it to the worker's own log with
    `prefix` on each line (up to an OutputCopy's bound), and emit it as "lines" batches."""
    batches = buffer.take(wait_s)
    if not batches:
        return
    limit = tee.max_bytes_per_job if isinstance(tee, OutputCopy) else None
    with lock:
        for _, lines in batches:
            if buffer.copied < 0:
                break  # past the bound: nothing more of this job is copied
            text = "".join(f"{prefix} {s}: {text}\n" for _, s, text in lines)
            if limit is not None:
                data = text.encode("utf-8", "replace")
                if buffer.copied + len(data) > limit:
                    kept = data[: limit - buffer.copied]
                    text = kept[: kept.rfind(b"\n") + 1].decode("utf-8") + (
                        f"{prefix} gpubox: this job printed more than {limit} bytes; the rest"
                        " of its output is not copied to this log (worker setting"
                        " journal_bytes_per_job): `gpubox logs` shows it\n"
                    )
                    buffer.copied = -1
                else:
                    buffer.copied += len(data)
            tee.write(text)
        tee.flush()
    for seq, lines in batches:
        emit("lines", {"seq": seq, "lines": lines})
