"""The store contract in portable SQL, shared by the SQLite and PostgreSQL backends.

A backend supplies connections and transactions (`_write`, `_read`), its DDL, and the few
statements that differ; the SQL here is the same text on both (no RETURNING, `?` placeholders,
rewritten by a backend that needs another style).
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import operator
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from gpubox import errors, models
from gpubox.store import base

log = logging.getLogger(__name__)

SHAPE_VERSION = 3  # the schema version that added jobs.shape


def label_pair(key: str, value: str) -> str:
    """A label as one indexed text: key and value joined by the ASCII unit separator."""
    return f"{key}\x1f{value}"


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    if not value and type(value) in _EMPTY_TEXT:
        return _EMPTY_TEXT[type(value)]
    return _encode(value)


# One encoder for all: json.dumps builds a new one per call when given separators.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_EMPTY_TEXT: dict[type, str] = {dict: "{}", list: "[]"}


def _load(value: str | None) -> Any:
    if value is None:
        return None
    empty = _EMPTY.get(value)  # most maps and lists of a job are empty: no parse for those
    return empty() if empty is not None else json.loads(value)


_EMPTY: dict[str, Any] = {"{}": dict, "[]": list}
# How long a token found is taken on trust without asking the database again. Every request
# looks its token up: without this, that read costs the coordinator more than the job's own
# insert (a database round trip, and on SQLite a read transaction that wakes other threads).
# A revoke through this store takes effect at once; one by another process (`gpubox token
# revoke`) within this many seconds.
TOKEN_CACHE_S = 1.0
# Log rows fetched at a time by a read bounded in bytes: at most 32 lines of 64 KiB (2 MiB)
# held before the bound is checked.
FETCH_ROWS = 32

_STATUS = {status.value: status for status in models.Status}


# A row (seq, ts, stream, line) as a LogLine, without a Python call per row (pages of
# thousands of lines).
_log_line = functools.partial(tuple.__new__, models.LogLine)
_LINE = operator.itemgetter(3)
_ROW_LINE = operator.itemgetter(4)  # of a row to insert: (job_id, seq, ts, stream, line)
_utf8 = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")


def _time(value: datetime | None) -> str | None:
    return models.format_time(value)


def job_from_row(row: dict[str, Any]) -> models.Job:
    """A Job from a `jobs` row (a mapping of column name to value)."""
    spec = models.JobSpec(
        name=row["name"],
        description=row["description"],
        priority=row["priority"],
        image=row["image"],
        command=_load(row["command"]),
        env=_load(row["env"]),
        sealed=row["sealed"],
        gpus=row["gpus"],
        labels=_load(row["labels"]),
        timeout=row["timeout"],
        max_retries=row["max_retries"],
        metadata=_load(row["metadata"]),
        gpu_model=row["gpu_model"],
        gpu_memory_gb=row["gpu_memory_gb"],
        container=models.ContainerOptions.from_dict(_load(row["container"])),
        submitter=row["submitter"],
        allow_process=bool(row["allow_process"]),
    )
    return models.Job(
        id=row["id"],
        spec=spec,
        status=_STATUS[row["status"]],
        created_at=models.parse_time(row["created_at"]),  # type: ignore[arg-type]
        updated_at=models.parse_time(row["updated_at"]),  # type: ignore[arg-type]
        worker=row["worker"],
        attempts=row["attempts"],
        executed_at=models.parse_time(row["executed_at"]),
        finished_at=models.parse_time(row["finished_at"]),
        exit_code=row["exit_code"],
        error=row["error"],
        gpu_ids=_load(row["gpu_ids"]) or [],
        log_seq=row["log_seq"],
        cancel_requested=bool(row["cancel_requested"]),
    )


class SqlStore(base.Store):
    """Every store operation written once in SQL; backends provide connections."""

    # Appended to a read that the same transaction then updates (SQLite's BEGIN IMMEDIATE
    # already serialises writers; PostgreSQL locks the row).
    row_lock = ""
    # The bytes of a log line's text in UTF-8, in SQL (SQLite reads the text to count them;
    # PostgreSQL's OCTET_LENGTH reads the size it stored).
    octet_length = "LENGTH(CAST(line AS BLOB))"
    # The schema, one script per version: MIGRATIONS[0] makes version 1, and so on.
    MIGRATIONS: Sequence[str] = ()

    def __init__(self) -> None:
        # Tokens found lately (find_token): digest -> (token, monotonic time it was read).
        self._tokens_found: dict[str, tuple[models.Token, float]] = {}
        self._tokens_generation = 0
        self._tokens_lock = threading.Lock()

    @property
    def latest_version(self) -> int:
        return len(self.MIGRATIONS)

    @abc.abstractmethod
    def _write(self) -> contextlib.AbstractContextManager[Any]:
        """A write transaction that takes the write lock at once; yields a cursor."""

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Any]:
        """A cursor for reads outside any write transaction."""

    @abc.abstractmethod
    def _insert_job(self, cur: Any, row: dict[str, Any]) -> int:
        """Insert a job row (column name → value) and return its id from the backend's
        counter."""

    # --- jobs ---------------------------------------------------------------------------------

    def create_job(self, spec: models.JobSpec, now: datetime) -> models.Job:
        # By column name: the insert takes its columns from these keys, so a value cannot
        # land in another column (a positional list did that silently).
        row = {
            "name": spec.name,
            "description": spec.description,
            "priority": spec.priority,
            "image": spec.image,
            "command": _dump(spec.command),
            "env": _dump(spec.env),
            "sealed": spec.sealed,
            "gpus": spec.gpus,
            "labels": _dump(spec.labels),
            "timeout": spec.timeout,
            "max_retries": spec.max_retries,
            "metadata": _dump(spec.metadata),
            "status": models.Status.QUEUED.value,
            "created_at": _time(now),
            "updated_at": _time(now),
            "gpu_model": spec.gpu_model,
            "gpu_memory_gb": spec.gpu_memory_gb,
            "container": _dump(spec.container.to_dict()),
            "shape": spec.needs.shape,
            "submitter": spec.submitter,
            "allow_process": int(spec.allow_process),
        }
        with self._write() as cur:
            job_id = self._insert_job(cur, row)
            if spec.labels:
                cur.executemany(
                    "INSERT INTO job_labels (job_id, pair) VALUES (?, ?)",
                    [(job_id, label_pair(k, v)) for k, v in spec.labels.items()],
                )
        # The job as get_job would read it back, without reading it: what was stored is
        # known (REAL columns give floats; auth and secrets are never stored, only sealed).
        stored = dataclasses.replace(
            spec,
            auth=None,
            secrets={},
            timeout=None if spec.timeout is None else float(spec.timeout),
            gpu_memory_gb=None if spec.gpu_memory_gb is None else float(spec.gpu_memory_gb),
        )
        return models.Job(job_id, stored, models.Status.QUEUED, created_at=now, updated_at=now)

    def _get(self, cur: Any, job_id: int, lock: bool = False) -> models.Job:
        cur.execute("SELECT * FROM jobs WHERE id = ?" + (self.row_lock if lock else ""), (job_id,))
        row = cur.fetchone()
        if row is None:
            raise errors.JobNotFound(job_id)
        return job_from_row(row)

    def get_job(self, job_id: int) -> models.Job:
        with self._read() as cur:
            return self._get(cur, job_id)

    def list_jobs(
        self, status: models.Status | None = None, limit: int = 50, before: int | None = None
    ) -> list[models.Job]:
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._read() as cur:
            cur.execute(sql, params)
            return [job_from_row(row) for row in cur.fetchall()]

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
                return [job_from_row(row) for row in cur.fetchall()]
            cur.execute(f"SELECT id {queue}", params)
            ids = [row["id"] for row in cur.fetchall()]
            found = {job_id: known[job_id] for job_id in ids if job_id in known}
            missing = [job_id for job_id in ids if job_id not in found]
            for start in range(0, len(missing), 500):  # within any backend's parameter limit
                chunk = missing[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                cur.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", chunk)
                found.update((row["id"], job_from_row(row)) for row in cur.fetchall())
            return [found[job_id] for job_id in ids if job_id in found]

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
                held = {uuid for row in cur.fetchall() for uuid in _load(row["gpu_ids"])}
                if held & set(gpu_ids):
                    return None
            cur.execute(
                "UPDATE jobs SET status = 'RUNNING', worker = ?, attempts = attempts + 1,"
                " gpu_ids = ?, executed_at = NULL, updated_at = ?"
                " WHERE id = ? AND status = 'QUEUED'",
                (worker, _dump(list(gpu_ids)), _time(now), job_id),
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

    def mark_started(self, job_id: int, attempt: int, executed_at: datetime) -> bool:
        with self._write() as cur:
            cur.execute(
                "UPDATE jobs SET executed_at = ?, updated_at = ?"
                " WHERE id = ? AND attempts = ? AND status = 'RUNNING'",
                (_time(executed_at), _time(models.utcnow()), job_id, attempt),
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
                "SELECT status, attempts, log_seq FROM jobs WHERE id = ?" + self.row_lock,
                (job_id,),
            )
            row = cur.fetchone()
            if row is None or row["status"] != "RUNNING" or row["attempts"] != attempt:
                return base.Finish.IGNORED
            if row["log_seq"] < last_seq:
                return base.Finish.MISSING_LINES
            cur.execute(
                "UPDATE jobs SET status = ?, exit_code = ?, error = ?,"
                " executed_at = COALESCE(executed_at, ?), finished_at = ?, updated_at = ?,"
                " sealed = NULL WHERE id = ?",
                (
                    status.value,
                    exit_code,
                    error,
                    _time(executed_at),
                    _time(finished_at),
                    _time(models.utcnow()),
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
                    " sealed = NULL, error = ? WHERE id = ?",
                    (_time(now), _time(now), f"cancelled; {error}", job_id),
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
                    (_time(now), seq, len(_utf8(marker)), job_id),
                )
            else:
                cur.execute(
                    "UPDATE jobs SET status = 'ERROR', error = ?, finished_at = ?,"
                    " updated_at = ?, sealed = NULL WHERE id = ?",
                    (error, _time(now), _time(now), job_id),
                )
            return self._get(cur, job_id)

    def running_jobs(self, worker: str | None = None) -> list[models.Job]:
        sql, params = "SELECT * FROM jobs WHERE status = 'RUNNING'", []
        if worker is not None:
            sql += " AND worker = ?"
            params.append(worker)
        with self._read() as cur:
            cur.execute(sql + " ORDER BY id", params)
            return [job_from_row(row) for row in cur.fetchall()]

    # --- logs ---------------------------------------------------------------------------------

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
        cap.stored -= freed + len(_utf8(replaced["line"])) - len(_utf8(text))

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

    def _insert_logs(self, cur: Any, rows: Sequence[tuple[int, int, str, str, str]]) -> None:
        """Insert log rows in as few round trips as the backend allows."""
        cur.executemany(
            "INSERT INTO logs (job_id, seq, ts, stream, line) VALUES (?, ?, ?, ?, ?)", rows
        )

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
                sizes = list(map(len, map(_utf8, map(_LINE, chunk))))
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

    def _plain_rows(self, cur: Any) -> None:
        """Let `cur` return plain tuples, not dicts (for reads of many rows)."""
        cur.row_factory = None

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

    # --- workers ------------------------------------------------------------------------------

    def save_worker(self, worker: models.WorkerInfo) -> None:
        info = {
            "version": worker.version,
            "gpus": worker.gpus,
            "labels": worker.labels,
            "max_jobs": worker.max_jobs,
            "mounts": worker.mounts,
        }
        with self._write() as cur:
            cur.execute("DELETE FROM workers WHERE name = ?", (worker.name,))
            cur.execute(
                "INSERT INTO workers (name, info, connected, last_seen) VALUES (?, ?, ?, ?)",
                (worker.name, _dump(info), int(worker.connected), _time(worker.last_seen)),
            )

    def list_workers(self) -> list[models.WorkerInfo]:
        with self._read() as cur:
            cur.execute("SELECT * FROM workers ORDER BY name")
            rows = cur.fetchall()
        result = []
        for row in rows:
            info = _load(row["info"])
            result.append(
                models.WorkerInfo(
                    name=row["name"],
                    version=info["version"],
                    gpus=info["gpus"],
                    labels=info["labels"],
                    max_jobs=info["max_jobs"],
                    mounts=info.get("mounts", []),
                    connected=bool(row["connected"]),
                    last_seen=models.parse_time(row["last_seen"]),  # type: ignore[arg-type]
                )
            )
        return result

    # --- tokens -------------------------------------------------------------------------------

    def _tokens_changed(self) -> None:
        """After a token was added or revoked here: forget the tokens found, and keep a lookup
        that read the database before the change from keeping what it read."""
        with self._tokens_lock:
            self._tokens_generation += 1
            self._tokens_found = {}

    def add_token(self, token: models.Token) -> None:
        with self._write() as cur:
            cur.execute("SELECT name FROM tokens WHERE name = ?", (token.name,))
            if cur.fetchone() is not None:
                raise errors.WrongState(f"a token named {token.name!r} exists already")
            cur.execute(
                "INSERT INTO tokens (name, digest, role, created_at, allow_process)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    token.name,
                    token.digest,
                    token.role,
                    _time(token.created_at),
                    int(token.allow_process),
                ),
            )
        self._tokens_changed()

    def find_token(self, digest: str) -> models.Token | None:
        """The token with this digest; one found less than TOKEN_CACHE_S ago is not read
        again (an unknown digest always is: a new token works at once)."""
        found = self._tokens_found.get(digest)
        now = time.monotonic()
        if found is not None and now - found[1] < TOKEN_CACHE_S:
            return found[0]
        generation = self._tokens_generation
        with self._read() as cur:
            cur.execute("SELECT * FROM tokens WHERE digest = ?", (digest,))
            row = cur.fetchone()
        if row is None:
            return None
        token = _token(row)
        with self._tokens_lock:
            if generation == self._tokens_generation:
                self._tokens_found[digest] = (token, now)
        return token

    def revoke_token(self, name: str) -> bool:
        with self._write() as cur:
            cur.execute("DELETE FROM tokens WHERE name = ?", (name,))
            revoked = bool(cur.rowcount == 1)
        self._tokens_changed()
        return revoked

    def list_tokens(self) -> list[models.Token]:
        with self._read() as cur:
            cur.execute("SELECT * FROM tokens ORDER BY name")
            return [_token(row) for row in cur.fetchall()]

    # --- schema and bulk copy -----------------------------------------------------------------

    @abc.abstractmethod
    def _current_version(self, cur: Any) -> int:
        """The schema version recorded in the database, 0 when it has no schema yet."""

    @abc.abstractmethod
    def _apply(self, cur: Any, script: str) -> None:
        """Run one migration script inside the open write transaction."""

    def _prepare(self, upgrade: bool) -> None:
        """At open: bring the schema up to date, or only refuse one newer than ours."""
        if upgrade:
            applied = self.upgrade()
            if applied:
                log.info("store schema upgraded to version %d", applied[-1])
        elif self.schema_version() > self.latest_version:
            raise errors.StoreError(
                f"the store has schema version {self.schema_version()}, newer than this gpubox"
                f" knows ({self.latest_version}): upgrade gpubox"
            )

    def schema_version(self) -> int:
        with self._read() as cur:
            return self._current_version(cur)

    def upgrade(self) -> list[int]:
        applied = []
        with self._write() as cur:
            version = self._current_version(cur)
            if version > self.latest_version:
                raise errors.StoreError(
                    f"the store has schema version {version}, newer than this gpubox knows"
                    f" ({self.latest_version}): upgrade gpubox"
                )
            for number in range(version + 1, self.latest_version + 1):
                self._apply(cur, self.MIGRATIONS[number - 1])
                if number == SHAPE_VERSION:
                    _fill_shapes(cur)
                applied.append(number)
            if applied:
                cur.execute("DELETE FROM schema_version")
                cur.execute("INSERT INTO schema_version (version) VALUES (?)", (applied[-1],))
        return applied

    def count(self, table: str) -> int:
        _check_table(table)
        with self._read() as cur:
            cur.execute(f"SELECT COUNT(*) AS n FROM {table}")
            return int(cur.fetchone()["n"])

    def export_rows(self, table: str, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
        _check_table(table)
        keys = base.TABLES[table]
        order = ", ".join(keys)
        last: tuple[Any, ...] | None = None
        while True:
            with self._read() as cur:
                if last is None:
                    cur.execute(f"SELECT * FROM {table} ORDER BY {order} LIMIT ?", (batch,))
                else:
                    marks = ", ".join("?" * len(keys))
                    cur.execute(
                        f"SELECT * FROM {table} WHERE ({order}) > ({marks})"
                        f" ORDER BY {order} LIMIT ?",
                        (*last, batch),
                    )
                rows = cur.fetchall()
            if not rows:
                return
            yield rows
            last = tuple(rows[-1][key] for key in keys)

    def import_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        _check_table(table)
        if not rows:
            return
        columns = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._write() as cur:
            cur.executemany(sql, [tuple(row[c] for c in columns) for row in rows])

    def clear(self) -> None:
        with self._write() as cur:
            for table in base.TABLES:
                cur.execute(f"DELETE FROM {table}")


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
        sizes = list(map(len, map(_utf8, map(_ROW_LINE, rows))))
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


def _fill_shapes(cur: Any) -> None:
    """Write the shape of every job that may still run (schema version 3 added the column).
    Reads only the columns that version 3 has, so that later versions can still use it."""
    cur.execute(
        "SELECT id, command, gpus, labels, gpu_model, gpu_memory_gb, container FROM jobs"
        " WHERE status IN ('QUEUED', 'RUNNING')"
    )
    shapes = []
    for row in cur.fetchall():
        spec = models.JobSpec(
            name="",
            image="",
            command=_load(row["command"]),
            gpus=row["gpus"],
            labels=_load(row["labels"]),
            gpu_model=row["gpu_model"],
            gpu_memory_gb=row["gpu_memory_gb"],
            container=models.ContainerOptions.from_dict(_load(row["container"])),
        )
        shapes.append((spec.needs.shape, row["id"]))
    if shapes:
        cur.executemany("UPDATE jobs SET shape = ? WHERE id = ?", shapes)


def _check_table(table: str) -> None:
    if table not in base.TABLES:
        raise errors.StoreError(f"no table {table!r}")


def _token(row: dict[str, Any]) -> models.Token:
    return models.Token(
        name=row["name"],
        digest=row["digest"],
        role=row["role"],
        created_at=models.parse_time(row["created_at"]),  # type: ignore[arg-type]
        allow_process=bool(row["allow_process"]),
    )
