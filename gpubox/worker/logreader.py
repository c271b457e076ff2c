"""Docker's log of a job's container, read so that a worker that follows it again (after
its own restart, or a re-attach) sends every line once: `LogReader` follows both streams into
a `LineBuffer`, skips what the coordinator already stored (its log marks), and catches up on
the log's end once the container has exited. The bytes come from the json-file log on disk
(logfile.py) or from the engine's API (dockerlogs.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import docker
import docker.errors
import requests.exceptions

from gpubox import models, protocol
from gpubox.worker.lines import LineBuffer, Masker, line_text, normalize_ts, ts_ns

log = logging.getLogger(__name__)

CATCH_UP_TAIL = 1000  # entries read back from a log's end after the container exited


def _skipped(entry: tuple[str, str, bytes], skips: dict[str, list[Any]]) -> bool:
    """Whether an entry is one already taken: stamped before its stream's [timestamp, count]
    mark, or one of the first `count` stamped with it (-1: all of those). The first entry
    not skipped clears the mark: the stream's timestamps only grow."""
    stream, ts, _ = entry
    skip = skips[stream]
    if not skip[0]:
        return False
    if ts < skip[0]:
        return True
    if ts == skip[0] and skip[1] != 0:
        skip[1] -= 1
        return True
    skip[0] = ""
    return False


class _Stream:
    """Where the reading of one stream stands: the last timestamp taken and how many of
    Docker's entries had it (`at_last`; -1: skip every entry with that timestamp), and a
    line still waiting for its end.

    A re-attach starts at the last timestamp stored (`drop_ts`): its entries are read again,
    and the first `drop` lines they make are dropped, being stored already (lines as stored:
    a line over protocol.MAX_LINE counts as its pieces, where `at_last` counts entries). When
    how many are stored is not known (-1), every entry with that timestamp is skipped."""

    def __init__(self, mark: tuple[str, int] = ("", 0)) -> None:
        self.last_ts, stored = mark
        self.at_last = -1 if self.last_ts and stored < 0 else 0
        self.drop = max(stored, 0) if self.last_ts else 0
        self.drop_ts = self.last_ts
        self.pending = b""
        self.pending_ts = ""


class LogReader:
    """Follows a container's log (stdout and stderr, one stream in Docker's order) into a
    LineBuffer.

    Docker splits lines over 16 KiB into pieces that share a timestamp and lack the newline;
    the pieces are joined here. Timestamps are normalised to nine fraction digits, so they
    sort as text. Per stream the reader remembers the last timestamp it took and how many
    entries had it, so `catch_up` reads what a live follow missed without repeating a line;
    `resume` (per stream, the last timestamp stored and how many lines had it) makes it skip
    what is stored, to re-attach to a container whose earlier lines are stored: the rest of
    a long line of which only some pieces were stored is taken, not lost.
    """

    def __init__(
        self, logs: Any, buffer: LineBuffer, mask: Masker, resume: models.LogMarks | None = None
    ) -> None:
        # .batches(follow, since, tail) of (stream, timestamp, data), .container_exited(),
        # .close(): a DockerLogs or a JsonLogFile
        self.logs = logs
        self.buffer = buffer
        self.mask = mask
        marks = resume or {}
        self.streams = {s: _Stream(marks.get(s, ("", 0))) for s in protocol.STREAMS}
        self._dropping = any(state.drop for state in self.streams.values())
        # Streams with a mark that nothing was taken from since: their skip is still to apply.
        self._resuming = {s for s, state in self.streams.items() if state.last_ts}
        self.last_stream: str | None = None  # the stream of the last entry taken
        self.taken = 0  # entries taken so far: how the runner sees the follow progress
        self._gaps = 0  # the log's gaps marked in the job's log so far
        self._lock = threading.Lock()
        self._abandoned = False
        self.thread = threading.Thread(target=self._follow, daemon=True, name="logs")

    def _since(self) -> float | None:
        """Where a read must start so that it misses nothing not taken: the earliest of the
        streams' marks (each stream's timestamps only grow), less a millisecond as Docker
        applies `since` only roughly; the start of the log while a stream has no mark (a
        stream whose entries were taken but not stored, a line still without its end, has
        none after a restart)."""
        marks = [state.last_ts for state in self.streams.values()]
        if not all(marks):
            return None
        return (min(ts_ns(mark) for mark in marks) - 1_000_000) / 1e9

    def _read(self, follow: bool) -> None:
        """Take every entry after the ones already taken (by timestamp and count, per
        stream). A follow that was abandoned takes nothing more: catch_up reads on from where
        it stopped."""
        skips: dict[str, list[Any]] = {n: [s.last_ts, s.at_last] for n, s in self.streams.items()}
        for batch in self.logs.batches(follow, self._since()):
            if getattr(self.logs, "gaps", 0) > self._gaps:
                self._mark_gap()
            fresh = [(s, normalize_ts(ts.decode("ascii", "replace")), d) for s, ts, d in batch]
            if any(skip[0] for skip in skips.values()):  # not yet past what was taken
                fresh = [entry for entry in fresh if not _skipped(entry, skips)]
            if not self._take_all(fresh, follow):
                return

    def _read_tail(self) -> bool:
        """Take the entries after the last one taken, found among the log's last
        CATCH_UP_TAIL entries (Docker finds those from the end, where `since` has it scan the
        whole log). By position in Docker's order, not by timestamp: an entry of the other
        stream stamped a little earlier but stored later is not missed. False, taking
        nothing, when the last entry taken is not among them, or when a stream re-attached
        to has had nothing taken yet (its entries after that one may be stored already: only
        its mark tells)."""
        if self.last_stream is None or self._resuming:
            return False
        state = self.streams[self.last_stream]
        found = 0
        last = [
            (stream, normalize_ts(raw_ts.decode("ascii", "replace")), data)
            for batch in self.logs.batches(False, tail=CATCH_UP_TAIL)
            for stream, raw_ts, data in batch
        ]
        # Each stream's timestamps only grow: once an earlier entry of that stream is in the
        # window (or the window is the whole log), every entry of its time is in it too, and
        # counting them finds the last one taken.
        complete = len(last) < CATCH_UP_TAIL
        for index, (stream, ts, _) in enumerate(last):
            if stream != self.last_stream or ts < state.last_ts:
                complete = complete or (stream == self.last_stream and ts < state.last_ts)
                continue
            if ts > state.last_ts or not complete:
                return False
            found += 1
            if found == state.at_last:
                self._take_all(last[index + 1 :], follow=False)
                return True
        return False

    def _take_all(self, entries: list[tuple[str, str, bytes]], follow: bool) -> bool:
        """Take entries (stream, normalised timestamp, data) in order, noting per stream the
        last timestamp taken and how many entries had it; False when a follow was abandoned
        meanwhile (nothing taken). Runs per log entry: kept to plain loops.

        First it waits for room in the buffer (not holding the lock, which abandon() takes):
        a reader never runs more than the buffer's bound ahead of the runner."""
        if entries:
            self.buffer.wait_for_room(self._abandon_follow if follow else None)
        with self._lock:
            if follow and self._abandoned:
                return False
            lines = []
            streams, mask = self.streams, self.mask
            for stream, ts, data in entries:
                state = streams[stream]
                if ts == state.last_ts and state.at_last >= 0:
                    state.at_last += 1
                else:
                    state.last_ts, state.at_last = ts, 1
                if not state.pending and data.endswith(b"\n"):
                    lines.append((ts, stream, line_text(data, mask)))  # a whole line: usual
                elif (line := self._join(stream, state, ts, data)) is not None:
                    lines.append(line)
            if entries:
                self.taken += len(entries)
                self.last_stream = entries[-1][0]
                if self._resuming:
                    self._resuming -= {stream for stream, _, _ in entries}
            self.buffer.add_many(self._drop_stored(lines) if self._dropping else lines)
        return True

    def _drop_stored(self, lines: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Of the lines a re-attach reads again, those not stored yet: per stream, the first
        `drop` lines (pieces, as LineBuffer cuts them) stamped with its mark are stored."""
        kept = []
        for ts, stream, text in lines:
            state = self.streams[stream]
            if state.drop and ts == state.drop_ts:
                pieces = protocol.split_line(text)
                stored = min(state.drop, len(pieces))
                state.drop -= stored
                kept += [(ts, stream, piece) for piece in pieces[stored:]]
                continue
            if ts > state.drop_ts:
                state.drop = 0  # past the mark: what had it is all read
            kept.append((ts, stream, text))
        self._dropping = any(state.drop for state in self.streams.values())
        return kept

    def _mark_gap(self) -> None:
        """Say in the job's log (a gpubox line) that lines may be missing here: Docker's log
        of the container rotated before they were read (gpubox.worker.logfile)."""
        self._gaps = self.logs.gaps
        taken = [state.last_ts for state in self.streams.values() if state.last_ts]
        ts = max(taken) if taken else normalize_ts(models.format_time(models.utcnow()) or "")
        text = (
            "[gpubox: lines may be missing here: Docker's log of the container rotated"
            " (worker settings container_log_max_bytes, container_log_files) before the"
            " worker read them; the job printed faster than the worker could send]"
        )
        self.buffer.add_many([(ts, models.GPUBOX_STREAM, text)])

    def _abandon_follow(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        """Stop the follow from taking anything more, and end its read."""
        with self._lock:
            self._abandoned = True
        self.buffer.release()  # a follow waiting for room gives up
        self.logs.close()

    def _follow(self) -> None:
        try:
            self._read(follow=True)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            if not self._abandoned:
                log.warning("following the log of %s stopped: %s", self.logs.container_id, exc)
        finally:
            self.buffer.wake()

    def _join(
        self, stream: str, state: _Stream, ts: str, data: bytes
    ) -> tuple[str, str, str] | None:
        """A piece of a line Docker split (over 16 KiB, or no newline yet): the line it
        completes, if any. Whole lines only are masked, so a secret across pieces is too."""
        if not state.pending:
            state.pending_ts = ts
        state.pending += data
        if state.pending.endswith(b"\n"):
            return self._pending_line(stream, state)
        return None

    def _pending_line(self, stream: str, state: _Stream) -> tuple[str, str, str]:
        data, state.pending = state.pending, b""
        return state.pending_ts, stream, line_text(data, self.mask)

    def catch_up(self) -> None:
        """After the container exited: read entries the follow missed (from the log's end
        when the follow got close to it, else from the marks), then flush a last line that
        had no newline."""
        try:
            if not self._read_tail():
                self._read(follow=False)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("reading the rest of the log of %s failed: %s", self.logs.container_id, exc)
        last = [self._pending_line(name, s) for name, s in self.streams.items() if s.pending]
        self.buffer.add_many(self._drop_stored(last) if self._dropping else last)
        self.buffer.wake()  # the runner waiting for lines looks now: the catch-up is over
