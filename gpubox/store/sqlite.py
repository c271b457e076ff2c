"""The SQLite backend: one file in WAL mode, one connection per thread, writes under
BEGIN IMMEDIATE so a claim takes the write lock before it reads."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from gpubox import errors
from gpubox.store import sql

log = logging.getLogger(__name__)

# One script per schema version; statements separated by ";" at the end of a line.
MIGRATIONS = (
    """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    priority INTEGER NOT NULL,
    image TEXT NOT NULL,
    command TEXT,
    env TEXT NOT NULL,
    sealed TEXT,
    gpus INTEGER NOT NULL,
    labels TEXT NOT NULL,
    timeout REAL,
    max_retries INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    status TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    executed_at TEXT,
    finished_at TEXT,
    exit_code INTEGER,
    error TEXT,
    gpu_ids TEXT NOT NULL DEFAULT '[]',
    log_seq INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX jobs_queue ON jobs (priority DESC, id) WHERE status = 'QUEUED';
CREATE INDEX jobs_worker ON jobs (worker, status);
CREATE TABLE job_labels (
    job_id INTEGER NOT NULL,
    pair TEXT NOT NULL,
    PRIMARY KEY (job_id, pair)
) WITHOUT ROWID;
CREATE TABLE logs (
    job_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts TEXT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    connected INTEGER NOT NULL,
    last_seen TEXT NOT NULL
);
CREATE TABLE tokens (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL
);
""",
    # 2: which GPUs a job wants, and its container options (JSON)
    """
ALTER TABLE jobs ADD COLUMN gpu_model TEXT;
ALTER TABLE jobs ADD COLUMN gpu_memory_gb REAL;
ALTER TABLE jobs ADD COLUMN container TEXT NOT NULL DEFAULT '{}';
""",
)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


class SqliteStore(sql.SqlStore):
    """The store in one SQLite file."""

    MIGRATIONS = MIGRATIONS

    def __init__(self, path: str, upgrade: bool = True) -> None:
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._prepare(upgrade)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise errors.StoreError("the store is closed")
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.row_factory = _dict_row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 30000")
        except sqlite3.Error as exc:
            raise errors.StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _current_version(self, cur: Any) -> int:
        cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
        if cur.fetchone() is None:
            return 0
        cur.execute("SELECT version FROM schema_version")
        row = cur.fetchone()
        return int(row["version"]) if row else 0

    def _apply(self, cur: Any, script: str) -> None:
        # executescript() would commit the open transaction: run statement by statement.
        for statement in script.split(";\n"):
            if statement.strip():
                cur.execute(statement)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        # Writers of this process queue on a lock: SQLite's own wait for a busy database
        # sleeps in growing steps (up to 100 ms), which under load costs far more than the
        # writes. busy_timeout still covers other processes (gpubox token create, …).
        batch = getattr(self._local, "batch", None)
        if batch is not None:
            # Inside batch(): a savepoint, so that a failed write undoes only itself.
            with self._read() as cur:
                cur.execute("SAVEPOINT write")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK TO write")
                    cur.execute("RELEASE write")
                    raise
                cur.execute("RELEASE write")
            return
        with self._write_lock, self._read() as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.connection.rollback()
                raise
            cur.connection.commit()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._write() as cur:
            self._local.batch = cur.connection
            try:
                yield
            finally:
                self._local.batch = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        cur = self._connect().cursor()
        try:
            yield cur
        except sqlite3.OperationalError as exc:  # locked, busy, disk I/O: worth a retry
            raise errors.StoreUnavailable(f"sqlite: {exc}") from exc
        except sqlite3.Error as exc:
            raise errors.StoreError(f"sqlite: {exc}") from exc
        finally:
            cur.close()

    def _insert_job(self, cur: Any, values: Sequence[Any]) -> int:
        marks = ", ".join("?" * len(values))
        cur.execute(f"INSERT INTO jobs ({sql.JOB_COLUMNS}) VALUES ({marks})", values)
        return int(cur.lastrowid)

    def finish_import(self) -> None:
        """Nothing to do: AUTOINCREMENT's counter follows the highest id inserted."""

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._local = threading.local()
