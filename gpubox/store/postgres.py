"""The PostgreSQL backend: psycopg 3 with a connection pool. Claims lock their row with
FOR UPDATE SKIP LOCKED so concurrent claimers never wait on each other; ids come from a
sequence taken before the insert; a batch of log lines is one statement, its rows one JSON
text; a claim is one statement."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from gpubox import errors, models
from gpubox.store import columns, leases, pgconn, redacted, sql

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0  # how long a start waits for a first connection before it gives up
_LOGS_INSERT = (
    "INSERT INTO logs (job_id, seq, ts, stream, line)"
    " SELECT (r->>0)::bigint, (r->>1)::bigint, r->>2, r->>3, r->>4"
    " FROM jsonb_array_elements(?::jsonb) AS r"
)

# The SQL type of each of fields.COLUMN_TYPES (a job's id comes from jobs_id_seq).
TYPES = {
    "key": "BIGINT PRIMARY KEY",
    "text": "TEXT",
    "int": "INTEGER",
    "bigint": "BIGINT",
    "real": "DOUBLE PRECISION",
}

# What each schema version does besides the jobs table's columns (models.JOB_FIELDS says which
# version added which column); statements separated by ";" at the end of a line.
OTHERS = (
    """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE SEQUENCE jobs_id_seq;
CREATE INDEX jobs_queue ON jobs (priority DESC, id) WHERE status = 'QUEUED';
CREATE INDEX jobs_worker ON jobs (worker, status);
CREATE TABLE job_labels (
    job_id BIGINT NOT NULL,
    pair TEXT NOT NULL,
    PRIMARY KEY (job_id, pair)
);
CREATE TABLE logs (
    job_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    ts TEXT NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
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
    SELECT COALESCE(SUM(OCTET_LENGTH(line)), 0) FROM logs WHERE logs.job_id = jobs.id
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
    job_id BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    gpu TEXT NOT NULL,
    t_start DOUBLE PRECISION NOT NULL,
    t_end DOUBLE PRECISION NOT NULL,
    seq BIGINT NOT NULL,
    samples BIGINT NOT NULL,
    util_mean DOUBLE PRECISION NOT NULL,
    util_max DOUBLE PRECISION NOT NULL,
    memory_max_mb BIGINT NOT NULL,
    memory_total_mb BIGINT NOT NULL,
    power_mean_w DOUBLE PRECISION,
    temperature_max_c DOUBLE PRECISION,
    PRIMARY KEY (job_id, attempt, gpu, t_start)
);
CREATE INDEX jobs_status ON jobs (status);
""",
    # 8: idempotency keys of POST /api/v1/jobs (kept 24 h: store.jobs.IDEMPOTENCY_S), an
    # index for the label filter of GET /api/v1/jobs, and jobs' queue_timeout (its column)
    """
CREATE TABLE idempotency (
    token TEXT NOT NULL,
    key TEXT NOT NULL,
    digest TEXT NOT NULL,
    job_id BIGINT NOT NULL,
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
    id BIGSERIAL PRIMARY KEY,
    job_id BIGINT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    delivery TEXT NOT NULL,
    payload TEXT NOT NULL,
    secret TEXT,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    next_at TEXT NOT NULL,
    last_status BIGINT,
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
ALTER TABLE tokens ADD COLUMN max_gpus BIGINT;
ALTER TABLE tokens ADD COLUMN max_running BIGINT;
ALTER TABLE tokens ADD COLUMN max_queued BIGINT;
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
    since TIMESTAMPTZ,
    lease_until TIMESTAMPTZ
);
INSERT INTO leadership (id, epoch, holder) VALUES (1, 0, '');
CREATE TABLE coordinators (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    http TEXT NOT NULL,
    link TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL,
    takeovers BIGINT NOT NULL DEFAULT 0
);
""",
)
# One script per schema version: MIGRATIONS[0] makes version 1, and so on.
MIGRATIONS = columns.migrations(TYPES, OTHERS)

# Two coordinators upgrading one database at once take turns on this lock.
UPGRADE_LOCK = 847_001


class PostgresStore(sql.SqlStore, leases.LeaseStore):
    """The store in a PostgreSQL database."""

    MIGRATIONS = MIGRATIONS
    row_lock = " FOR UPDATE"
    octet_length = "OCTET_LENGTH(line)"

    def json_text(self, column: str, key: str) -> tuple[str, str]:
        # PostgreSQL's JSON holds no NUL: text with a \u0000 escape anywhere in it fails the
        # cast, and with it the whole query (every metadata filter was a 500 once one job's
        # metadata held NUL, as it may). Such an escape reads as U+FFFD here, which no filter
        # value can hold (jobfilter refuses NUL).
        return f"(replace({column}, '\\u0000', '\\ufffd')::jsonb ->> ?)", key

    def __init__(
        self,
        url: str,
        upgrade: bool = True,
        max_connections: int = 16,
        idle_transaction_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.url = url
        self._local = threading.local()  # the connection of a batch() open in this thread
        guard_ms = round(idle_transaction_s * 1000)

        def configure(conn: psycopg.Connection[Any]) -> None:
            if guard_ms > 0:  # see open_store
                conn.execute(f"SET idle_in_transaction_session_timeout = {int(guard_ms)}")

        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "row_factory": dict_row},
            configure=configure,
            check=pgconn.check_idle,
            timeout=2.0,  # then StoreUnavailable: a 503, or a broker pause
            reconnect_timeout=86400.0,  # keep trying through a long database outage
            open=False,
            name="gpubox",
        )
        # The pool logs each failed try at open; the error below says it once, in one line.
        # (Later, the coordinator's journal keeps its warnings during a database outage.)
        quiet = pgconn.DropAll()
        logging.getLogger("psycopg.pool").addFilter(quiet)
        try:
            self.pool.open(wait=True, timeout=OPEN_TIMEOUT_S)
        except psycopg_pool.PoolTimeout as exc:
            self.pool.close()
            raise errors.StoreUnavailable(
                f"cannot connect to PostgreSQL at {redacted(url)}: {pgconn.connect_error(url)}"
            ) from exc
        finally:
            logging.getLogger("psycopg.pool").removeFilter(quiet)
        try:
            self._prepare(upgrade)
        except BaseException:
            self.pool.close()
            raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[pgconn.Cursor]:
        batch = getattr(self._local, "batch", None)
        if batch is not None:
            # Inside batch(): a nested transaction is a savepoint, so a failed write undoes
            # only itself.
            with pgconn.translate(), batch.transaction(), batch.cursor() as cur:
                yield pgconn.Cursor(cur)
            return
        with (
            pgconn.translate(),
            self.pool.connection() as conn,
            pgconn.transaction(conn),
            conn.cursor() as cur,
        ):
            self._check_fence(cur)  # a leader's broker writes only while it leads
            yield pgconn.Cursor(cur)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with pgconn.translate(), self.pool.connection() as conn, pgconn.transaction(conn):
            with conn.cursor() as cur:
                self._check_fence(cur)
            self._local.batch = conn
            try:
                yield
            finally:
                self._local.batch = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[pgconn.Cursor]:
        batch = getattr(self._local, "batch", None)
        if batch is not None:  # inside batch(): see its writes; a failure undoes only itself
            with pgconn.translate(), batch.transaction(), batch.cursor() as cur:
                yield pgconn.Cursor(cur)
            return
        with pgconn.translate(), self.pool.connection() as conn, conn.cursor() as cur:
            yield pgconn.Cursor(cur)

    def _insert_job(self, cur: Any, row: dict[str, Any]) -> int:
        cur.execute("SELECT nextval('jobs_id_seq') AS id")
        job_id = int(cur.fetchone()["id"])
        columns = ", ".join(["id", *row])
        marks = ", ".join("?" * (len(row) + 1))
        cur.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", (job_id, *row.values()))
        return job_id

    def _insert_logs(self, cur: Any, rows: Sequence[tuple[int, int, str, str, str]]) -> None:
        """Every row in one statement, the rows as one JSON text: never a statement that
        waits on the client halfway, as a COPY waits for its rows (see leases). For the
        coordinator as cheap as a COPY (1.3 µs a line in batches of 1,000); the server
        takes a little longer (5.5 against 3.9 µs a line, wall; 12 against 11 in batches of
        100). As jsonb, each row's fields are read from one parse; as json, 6.2 µs."""
        cur.execute(_LOGS_INSERT, (json.dumps(rows, ensure_ascii=False),))

    def read_log_rows(
        self, job_id: int, since: int = 0, limit: int = 1000, max_bytes: int | None = None
    ) -> list[models.LogRow]:
        if max_bytes is None:
            return super().read_log_rows(job_id, since, limit)
        # The client receives a whole answer at once, so the page is cut here, in SQL: each
        # row with the bytes of the rows before it (OCTET_LENGTH reads the stored size,
        # without reading the text).
        with self._read() as cur:
            self._plain_rows(cur)
            cur.execute(
                "SELECT seq, ts, stream, line FROM ("
                " SELECT seq, ts, stream, line, SUM(OCTET_LENGTH(line))"
                " OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) - OCTET_LENGTH(line) AS before"
                " FROM logs WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?) AS page"
                " WHERE before < ? ORDER BY seq",
                (job_id, since, limit, max_bytes),
            )
            rows: list[models.LogRow] = cur.fetchall()
            return rows

    def _current_version(self, cur: Any) -> int:
        cur.execute("SELECT to_regclass('schema_version') IS NOT NULL AS present")
        if not cur.fetchone()["present"]:
            return 0
        cur.execute("SELECT version FROM schema_version")
        row = cur.fetchone()
        return int(row["version"]) if row else 0

    def _apply(self, cur: Any, script: str) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(?)", (UPGRADE_LOCK,))
        for statement in script.split(";\n"):
            if statement.strip():
                cur.execute(statement)

    def identity(self) -> str:
        with self._read() as cur:
            cur.execute(
                "SELECT (SELECT system_identifier FROM pg_control_system()) AS cluster,"
                " current_database() AS db, current_schema() AS schema"
            )
            row = cur.fetchone()
        return f"postgresql:{row['cluster']}:{row['db']}:{row['schema']}"

    def finish_import(self) -> None:
        with self._write() as cur:
            cur.execute("SELECT COALESCE(MAX(id), 0) AS top FROM jobs")
            top = int(cur.fetchone()["top"])
            cur.execute("SELECT setval('jobs_id_seq', ?, ?)", (max(top, 1), top > 0))
            cur.execute("SELECT COALESCE(MAX(id), 0) AS top FROM webhook_deliveries")
            top = int(cur.fetchone()["top"])
            cur.execute(
                "SELECT setval(pg_get_serial_sequence('webhook_deliveries', 'id'), ?, ?)",
                (max(top, 1), top > 0),
            )

    def close(self) -> None:
        self.pool.close()
