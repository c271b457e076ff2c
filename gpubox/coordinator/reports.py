"""What workers report of their jobs (STARTED, LOG, TELEMETRY, DONE), stored a burst at a
time.

The broker collects the reports of one burst of messages, stores them in one transaction
(one commit, one fsync, for many) and acts on each (acknowledges it, wakes followers) only
once it committed. A report that fails alone is not acted on; if the commit fails, none is.
Unacknowledged, the workers send them again.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime

from gpubox import errors, models, protocol, telemetry
from gpubox.coordinator.peers import Peer
from gpubox.store import Store
from gpubox.store.base import Finish

log = logging.getLogger(__name__)

Report = protocol.Started | protocol.Log | protocol.Telemetry | protocol.Done


@dataclasses.dataclass(frozen=True)
class StartStored:
    """A STARTED stored; `applied` unless it was a repeat (the job was already started).
    `executed_at`: when its container started, as stored."""

    report: protocol.Started
    applied: bool
    executed_at: datetime


@dataclasses.dataclass(frozen=True)
class LogStored:
    """A LOG batch stored; `stored_seq` is the job's last stored line, what the ACK says."""

    report: protocol.Log
    stored_seq: int


@dataclasses.dataclass(frozen=True)
class PointsStored:
    """A TELEMETRY batch stored; `stored_seq` is the last batch stored, what the ACK says."""

    report: protocol.Telemetry
    stored_seq: int


@dataclasses.dataclass(frozen=True)
class DoneStored:
    """A DONE handed to the store, and what became of it (applied, a repeat, or refused
    because lines before it are missing)."""

    report: protocol.Done
    finish: Finish


Stored = StartStored | LogStored | PointsStored | DoneStored


@dataclasses.dataclass(frozen=True)
class LogLimits:
    """How much of each job's log the store keeps (None: no bound), and how many telemetry
    points per GPU before the older ones are merged."""

    max_lines: int | None = None
    max_bytes: int | None = None
    max_points: int = 2000


def store_burst(
    store: Store, pending: list[tuple[Peer, Report]], limits: LogLimits
) -> list[tuple[Peer, Stored]]:
    """Store a burst's reports in one transaction. Returns the ones stored, each with what
    storing it did; one that failed alone is logged and left out. StoreUnavailable (the
    commit, or the store gone) stores none of them."""
    stored: list[tuple[Peer, Stored]] = []
    with store.batch():
        for peer, report in pending:
            try:
                stored.append((peer, store_report(store, report, limits)))
            except (errors.StoreUnavailable, errors.Deposed):
                raise
            except Exception:  # this report only: the others still count
                log.exception("broker: could not store a %s of job %s", report.TYPE, report.job_id)
    return stored


def store_report(store: Store, report: Report, limits: LogLimits) -> Stored:
    """Store one report (inside the burst's transaction)."""
    match report:
        case protocol.Started():
            executed_at = models.parse_time(report.executed_at) or models.utcnow()
            applied = store.mark_started(
                report.job_id, report.attempt, executed_at, report.image_id, report.image_digest
            )
            return StartStored(report, applied, executed_at)
        case protocol.Log():
            lines = [(line[0], line[1], line[2]) for line in report.lines]
            for index in worker_notes(report):
                ts, _, text = lines[index]
                lines[index] = (ts, models.GPUBOX_STREAM, text)
            seq = store.append_logs(
                report.job_id,
                report.attempt,
                report.seq,
                lines,
                limits.max_lines,
                report.last,
                limits.max_bytes,
            )
            return LogStored(report, seq)
        case protocol.Telemetry():
            points = [telemetry.Point.from_row(row) for row in report.points]
            last = report.seq if report.last is None else max(report.seq, report.last)
            seq = store.add_points(
                report.job_id, report.attempt, report.seq, last, points, limits.max_points
            )
            return PointsStored(report, seq)
        case protocol.Done():
            finish = store.finish_job(
                report.job_id,
                report.attempt,
                models.Status(report.status),
                report.exit_code,
                report.error,
                models.parse_time(report.executed_at),
                models.parse_time(report.finished_at) or models.utcnow(),
                report.last_seq,
            )
            return DoneStored(report, finish)


def worker_notes(report: protocol.Log) -> list[int]:
    """The indices of a LOG batch's lines that are the worker's own, not the job's: those it
    names in `notes`, or, from a worker that sends no notes, the last line of a batch that
    covers more sequence numbers than it has lines (its marker for lines it dropped)."""
    count = len(report.lines)
    notes = report.notes
    if notes is None:
        last = report.last
        dropped = last is not None and count and last > report.seq + count - 1
        notes = [count - 1] if dropped else []
    return [index for index in notes if 0 <= index < count]
