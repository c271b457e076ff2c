"""Jobs' GPU telemetry in SQL: points stored once per TELEMETRY batch, merged past a bound
per job and GPU, read back for the API, and summed up when a job ends (store.base.Store says
what each operation means)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from gpubox import telemetry
from gpubox.fields import dump_json, load_json
from gpubox.store import backend
from gpubox.telemetry import Point

# The telemetry table's columns for a point, in gpubox.telemetry.POINT_FIELDS order (start
# and end are reserved words in SQL).
_COLUMNS = (
    "gpu, t_start, t_end, samples, util_mean, util_max, memory_max_mb, memory_total_mb,"
    " power_mean_w, temperature_max_c"
)
_INSERT = (
    f"INSERT INTO telemetry (job_id, attempt, seq, {_COLUMNS})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)


def _point(row: dict[str, Any]) -> Point:
    return Point(
        gpu=row["gpu"],
        start=row["t_start"],
        end=row["t_end"],
        samples=row["samples"],
        util_mean=row["util_mean"],
        util_max=row["util_max"],
        memory_max_mb=row["memory_max_mb"],
        memory_total_mb=row["memory_total_mb"],
        power_mean_w=row["power_mean_w"],
        temperature_max_c=row["temperature_max_c"],
    )


class TelemetryStore(backend.Backend):
    """The store's operations on jobs' GPU telemetry."""

    def add_points(
        self,
        job_id: int,
        attempt: int,
        seq: int,
        last: int,
        points: Sequence[Point],
        max_points: int = 2000,
    ) -> int:
        with self._write() as cur:
            return self._add_points(cur, job_id, attempt, seq, last, points, max_points)

    def _add_points(
        self,
        cur: Any,
        job_id: int,
        attempt: int,
        seq: int,
        last: int,
        points: Sequence[Point],
        max_points: int,
    ) -> int:
        cur.execute(
            "SELECT status, attempts, gpu_ids, points_seq, points_kept FROM jobs WHERE id = ?"
            + self.row_lock,
            (job_id,),
        )
        row = cur.fetchone()
        if row is None or row["attempts"] != attempt or row["status"] != "RUNNING":
            return last  # no longer this attempt's: taken, so the worker holds it no more
        stored = int(row["points_seq"])
        if last <= stored or seq > stored + 1:
            return stored  # a batch stored already, or one after a gap the worker fills first
        # Only the GPUs the job holds: a worker cannot make up series of its own.
        held = set(load_json(row["gpu_ids"]))
        points = [point for point in points if point.gpu in held]
        cur.executemany(_INSERT, [(job_id, attempt, last, *point.to_row()) for point in points])
        # points_kept: the most points any one GPU of the attempt has, or more (no count
        # needed until it passes the bound; a batch adds at most its most of one GPU).
        per_gpu = collections.Counter(point.gpu for point in points)
        kept = int(row["points_kept"]) + max(per_gpu.values(), default=0)
        if kept > max_points:
            kept = self._bound(cur, job_id, attempt, max_points)
        cur.execute(
            "UPDATE jobs SET points_seq = ?, points_kept = ? WHERE id = ?", (last, kept, job_id)
        )
        return last

    def _bound(self, cur: Any, job_id: int, attempt: int, max_points: int) -> int:
        """Merge the older half of each of the attempt's series past max_points; returns the
        most points a GPU has now."""
        cur.execute(
            "SELECT gpu, COUNT(*) AS n FROM telemetry WHERE job_id = ? AND attempt = ?"
            " GROUP BY gpu",
            (job_id, attempt),
        )
        most = 0
        for found in cur.fetchall():
            count = int(found["n"])
            if count > max_points:
                count -= self._merge(cur, job_id, attempt, found["gpu"])
            most = max(most, count)
        return most

    def _merge(self, cur: Any, job_id: int, attempt: int, gpu: str) -> int:
        """Merge the older half of a GPU's points two by two; returns how many fewer it has."""
        where = "WHERE job_id = ? AND attempt = ? AND gpu = ?"
        key = (job_id, attempt, gpu)
        cur.execute(f"SELECT seq, {_COLUMNS} FROM telemetry {where} ORDER BY t_start", key)
        rows = cur.fetchall()
        older = (len(rows) // 2) & ~1  # an even count: merged two by two
        merged = [
            (max(a["seq"], b["seq"]), telemetry.merge(_point(a), _point(b)))
            for a, b in zip(rows[0:older:2], rows[1:older:2], strict=True)
        ]
        cur.execute(
            f"DELETE FROM telemetry {where} AND t_start <= ?", (*key, rows[older - 1]["t_start"])
        )
        cur.executemany(_INSERT, [(job_id, attempt, s, *p.to_row()) for s, p in merged])
        return len(merged)

    def points_seq(self, job_id: int, attempt: int) -> int:
        with self._read() as cur:
            cur.execute("SELECT attempts, points_seq FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
        return int(row["points_seq"]) if row and row["attempts"] == attempt else -1

    def read_points(
        self, job_id: int, since: float | None = None, limit: int = 10_000
    ) -> list[tuple[int, Point]]:
        sql = f"SELECT attempt, {_COLUMNS} FROM telemetry WHERE job_id = ?"
        params: list[Any] = [job_id]
        if since is not None:
            sql += " AND t_end > ?"
            params.append(since)
        with self._read() as cur:
            cur.execute(sql + " ORDER BY attempt, t_start, gpu LIMIT ?", (*params, limit))
            return [(row["attempt"], _point(row)) for row in cur.fetchall()]


def summary_json(cur: Any, job_id: int, attempt: int) -> str | None:
    """The attempt's telemetry summary (telemetry.summarize) as the jobs table's column
    holds it: JSON, or None when it has no points. For the statement that ends the job."""
    cur.execute(
        f"SELECT {_COLUMNS} FROM telemetry WHERE job_id = ? AND attempt = ?", (job_id, attempt)
    )
    return dump_json(telemetry.summarize(_point(row) for row in cur.fetchall()))
