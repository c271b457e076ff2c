"""The jobs in SQL: submit, read, the queue, claims, and every change of a job's status
(store.base.Store says what each operation means)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from gpubox import errors, fields, models
from gpubox.jobfilter import JobFilter
from gpubox.store import backend, base, columns, telemetry

_time = models.format_time


IDEMPOTENCY_S = 24 * 3600  # how long POST /api/v1/jobs remembers an Idempotency-Key


class _Raced(Exception):
    """Another transaction stored the same idempotency key between our look and our insert."""


def label_pair(key: str, value: str) -> str:
    """A label as one indexed text: key and value joined by the ASCII unit separator."""
    return f"{key}\x1f{value}"


class JobStore(backend.Backend):
    """The store's operations on jobs."""

    def create_job(
        self, spec: models.JobSpec, now: datetime, max_queued: int | None = None
    ) -> models.Job:
        with self._write() as cur:
            if max_queued is not None:
                self._check_queued(cur, spec.submitter or "", max_queued)
            return self._create(cur, spec, now)

    def _check_queued(self, cur: Any, submitter: str, max_queued: int) -> None:
        """Refuse a submit that would take `submitter` past `max_queued` queued jobs. Inside
        the write transaction: SQLite's writers take turns, and PostgreSQL's lock the token's
        row first, so two submits cannot both see one place left."""
        cur.execute("SELECT name FROM tokens WHERE name = ?" + self.row_lock, (submitter,))
        cur.execute(
            "SELECT COUNT(*) AS n FROM jobs WHERE submitter = ? AND status = 'QUEUED'",
            (submitter,),
        )
        queued = int(cur.fetchone()["n"])
        if queued >= max_queued:
            raise errors.OverCap(
                f"token {submitter!r} has {queued} jobs queued, its max_queued cap: submit"
                " again once some have started (or ask an admin to raise it: gpubox token"
                f" set {submitter} --max-queued N)",
                "max_queued",
            )

    def _create(self, cur: Any, spec: models.JobSpec, now: datetime) -> models.Job:
        # The job as get_job would read it back, without reading it; the insert takes its
        # columns by name from JOB_FIELDS, so no value can land in another column.
        job = columns.new_job(spec, now)
        job_id = self._insert_job(cur, columns.insert_row(job))
        if spec.labels:
            cur.executemany(
                "INSERT INTO job_labels (job_id, pair) VALUES (?, ?)",
                [(job_id, label_pair(k, v)) for k, v in spec.labels.items()],
            )
        return dataclasses.replace(job, id=job_id)

    def create_job_once(
        self,
        spec: models.JobSpec,
        now: datetime,
        token: str,
        key: str,
        digest: str,
        max_queued: int | None = None,
    ) -> tuple[models.Job, bool]:
        cutoff = models.format_time(now - timedelta(seconds=IDEMPOTENCY_S))
        for _ in range(3):
            try:
                with self._write() as cur:
                    cur.execute(
                        "SELECT digest, job_id, created_at FROM idempotency"
                        " WHERE token = ? AND key = ?",
                        (token, key),
                    )
                    found = cur.fetchone()
                    if found is not None and found["created_at"] > cutoff:
                        if found["digest"] != digest:
                            raise errors.IdempotencyConflict(
                                f"the Idempotency-Key {key!r} was used for another request"
                                " (another body) in the last 24 hours: use a new key"
                            )
                        return self._get(cur, int(found["job_id"])), False
                    cur.execute("DELETE FROM idempotency WHERE created_at <= ?", (cutoff,))
                    if max_queued is not None:
                        self._check_queued(cur, spec.submitter or "", max_queued)
                    job = self._create(cur, spec, now)
                    cur.execute(
                        "INSERT INTO idempotency (token, key, digest, job_id, created_at)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (token, key) DO NOTHING",
                        (token, key, digest, job.id, models.format_time(now)),
                    )
                    if cur.rowcount != 1:
                        raise _Raced  # another request with this key committed first
                    return job, True
            except _Raced:
                continue  # undone: look again, and find the job the other request made
        raise errors.StoreError(f"the Idempotency-Key {key!r} kept racing with other requests")

    def _get(self, cur: Any, job_id: int, lock: bool = False) -> models.Job:
        cur.execute("SELECT * FROM jobs WHERE id = ?" + (self.row_lock if lock else ""), (job_id,))
        row = cur.fetchone()
        if row is None:
            raise errors.JobNotFound(job_id)
        return columns.job_from_row(row)

    def get_job(self, job_id: int) -> models.Job:
        with self._read() as cur:
            return self._get(cur, job_id)

    def list_jobs(
        self,
        status: models.Status | None = None,
        limit: int = 50,
        before: int | None = None,
        where: JobFilter | None = None,
    ) -> list[models.Job]:
        conditions, params = self._filter_sql(where or JobFilter())
        if status is not None:
            conditions.append("status = ?")
            params.append(status.value)
        if before is not None:
            conditions.append("id < ?")
            params.append(before)
        sql = "SELECT * FROM jobs"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._read() as cur:
            cur.execute(sql, params)
            return [columns.job_from_row(row) for row in cur.fetchall()]

    def overdue_queued(self, now: datetime, limit: int = 100) -> list[models.Job]:
        with self._read() as cur:
            cur.execute(
                f"SELECT * FROM {self.deadline_index} WHERE status = 'QUEUED'"
                " AND queue_deadline IS NOT NULL AND queue_deadline < ? ORDER BY queue_deadline"
                " LIMIT ?",
                (_time(now), limit),
            )
            return [columns.job_from_row(row) for row in cur.fetchall()]

    def fail_queued(self, job_id: int, error: str, now: datetime) -> bool:
        with self._write() as cur:
            cur.execute(
                "UPDATE jobs SET status = 'ERROR', finished_at = ?, updated_at = ?,"
                " sealed = NULL, error = ? WHERE id = ? AND status = 'QUEUED'",
                (_time(now), _time(now), error, job_id),
            )
            return bool(cur.rowcount == 1)

    def _filter_sql(self, where: JobFilter) -> tuple[list[str], list[Any]]:
        """SQL conditions (joined by AND) and their parameters for `where`."""
        conditions: list[str] = []
        params: list[Any] = []
        if where.statuses:
            conditions.append(f"status IN ({', '.join('?' for _ in where.statuses)})")
            params += [s.value for s in where.statuses]
        if where.name:
            # substr, not LIKE: a prefix taken as it is (LIKE's % and _ would be patterns,
            # and SQLite's LIKE ignores case where PostgreSQL's does not).
            conditions.append("substr(name, 1, ?) = ?")
            params += [len(where.name), where.name]
        if where.submitter:
            conditions.append("submitter = ?")
            params.append(where.submitter)
        for key, value in where.labels:
            conditions.append("id IN (SELECT job_id FROM job_labels WHERE pair = ?)")
            params.append(label_pair(key, value))
        for key, value in where.metadata:
            expression, path = self.json_text("metadata", key)
            conditions.append(f"{expression} = ?")
            params += [path, value]
        for column, when, op in (
            ("created_at", where.created_after, ">"),
            ("created_at", where.created_before, "<"),
        ):
            if when is not None:
                conditions.append(f"{column} {op} ?")
                params.append(models.format_time(when))
        return conditions, params

    def jobs_by_status(self) -> dict[str, int]:
        counts = {status.value: 0 for status in models.Status}
        with self._read() as cur:
            cur.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
            counts.update({row["status"]: int(row["n"]) for row in cur.fetchall()})
        return counts

    def oldest_queued(self) -> datetime | None:
        with self._read() as cur:
            cur.execute("SELECT MIN(created_at) AS t FROM jobs WHERE status = 'QUEUED'")
            return models.parse_time(cur.fetchone()["t"])

    def queued_jobs(
        self,
        limit: int = 500,
        known: Mapping[int, models.Job] | None = None,
        shape: str | None = None,
    ) -> list[models.Job]:
        where = "status = 'QUEUED'" + ("" if shape is None else " AND shape = ?")
        queue = f"FROM jobs WHERE {where} ORDER BY priority DESC, id LIMIT ?"
        params = (limit,) if shape is None else (shape, limit)
        with self._read() as cur:
            if not known:
                cur.execute(f"SELECT * {queue}", params)
                return [columns.job_from_row(row) for row in cur.fetchall()]
            cur.execute(f"SELECT id {queue}", params)
            return columns.jobs_by_id(cur, [row["id"] for row in cur.fetchall()], known)

    def queued_shapes(self) -> list[str]:
        # Each step finds the next shape in the index (jobs_shape) after the one before: one
        # lookup per shape instead of a scan of every queued job. Measured with SQLite on
        # 100,000 queued jobs: 2 ms for 1,000 shapes, 150 ms when every job has its own.
        with self._read() as cur:
            cur.execute(
                "WITH RECURSIVE shapes (shape) AS ("
                " SELECT MIN(shape) FROM jobs WHERE status = 'QUEUED'"
                " UNION ALL SELECT (SELECT MIN(shape) FROM jobs"
                " WHERE status = 'QUEUED' AND shape > shapes.shape)"
                " FROM shapes WHERE shapes.shape IS NOT NULL)"
                " SELECT shape FROM shapes WHERE shape IS NOT NULL"
            )
            return [row["shape"] for row in cur.fetchall()]

    def claim_job(
        self, job_id: int, worker: str, gpu_ids: Sequence[str], now: datetime
    ) -> models.Job | None:
        with self._write() as cur:
            if gpu_ids:
                # A GPU belongs to at most one running job: refuse one still held.
                cur.execute(
                    "SELECT gpu_ids FROM jobs WHERE worker = ? AND status = 'RUNNING'", (worker,)
                )
                held = {uuid for row in cur.fetchall() for uuid in fields.load_json(row["gpu_ids"])}
                if held & set(gpu_ids):
                    return None
            cur.execute(
                "UPDATE jobs SET status = 'RUNNING', worker = ?, attempts = attempts + 1,"
                " gpu_ids = ?, executed_at = NULL, updated_at = ?, points_seq = -1,"
                " points_kept = 0"
                " WHERE id = ? AND status = 'QUEUED'",
                (worker, fields.dump_json(list(gpu_ids)), _time(now), job_id),
            )
            if cur.rowcount != 1:
                return None
            return self._get(cur, job_id)

    def unclaim_job(self, job_id: int, attempt: int, now: datetime) -> bool:
        with self._write() as cur:
            # A cancel that came in meanwhile applies as it would have to a queued job.
            cur.execute(
                "UPDATE jobs SET status = CASE WHEN cancel_requested = 1 THEN 'CANCELLED'"
                " ELSE 'QUEUED' END, worker = NULL, gpu_ids = '[]', attempts = attempts - 1,"
                " finished_at = CASE WHEN cancel_requested = 1 THEN ? END, updated_at = ?"
                " WHERE id = ? AND attempts = ? AND status = 'RUNNING'",
                (_time(now), _time(now), job_id, attempt),
            )
            return bool(cur.rowcount == 1)

    def mark_started(
        self,
        job_id: int,
        attempt: int,
        executed_at: datetime,
        image_id: str | None = None,
        image_digest: str | None = None,
    ) -> bool:
        with self._write() as cur:
            cur.execute(
                "UPDATE jobs SET executed_at = ?, updated_at = ?, image_id = ?, image_digest = ?"
                " WHERE id = ? AND attempts = ? AND status = 'RUNNING'",
                (
                    _time(executed_at),
                    _time(models.utcnow()),
                    image_id,
                    image_digest,
                    job_id,
                    attempt,
                ),
            )
            return bool(cur.rowcount == 1)

    def finish_job(
        self,
        job_id: int,
        attempt: int,
        status: models.Status,
        exit_code: int | None,
        error: str | None,
        executed_at: datetime | None,
        finished_at: datetime,
        last_seq: int,
    ) -> base.Finish:
        if not status.terminal:
            raise errors.WrongState(f"{status.value} is not a final status")
        with self._write() as cur:
            cur.execute(
                "SELECT status, attempts, log_seq, points_kept FROM jobs WHERE id = ?"
                + self.row_lock,
                (job_id,),
            )
            row = cur.fetchone()
            if row is None or row["status"] != "RUNNING" or row["attempts"] != attempt:
                return base.Finish.IGNORED
            if row["log_seq"] < last_seq:
                return base.Finish.MISSING_LINES
            # No point stored for this attempt (most jobs: no GPU, or a short run): no summary
            # to work out, and no read of the telemetry table for it.
            summary = telemetry.summary_json(cur, job_id, attempt) if row["points_kept"] else None
            cur.execute(
                "UPDATE jobs SET status = ?, exit_code = ?, error = ?,"
                " executed_at = COALESCE(executed_at, ?), finished_at = ?, updated_at = ?,"
                " sealed = NULL, telemetry = ? WHERE id = ?",
                (
                    status.value,
                    exit_code,
                    error,
                    _time(executed_at),
                    _time(finished_at),
                    _time(models.utcnow()),
                    summary,
                    job_id,
                ),
            )
            return base.Finish.APPLIED

    def cancel_job(self, job_id: int, now: datetime) -> models.Job:
        with self._write() as cur:
            job = self._get(cur, job_id, lock=True)
            if not models.can_move(job.status, models.Status.CANCELLED):
                raise errors.WrongState(
                    f"job {job_id} is already {job.status.value} and cannot be cancelled"
                )
            if job.status is models.Status.QUEUED:
                cur.execute(
                    "UPDATE jobs SET status = 'CANCELLED', finished_at = ?, updated_at = ?,"
                    " sealed = NULL, error = 'cancelled while queued' WHERE id = ?",
                    (_time(now), _time(now), job_id),
                )
            else:  # RUNNING: the worker stops it and reports CANCELLED
                cur.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                    (_time(now), job_id),
                )
            return self._get(cur, job_id)

    def release_job(
        self, job_id: int, attempt: int, error: str, now: datetime
    ) -> models.Job | None:
        with self._write() as cur:
            job = self._get(cur, job_id, lock=True)
            if job.status is not models.Status.RUNNING or job.attempts != attempt:
                return None
            if job.cancel_requested:
                cur.execute(
                    "UPDATE jobs SET status = 'CANCELLED', finished_at = ?, updated_at = ?,"
                    " sealed = NULL, error = ?, telemetry = ? WHERE id = ?",
                    (
                        _time(now),
                        _time(now),
                        f"cancelled; {error}",
                        telemetry.summary_json(cur, job_id, attempt),
                        job_id,
                    ),
                )
            elif job.attempts <= job.spec.max_retries:
                # One line in its log says where this attempt's output ends and why: the next
                # attempt's lines follow it.
                seq = job.log_seq + 1
                marker = (
                    f"[gpubox: attempt {attempt} ended: {error}; the job is queued again"
                    f" (retry {attempt} of {job.spec.max_retries})]"
                )
                stamp = f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond:06d}000Z"
                self._insert_logs(cur, [(job_id, seq, stamp, models.GPUBOX_STREAM, marker)])
                cur.execute(
                    "UPDATE jobs SET status = 'QUEUED', worker = NULL, gpu_ids = '[]',"
                    " executed_at = NULL, updated_at = ?, log_seq = ?,"
                    " log_bytes = log_bytes + ? WHERE id = ?",
                    (_time(now), seq, len(backend.utf8(marker)), job_id),
                )
            else:
                cur.execute(
                    "UPDATE jobs SET status = 'ERROR', error = ?, finished_at = ?,"
                    " updated_at = ?, sealed = NULL, telemetry = ? WHERE id = ?",
                    (
                        error,
                        _time(now),
                        _time(now),
                        telemetry.summary_json(cur, job_id, attempt),
                        job_id,
                    ),
                )
            return self._get(cur, job_id)

    def placements(self) -> list[base.Placed]:
        with self._read() as cur:
            cur.execute("SELECT id, worker, gpu_ids FROM jobs WHERE status = 'RUNNING' ORDER BY id")
            return [
                base.Placed(
                    int(row["id"]), row["worker"] or "", tuple(fields.load_json(row["gpu_ids"]))
                )
                for row in cur.fetchall()
            ]

    def running_jobs(self, worker: str | None = None) -> list[models.Job]:
        sql, params = "SELECT * FROM jobs WHERE status = 'RUNNING'", []
        if worker is not None:
            sql += " AND worker = ?"
            params.append(worker)
        with self._read() as cur:
            cur.execute(sql + " ORDER BY id", params)
            return [columns.job_from_row(row) for row in cur.fetchall()]
