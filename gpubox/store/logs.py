"""Jobs' output in SQL: batches of lines stored exactly once, the caps on what a job keeps,
and the reads of pages and of where a job's output ends (store.base.Store says what each
operation means)."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import operator
from collections.abc import Sequence
from typing import Any

from gpubox import models
from gpubox.store import backend, base

# Log rows fetched at a time by a read bounded in bytes: at most 32 lines of 64 KiB (2 MiB)
# held before the bound is checked.
FETCH_ROWS = 32

# A row (seq, ts, stream, line) as a LogLine, without a Python call per row (pages of
# thousands of lines).
_log_line = functools.partial(tuple.__new__, models.LogLine)
_LINE = operator.itemgetter(3)
_ROW_LINE = operator.itemgetter(4)  # of a row to insert: (job_id, seq, ts, stream, line)


class LogStore(backend.Backend):
    """The store's operations on jobs' output."""

    def append_logs(
        self,
        job_id: int,
        attempt: int,
        first_seq: int,
        lines: Sequence[base.RawLine],
        keep: int | None = None,
        last: int | None = None,
        keep_bytes: int | None = None,
    ) -> int:
        with self._write() as cur:
            return self._append(cur, job_id, attempt, first_seq, lines, keep, last, keep_bytes)

    def _append(
        self,
        cur: Any,
        job_id: int,
        attempt: int,
        first_seq: int,
        lines: Sequence[base.RawLine],
        keep: int | None,
        last: int | None,
        keep_bytes: int | None = None,
    ) -> int:
        end = max(first_seq + len(lines) - 1, last or 0)
        cur.execute(
            "SELECT status, attempts, log_seq, log_bytes, log_cut FROM jobs WHERE id = ?"
            + self.row_lock,
            (job_id,),
        )
        row = cur.fetchone()
        answer = refused_batch(row, attempt, first_seq, end)
        if answer is not None:
            return answer
        skip = row["log_seq"] + 1 - first_seq
        rows = [
            (job_id, first_seq + i, ts, stream, text)
            for i, (ts, stream, text) in enumerate(lines)
            if i >= skip
        ]
        self._insert_logs(cur, rows)
        cap = _Cap(keep, keep_bytes, row["log_bytes"], row["log_cut"])
        if keep_bytes is not None:
            cap.add(rows)
        if (keep is not None and end > keep) or cap.over_bytes:
            self._cap_logs(cur, job_id, end, cap, len(rows))
        cur.execute(
            "UPDATE jobs SET log_seq = ?, log_bytes = ?, log_cut = ? WHERE id = ?",
            (end, cap.stored, cap.cut, job_id),
        )
        return end

    def _cap_logs(self, cur: Any, job_id: int, end: int, cap: _Cap, added: int) -> None:
        """Keep the head (the lines before cap.cut: at most keep/2 lines and keep_bytes/2
        bytes) and the latest lines. The line at cap.cut becomes a marker saying how many
        lines were dropped there; the oldest lines after it go until the job keeps at most
        `keep` lines and `keep_bytes` bytes (the newest line always stays). `added`: how
        many lines were just stored, about as many as go now."""
        if not cap.cut:
            cap.cut = cap.keep // 2 + 1 if cap.keep is not None else 2
        marker = cap.cut
        # The line cap: the tail keeps keep - marker lines, so it starts here or later.
        by_lines = end - cap.keep + marker + 1 if cap.keep is not None else marker + 1
        tail_from, freed = by_lines, 0
        if cap.keep_bytes is not None:
            tail_from, freed = self._tail_start(cur, job_id, marker, end, by_lines, cap, added)
        if tail_from <= marker + 1:
            return
        cur.execute("SELECT ts, line FROM logs WHERE job_id = ? AND seq = ?", (job_id, marker))
        replaced = cur.fetchone()
        if replaced is None:  # no line has that seq (the worker dropped it): take the next's time
            cur.execute(
                "SELECT ts FROM logs WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT 1",
                (job_id, marker),
            )
            replaced = {"ts": cur.fetchone()["ts"], "line": ""}  # (the newest line stays)
        cur.execute(
            "DELETE FROM logs WHERE job_id = ? AND seq >= ? AND seq < ?",
            (job_id, marker, tail_from),
        )
        if tail_from > by_lines:
            why = f"{cap.keep_bytes} bytes kept per job (max_log_bytes)"
        else:
            why = f"{cap.keep} lines kept per job (max_log_lines)"
        text = (
            f"[gpubox: {tail_from - marker} lines dropped here; the job logged more than the {why}]"
        )
        self._insert_logs(cur, [(job_id, marker, replaced["ts"], models.GPUBOX_STREAM, text)])
        cap.stored -= freed + len(backend.utf8(replaced["line"])) - len(backend.utf8(text))

    def _tail_start(
        self, cur: Any, job_id: int, marker: int, end: int, by_lines: int, cap: _Cap, added: int
    ) -> tuple[int, int]:
        """Where the kept tail starts so that it fits both caps (by_lines or later), and the
        bytes of the lines between the marker and it, found from their stored sizes (read
        `added` lines' worth at a time, at first: about what the batch just stored)."""
        limit = cap.keep_bytes
        assert limit is not None
        freed, after, count = 0, marker, added + 8
        while True:
            cur.execute(
                f"SELECT seq, {self.octet_length} AS size FROM logs WHERE job_id = ?"
                " AND seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                (job_id, after, end, count),
            )
            rows = cur.fetchall()
            for row in rows:
                if row["seq"] >= by_lines and cap.stored - freed <= limit:
                    return int(row["seq"]), freed
                freed += int(row["size"])
            if len(rows) < count:
                return max(end, by_lines), freed
            after, count = rows[-1]["seq"], 500

    def read_logs(self, job_id: int, since: int = 0, limit: int = 1000) -> list[models.LogLine]:
        return list(map(_log_line, self.read_log_rows(job_id, since, limit)))

    def read_log_rows(
        self, job_id: int, since: int = 0, limit: int = 1000, max_bytes: int | None = None
    ) -> list[models.LogRow]:
        with self._read() as cur:
            self._plain_rows(cur)
            cur.execute(
                "SELECT seq, ts, stream, line FROM logs WHERE job_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (job_id, since, limit),
            )
            if max_bytes is None:
                rows: list[models.LogRow] = cur.fetchall()
                return rows
            # SQLite reads a row only when it is fetched: a few rows at a time, and no more
            # once the page is full. (PostgreSQL's client fetches the whole answer at once:
            # its backend cuts the page in SQL instead.)
            rows, size = [], 0
            while size < max_bytes and (chunk := cur.fetchmany(FETCH_ROWS)):
                sizes = list(map(len, map(backend.utf8, map(_LINE, chunk))))
                if size + sum(sizes) < max_bytes:
                    rows += chunk
                    size += sum(sizes)
                    continue
                for row, row_size in zip(chunk, sizes, strict=True):
                    rows.append(row)
                    size += row_size
                    if size >= max_bytes:
                        break
            return rows

    def log_marks(self, job_id: int) -> models.LogMarks:
        with self._read() as cur:
            # gpubox's own lines are in no container's log.
            cur.execute(
                "SELECT stream, MAX(ts) AS ts FROM logs WHERE job_id = ? AND stream <> ?"
                " GROUP BY stream",
                (job_id, models.GPUBOX_STREAM),
            )
            latest = [(row["stream"], row["ts"]) for row in cur.fetchall()]
            marks: models.LogMarks = {}
            for stream, ts in latest:
                cur.execute(
                    "SELECT COUNT(*) AS n FROM logs WHERE job_id = ? AND stream = ? AND ts = ?",
                    (job_id, stream, ts),
                )
                marks[stream] = (ts, int(cur.fetchone()["n"]))
            return marks


@dataclasses.dataclass
class _Cap:
    """The bounds on what a job keeps of its log, at most `keep` lines and `keep_bytes` bytes
    of text (None: no such bound), and where it stands, as its jobs row holds it: `stored`,
    the bytes of its lines stored now; `cut`, the seq of the line where its head ends and its
    dropped lines are marked (0: not known yet)."""

    keep: int | None
    keep_bytes: int | None
    stored: int
    cut: int

    def add(self, rows: Sequence[tuple[int, int, str, str, str]]) -> None:
        """Count the bytes of log rows just stored; the first line that takes the job's bytes
        past half of keep_bytes is where its head ends (or keep/2 lines, if fewer)."""
        assert self.keep_bytes is not None
        sizes = list(map(len, map(backend.utf8, map(_ROW_LINE, rows))))
        total = self.stored + sum(sizes)
        half = self.keep_bytes // 2
        if not self.cut and rows and total > half:
            upto = list(itertools.accumulate(sizes, initial=self.stored))[1:]
            self.cut = rows[min(bisect.bisect_right(upto, half), len(rows) - 1)][1]
            if self.keep is not None:
                self.cut = min(self.cut, self.keep // 2 + 1)
        self.stored = total

    @property
    def over_bytes(self) -> bool:
        return self.keep_bytes is not None and self.stored > self.keep_bytes


def refused_batch(row: dict[str, Any] | None, attempt: int, first_seq: int, end: int) -> int | None:
    """What append_logs answers for a batch it stores nothing of (see Store.append_logs), given
    the job's (status, attempts, log_seq) before it; None when the batch adds lines."""
    if row is None or row["status"] != "RUNNING" or row["attempts"] != attempt:
        return end  # stale: the sender may forget it
    stored = int(row["log_seq"])
    if first_seq > stored + 1 or end <= stored:
        return stored  # a gap, or nothing new
    return None
