"""The worker's log backlog on disk: batches waiting for room in the in-flight window.

While the coordinator is away (or slower than a job's output), the agent keeps at most its
in-memory window of unacknowledged batches; later batches come here, one queue per job, in
segment files under `<state>/spill/<worker name>/`. They go back into the window, oldest
first, as the coordinator acknowledges. Nothing here survives the process: a restarted
worker re-reads its jobs' output from Docker's log, from the last line the coordinator
stored.

Before a batch would take what is on disk past `max_bytes`, the oldest spilled batches are
dropped a segment at a time (the bound holds at every moment, not only between pushes), and
the job's queue begins with one marker line saying how many lines were dropped; the marker
batch covers the dropped sequence numbers (`last`), so the coordinator sees no gap. A batch
larger than the whole bound (only a bound of a couple of hundred KiB or less allows one) is
dropped as it comes, with its job's batches queued before it; other jobs keep theirs.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import msgpack

from gpubox import models

LENGTH = struct.Struct(">I")
MAX_SEGMENT_BYTES = 8 * 1024 * 1024


@dataclasses.dataclass
class Batch:
    """A LOG batch: lines from `seq` on; `last` is the last sequence number it covers."""

    seq: int
    lines: list[list[str]]
    last: int


@dataclasses.dataclass
class _Segment:
    path: Path
    size: int = 0  # bytes written
    read_at: int = 0  # bytes read
    unread: int = 0  # records written but not read
    first_seq: int = 0  # of the first unread record
    last_seq: int = 0  # of the last record written
    last_ts: str = ""  # of the last line written


@dataclasses.dataclass
class _Marker:
    first: int
    last: int
    ts: str

    def batch(self, max_bytes: int) -> Batch:
        dropped = self.last - self.first + 1
        text = (
            f"[gpubox: {dropped} lines dropped here; the worker's backlog for the coordinator"
            f" went past its {max_bytes} bytes on disk (spill_max_bytes)]"
        )
        return Batch(self.first, [[self.ts, models.GPUBOX_STREAM, text]], self.last)


def _private(path: str, flags: int) -> int:
    """open()'s opener for a spill file: readable by its owner alone."""
    return os.open(path, flags, 0o600)


class Spill:
    """Per-job FIFO queues of batches on disk, bounded in total by max_bytes."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.segment_bytes = max(4096, min(MAX_SEGMENT_BYTES, max_bytes // 16))
        self.size = 0  # bytes on disk, all jobs
        self.dropped = 0  # lines dropped since start, all jobs
        self._queues: dict[int, collections.deque[_Segment]] = {}
        self._markers: dict[int, _Marker] = {}
        self._writers: dict[int, Any] = {}
        self._readers: dict[int, Any] = {}
        self._names = 0
        # What an earlier process left is of no use: its jobs resume from Docker's log.
        shutil.rmtree(root, ignore_errors=True)
        # Job output: for the worker's user alone, like the state folder it lies in.
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._queues or job_id in self._markers

    def jobs(self) -> list[int]:
        """The jobs with something queued, oldest queue first."""
        return list(dict.fromkeys([*self._markers, *self._queues]))

    def last_seq(self, job_id: int) -> int | None:
        """The last sequence number queued for job_id, or None."""
        queue = self._queues.get(job_id)
        if queue:
            return queue[-1].last_seq
        marker = self._markers.get(job_id)
        return marker.last if marker else None

    def push(self, job_id: int, seq: int, lines: list[list[str]]) -> None:
        """Queue a batch after every batch queued for job_id so far. The oldest batches go
        first if it would not fit under max_bytes: what is on disk never exceeds it."""
        record = msgpack.packb([seq, lines], use_bin_type=True)
        size = LENGTH.size + len(record)
        if size > self.max_bytes:
            # It could never be written: drop it, and this job's queue before it so that the
            # marker, which goes out first, stays in order.
            while self._queues.get(job_id):
                self._drop_head(job_id)
            marker = self._markers.setdefault(job_id, _Marker(seq, 0, ""))
            marker.last, marker.ts = seq + len(lines) - 1, lines[-1][0]
            self.dropped += len(lines)
            return
        while self.size + size > self.max_bytes and self._drop_oldest():
            pass
        queue = self._queues.setdefault(job_id, collections.deque())
        if not queue or queue[-1].size >= self.segment_bytes:
            if queue:
                self._close(self._writers, job_id)
            self._names += 1
            queue.append(_Segment(self.root / f"job-{job_id}-{self._names:08d}.spill"))
        segment = queue[-1]
        writer = self._writers.get(job_id)
        if writer is None:
            writer = self._writers[job_id] = open(segment.path, "ab", opener=_private)  # noqa: SIM115
        writer.write(LENGTH.pack(len(record)) + record)
        writer.flush()
        if segment.unread == 0:
            segment.first_seq = seq
        segment.size += size
        segment.unread += 1
        segment.last_seq = seq + len(lines) - 1
        segment.last_ts = lines[-1][0] if lines else segment.last_ts
        self.size += size

    def pop(self, job_id: int) -> Batch | None:
        """The oldest batch queued for job_id (a drop marker first, if any), or None."""
        marker = self._markers.pop(job_id, None)
        if marker is not None:
            return marker.batch(self.max_bytes)
        queue = self._queues.get(job_id)
        if not queue:
            return None
        segment = queue[0]
        reader = self._readers.get(job_id)
        if reader is None:
            reader = self._readers[job_id] = open(segment.path, "rb")  # noqa: SIM115
            reader.seek(segment.read_at)
        (length,) = LENGTH.unpack(reader.read(LENGTH.size))
        seq, lines = msgpack.unpackb(reader.read(length), raw=False)
        segment.read_at += LENGTH.size + length
        segment.unread -= 1
        segment.first_seq = seq + len(lines)
        if segment.unread == 0:
            self._remove_head(job_id)  # read to its end; a later push starts a new one
        return Batch(seq, lines, seq + len(lines) - 1)

    def discard(self, job_id: int) -> None:
        """Forget everything queued for job_id and delete its files."""
        self._markers.pop(job_id, None)
        while self._queues.get(job_id):
            self._remove_head(job_id)

    def close(self) -> None:
        for job_id in list(self._queues):
            self.discard(job_id)

    # --- internals ----------------------------------------------------------------------------

    def _drop_oldest(self) -> bool:
        """Drop the unread part of the oldest segment of the job with the most on disk, noting
        it in that job's marker. False when nothing can be dropped."""
        queues = [(sum(s.size for s in q), job_id) for job_id, q in self._queues.items() if q]
        if not queues:
            return False
        self._drop_head(max(queues)[1])
        return True

    def _drop_head(self, job_id: int) -> None:
        """Drop the unread part of job_id's oldest segment, noting it in the job's marker."""
        segment = self._queues[job_id][0]
        if segment.unread:
            marker = self._markers.setdefault(job_id, _Marker(segment.first_seq, 0, ""))
            marker.last, marker.ts = segment.last_seq, segment.last_ts
            self.dropped += segment.last_seq - segment.first_seq + 1
        self._remove_head(job_id)

    def _remove_head(self, job_id: int) -> None:
        queue = self._queues[job_id]
        segment = queue.popleft()
        self._close(self._readers, job_id)
        if not queue:
            self._close(self._writers, job_id)
            del self._queues[job_id]
        self.size -= segment.size
        segment.path.unlink(missing_ok=True)

    @staticmethod
    def _close(handles: dict[int, Any], job_id: int) -> None:
        handle = handles.pop(job_id, None)
        if handle is not None:
            handle.close()
