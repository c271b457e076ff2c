"""A job's GPU points on their way to the coordinator: numbered in TELEMETRY batches, held
until acknowledged, resent like LOG batches.

While the coordinator is away a job's batches pile up; past MAX_HELD the older of those made
since the last one sent are merged two by two (gpubox.telemetry.coarsen), each merged batch
covering the sequence numbers of both (`last`). So a worker holds a bounded number of points per job
however long the coordinator is gone, and the curve it sends later still spans the whole
time, coarser where it is older.
"""

from __future__ import annotations

import dataclasses

from gpubox import protocol, telemetry
from gpubox.telemetry import Point

MAX_HELD = 360  # batches held per job: an hour of 10 s points before any is merged


@dataclasses.dataclass
class Batch:
    """A TELEMETRY batch: its points, the sequence numbers seq..last it covers, and when it
    was last sent (0: never)."""

    seq: int
    last: int
    points: list[Point]
    sent_at: float = 0.0

    def message(self, session: str, job_id: int, attempt: int) -> protocol.Telemetry:
        return protocol.Telemetry(
            session=session,
            job_id=job_id,
            attempt=attempt,
            seq=self.seq,
            points=[point.to_row() for point in self.points],
            last=self.last if self.last != self.seq else None,
        )


def merge_batches(a: Batch, b: Batch) -> Batch:
    """Two neighbouring batches as one: the points of each GPU merged."""
    by_gpu = {point.gpu: point for point in a.points}
    for point in b.points:
        earlier = by_gpu.get(point.gpu)
        by_gpu[point.gpu] = point if earlier is None else telemetry.merge(earlier, point)
    return Batch(a.seq, b.last, list(by_gpu.values()))


class PointWindow:
    """One job attempt's batches not yet acknowledged, oldest first."""

    def __init__(self, next_seq: int = 0, max_held: int = MAX_HELD) -> None:
        self.next_seq = next_seq
        self.max_held = max_held
        self.held: list[Batch] = []

    def __bool__(self) -> bool:
        return bool(self.held)

    def add(self, points: list[Point]) -> Batch | None:
        """Hold a new batch of points; the batch, or None when there were no points."""
        if not points:
            return None
        batch = Batch(self.next_seq, self.next_seq, points)
        self.next_seq += 1
        self.held.append(batch)
        if len(self.held) > self.max_held:
            # Only the batches after the last one sent, which follow each other: one sent
            # may be stored already, and a merged batch must never cover it.
            tail = len(self.held)
            while tail > 0 and not self.held[tail - 1].sent_at:
                tail -= 1
            keep = max(2, self.max_held - tail)
            self.held[tail:] = telemetry.coarsen(self.held[tail:], keep, merge_batches)
        return batch

    def ack(self, last: int) -> None:
        """The coordinator has stored every batch up to `last`."""
        self.held = [batch for batch in self.held if batch.last > last]

    def due(self, now: float, older_than: float) -> list[Batch]:
        """The batches last sent `older_than` seconds ago or more (or never)."""
        return [batch for batch in self.held if now - batch.sent_at >= older_than]

    def drop(self) -> None:
        """Forget every held batch (a coordinator that takes no TELEMETRY)."""
        self.held = []
