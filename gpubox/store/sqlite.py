"""The SQLite backend: one file in WAL mode, a connection per thread for reads, and one writer
connection whose transactions (BEGIN IMMEDIATE, so a claim takes the write lock before it
reads) are shared by concurrent writes: a group commit."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from gpubox import errors
from gpubox.store import columns, sql

log = logging.getLogger(__name__)

# A group commit ends after this many writes even while more writers wait.
MAX_GROUP_WRITES = 64
# Log rows per INSERT: 500 parameters, within every SQLite's limit (999 before 3.32).
ROWS_PER_INSERT = 100

# The SQL type of each of fields.COLUMN_TYPES.
TYPES = {
    "key": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "text": "TEXT",
    "int": "INTEGER",
    "bigint": "INTEGER",
    "real": "REAL",
}

# What each schema version does besides the jobs table's columns (models.JOB_FIELDS says which
# version added which column); statements separated by ";" at the end of a line.
OTHERS = (
    """
CREATE TABLE schema_version (version INTEGER NOT NULL);
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
    # 2: which GPUs a job wants, and its container options (jobs' columns only)
    "",
    # 3: each job's needs as one text (models.Needs.shape), so that the scheduler reads the
    # queue shape by shape; SqlStore.upgrade fills it in for the jobs not ended yet
    """
CREATE INDEX jobs_shape ON jobs (shape, priority DESC, id) WHERE status = 'QUEUED';
""",
    # 4: who submitted a job (its token's name; NULL for older jobs), and whether a token,
    # and each job it submitted, may use process-runtime workers (older ones: no)
    """
ALTER TABLE tokens ADD COLUMN allow_process INTEGER NOT NULL DEFAULT 0;
""",
    # 5: the bytes of a job's stored log, and where its head ends once lines are dropped
    # (the max_log_bytes cap); counted for jobs still running
    """
UPDATE jobs SET log_bytes = (
    SELECT COALESCE(SUM(LENGTH(CAST(line AS BLOB))), 0) FROM logs WHERE logs.job_id = jobs.id
) WHERE status = 'RUNNING';
""",
    # 6: the image a job ran (jobs' columns only)
    "",
    # 7: jobs' GPU telemetry, points of one GPU each (gpubox.telemetry; seq: the TELEMETRY
    # batch that brought it), and per job its idle_timeout, the summary of its points and
    # the last batch stored (jobs' columns); an index on status, so that the running jobs
    # and the count by status need no scan of every job (the dashboard's queue page,
    # /metrics: 13 ms and 19 ms with 100,000 jobs stored, without it)
    """
CREATE TABLE telemetry (
    job_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    gpu TEXT NOT NULL,
    t_start REAL NOT NULL,
    t_end REAL NOT NULL,
    seq INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    util_mean REAL NOT NULL,
    util_max REAL NOT NULL,
    memory_max_mb INTEGER NOT NULL,
    memory_total_mb INTEGER NOT NULL,
    power_mean_w REAL,
    temperature_max_c REAL,
    PRIMARY KEY (job_id, attempt, gpu, t_start)
) WITHOUT ROWID;
CREATE INDEX jobs_status ON jobs (status);
""",
    # 8: idempotency keys of POST /api/v1/jobs (kept 24 h: store.jobs.IDEMPOTENCY_S), an
    # index for the label filter of GET /api/v1/jobs, and jobs' queue_timeout (its column)
    """
CREATE TABLE idempotency (
    token TEXT NOT NULL,
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (token, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);
CREATE INDEX job_labels_pair ON job_labels (pair);
CREATE INDEX jobs_queue_deadline ON jobs (queue_deadline) WHERE status = 'QUEUED';
""",
    # 9: webhooks: each delivery of a job's start or end to a URL, with its attempts (the
    # signing secret sealed, erased once it is delivered or given up), and per job the events
    # still to be turned into deliveries (jobs.hooks_due; its columns)
    """
CREATE TABLE webhook_deliveries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    delivery TEXT NOT NULL,
    payload TEXT NOT NULL,
    secret TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_at TEXT NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    created_at TEXT NOT NULL,
    delivered_at TEXT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);
CREATE INDEX jobs_hooks_due ON jobs (id) WHERE hooks_due > 0;
""",
    # 10: fair share and caps: each token's caps (NULL: none), the queue by shape, priority
    # and submitter (the scheduler's fair order reads it group by group), the running jobs'
    # submitters, GPUs and start (what each submitter holds and has used, read every round),
    # the queued jobs of one submitter (max_queued), and the jobs by when they ended (the
    # usage report, and the use that fair share starts from)
    """
ALTER TABLE tokens ADD COLUMN max_gpus INTEGER;
ALTER TABLE tokens ADD COLUMN max_running INTEGER;
ALTER TABLE tokens ADD COLUMN max_queued INTEGER;
CREATE INDEX jobs_fair ON jobs (shape, priority DESC, submitter, id) WHERE status = 'QUEUED';
CREATE INDEX jobs_running ON jobs (submitter, gpus, executed_at, id) WHERE status = 'RUNNING';
CREATE INDEX jobs_submitter ON jobs (submitter, status);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
""",
    # 11: the dashboard's sessions, in the store so that every HTTP process of a coordinator
    # knows them (the SHA-256 of the cookie, never the cookie itself)
    """
CREATE TABLE web_sessions (
    id TEXT PRIMARY KEY,
    token_digest TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
""",
    # 12: leadership among several coordinators on one PostgreSQL store (store.leases): the
    # lease and its epoch, and the coordinators' list. A SQLite store has one coordinator and
    # leaves them empty.
    """
CREATE TABLE leadership (
    id INTEGER PRIMARY KEY,
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    since TEXT,
    lease_until TEXT
);
INSERT INTO leadership (id, epoch, holder) VALUES (1, 0, '');
CREATE TABLE coordinators (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    http TEXT NOT NULL,
    link TEXT NOT NULL,
    started_at TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    takeovers BIGINT NOT NULL DEFAULT 0
);
""",
)
# One script per schema version: MIGRATIONS[0] makes version 1, and so on.
MIGRATIONS = columns.migrations(TYPES, OTHERS)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


@functools.cache
def _logs_insert(rows: int) -> str:
    return "INSERT INTO logs (job_id, seq, ts, stream, line) VALUES " + ", ".join(
        ["(?, ?, ?, ?, ?)"] * rows
    )


def _private_files(path: str) -> None:
    """The store's file, and its -wal and -shm files, readable by their owner alone: they hold
    jobs' env, metadata and logs. The file is made before SQLite opens it, as SQLite makes the
    other two with the file's own mode; files an older gpubox left readable are tightened."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


class SqliteStore(sql.SqlStore):
    """The store in one SQLite file."""

    MIGRATIONS = MIGRATIONS
    queue_index = "jobs INDEXED BY jobs_fair"
    running_index = "jobs INDEXED BY jobs_running"
    deadline_index = "jobs INDEXED BY jobs_queue_deadline"

    def __init__(self, path: str, upgrade: bool = True) -> None:
        super().__init__()
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            _private_files(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        # Writes go through one connection, under _write_lock, and commit in groups (see
        # _write); _group guards the counters that tell a writer whether to commit.
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._group = threading.Condition()
        self._queued = 0  # writers waiting for _write_lock
        self._txn = 0  # the number of the transaction open (or last opened) on the writer
        self._txn_writes = 0  # writes in it so far
        self._open = False
        self._ended = 0  # the last transaction that ended (transactions end in order)
        self._failures: dict[int, BaseException] = {}  # transactions whose COMMIT failed
        self._prepare(upgrade)

    def _connect(self) -> sqlite3.Connection:
        writing: sqlite3.Connection | None = getattr(self._local, "writing", None)
        if writing is not None:
            return writing  # inside a write: read what it wrote
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._local.conn = self._open_connection()
        return conn

    def _open_connection(self) -> sqlite3.Connection:
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
        """A write, in a savepoint of the transaction open on the writer connection, committed
        before this returns: by this writer when no other is waiting (or the group is full),
        else by a later writer of the same transaction, which this one waits for. Concurrent
        writers (HTTP threads, the broker) so share one COMMIT and its fsync instead of
        queueing for one each; each still returns only once what it wrote is durable, and a
        write that fails undoes only itself."""
        if getattr(self._local, "writing", None) is not None:
            with self._savepoint() as cur:  # nested, or inside batch(): the writer is ours
                yield cur
            return
        # Writers of this process queue on a lock: SQLite's own wait for a busy database
        # sleeps in growing steps (up to 100 ms), which under load costs far more than the
        # writes. busy_timeout still covers other processes (gpubox token create, …).
        with self._group:
            self._queued += 1
        self._write_lock.acquire()
        with self._group:
            self._queued -= 1
        committed = False
        try:
            if self._writer is None:
                self._writer = self._open_connection()
            if not self._open:
                try:
                    self._writer.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:  # busy past busy_timeout, disk I/O
                    raise errors.StoreUnavailable(f"sqlite: {exc}") from exc
                self._open, self._txn, self._txn_writes = True, self._txn + 1, 0
            txn = self._txn
            self._local.writing = self._writer
            self._txn_writes += 1
            try:
                with self._savepoint() as cur:
                    yield cur
            finally:
                self._local.writing = None
                with self._group:
                    others = self._queued
                if not others or self._txn_writes >= MAX_GROUP_WRITES:
                    self._commit(txn)
                    committed = True
        finally:
            self._write_lock.release()
        with self._group:
            if not committed:
                self._group.wait_for(lambda: self._ended >= txn)
            failure = self._failures.get(txn)
        if failure is not None:
            raise errors.StoreUnavailable(f"sqlite: commit failed: {failure}") from failure

    def _commit(self, txn: int) -> None:
        """End transaction `txn` (holding _write_lock) and wake the writers waiting for it."""
        assert self._writer is not None
        failure: BaseException | None = None
        try:
            self._writer.commit()
        except sqlite3.Error as exc:
            failure = exc
            with contextlib.suppress(sqlite3.Error):
                self._writer.rollback()
        self._open = False
        with self._group:
            if failure is not None:
                self._failures[txn] = failure
                for old in [t for t in self._failures if t < txn - 1000]:
                    del self._failures[old]
            self._ended = txn
            self._group.notify_all()

    @contextlib.contextmanager
    def _savepoint(self) -> Iterator[sqlite3.Cursor]:
        with self._read() as cur:
            cur.execute("SAVEPOINT write")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK TO write")
                cur.execute("RELEASE write")
                raise
            cur.execute("RELEASE write")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._write():
            yield

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

    def _insert_job(self, cur: Any, row: dict[str, Any]) -> int:
        marks = ", ".join("?" * len(row))
        cur.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)

    def _insert_logs(self, cur: Any, rows: Sequence[tuple[int, int, str, str, str]]) -> None:
        """Many rows per INSERT: a third less CPU per line than executemany's row by row."""
        for start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[start : start + ROWS_PER_INSERT]
            cur.execute(_logs_insert(len(chunk)), [value for row in chunk for value in row])

    def identity(self) -> str:
        if self.path == ":memory:":
            return f"sqlite:memory:{id(self)}"
        found = os.stat(self.path)  # the file itself, whatever path (or link) names it
        return f"sqlite:{found.st_dev}:{found.st_ino}"

    def finish_import(self) -> None:
        """Nothing to do: AUTOINCREMENT's counter follows the highest id inserted."""

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()
        self._writer = None
        self._local = threading.local()
