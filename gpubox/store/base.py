"""The store contract: every operation the coordinator needs from a database.

Backends (SQLite, PostgreSQL) implement it with the same meaning; one test suite runs against
each. All methods are safe to call from several threads at once. Times are UTC-aware datetimes.
A backend that cannot reach its database raises errors.StoreUnavailable; every other backend
failure is errors.StoreError. StoreUnavailable is a kind of StoreError, so `except StoreError`
catches both. Nothing else escapes.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from gpubox import models, telemetry, usage
from gpubox.jobfilter import JobFilter

# A log line as it arrives from a worker: (timestamp, stream, text).
RawLine = tuple[str, str, str]


class QueueGroup(NamedTuple):
    """The QUEUED jobs of one shape, priority and submitter: how many, the first id and the
    last."""

    shape: str
    priority: int
    submitter: str | None
    jobs: int
    first: int
    last: int


class Placed(NamedTuple):
    """Where a RUNNING job runs: its worker and the uuids of its GPUs."""

    job_id: int
    worker: str
    gpu_ids: tuple[str, ...]


class Use(NamedTuple):
    """A job's hold on GPUs, as fair share and caps count it. Its times are the stored RFC
    3339 texts (models.format_time): the caller parses only those it has not seen."""

    id: int
    submitter: str | None
    gpus: int
    executed_at: str | None
    finished_at: str | None


# Every table, with the columns that order its rows (its primary key), for `db copy`.
TABLES: dict[str, tuple[str, ...]] = {
    "jobs": ("id",),
    "job_labels": ("job_id", "pair"),
    "idempotency": ("token", "key"),
    "webhook_deliveries": ("id",),
    "logs": ("job_id", "seq"),
    "telemetry": ("job_id", "attempt", "gpu", "t_start"),
    "workers": ("name",),
    "tokens": ("name",),
    "web_sessions": ("id",),
}


class Finish(enum.Enum):
    """What finish_job did with a final record."""

    APPLIED = "applied"  # the job is now terminal with this record
    IGNORED = "ignored"  # stale attempt or job already terminal: acknowledge, change nothing
    MISSING_LINES = "missing_lines"  # lines before last_seq are not stored yet: do not acknowledge


class Store(abc.ABC):
    """One store of jobs, log lines, workers and tokens."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every connection. The store is unusable afterwards."""

    # --- jobs ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def create_job(
        self, spec: models.JobSpec, now: datetime, max_queued: int | None = None
    ) -> models.Job:
        """Insert a QUEUED job and return it with its new id (ids increase). With
        `max_queued`, errors.OverCap if its submitter has that many jobs queued already
        (checked in the same transaction as the insert)."""

    @abc.abstractmethod
    def get_job(self, job_id: int) -> models.Job:
        """The job with this id; errors.JobNotFound if there is none."""

    @abc.abstractmethod
    def create_job_once(
        self,
        spec: models.JobSpec,
        now: datetime,
        token: str,
        key: str,
        digest: str,
        max_queued: int | None = None,
    ) -> tuple[models.Job, bool]:
        """create_job, once per idempotency `key` of `token` within IDEMPOTENCY_S (24 h):
        (the new job, True); again with the same key and request `digest`, (the job made the
        first time, False); with the same key and another digest, errors.IdempotencyConflict.
        Two requests with one key at once make one job."""

    @abc.abstractmethod
    def overdue_queued(self, now: datetime, limit: int = 100) -> list[models.Job]:
        """QUEUED jobs whose queue_deadline has passed at `now`, the earliest first."""

    @abc.abstractmethod
    def fail_queued(self, job_id: int, error: str, now: datetime) -> bool:
        """End a job that is still QUEUED as ERROR with `error`; False if it no longer is."""

    # --- webhooks -----------------------------------------------------------------------------

    @abc.abstractmethod
    def webhook_events_due(self, limit: int = 100) -> list[tuple[models.Job, int]]:
        """Jobs with webhook events still to turn into deliveries (jobs.hooks_due > 0) that
        have started or ended, each with those events (bits: 1 start, 2 end)."""

    @abc.abstractmethod
    def add_deliveries(
        self,
        job_id: int,
        was_due: int,
        still_due: int,
        deliveries: Sequence[models.WebhookDelivery],
    ) -> bool:
        """Store these deliveries and set the job's events due from `was_due` to
        `still_due`, in one transaction; False (nothing stored) when they were no longer
        `was_due` (another dispatcher took them)."""

    @abc.abstractmethod
    def due_deliveries(self, now: datetime, limit: int = 50) -> list[models.WebhookDelivery]:
        """Pending deliveries whose next attempt is due at `now`, the most overdue first."""

    @abc.abstractmethod
    def next_delivery_at(self) -> datetime | None:
        """When the next pending delivery is due, or None when none is pending."""

    @abc.abstractmethod
    def record_attempt(
        self,
        delivery_id: int,
        state: str,
        status: int | None,
        error: str | None,
        next_at: datetime,
        now: datetime,
    ) -> None:
        """What one attempt gave: the delivery's new state (pending, delivered, failed), the
        HTTP status or error, and when it is next due; a done delivery's secret is erased."""

    @abc.abstractmethod
    def job_deliveries(self, job_id: int) -> list[models.WebhookDelivery]:
        """Every delivery of a job, oldest first."""

    @abc.abstractmethod
    def list_jobs(
        self,
        status: models.Status | None = None,
        limit: int = 50,
        before: int | None = None,
        where: JobFilter | None = None,
    ) -> list[models.Job]:
        """Up to `limit` jobs, newest (highest id) first, only ids below `before` when given,
        only those `where` keeps (and of `status`) when given."""

    @abc.abstractmethod
    def ended_jobs(self, since: datetime, until: datetime) -> Iterator[usage.EndedJob]:
        """Every job that ended (FINISHED, ERROR or CANCELLED) with finished_at in
        [since, until), in no set order, as the usage report reads it: only those columns,
        read by a range on finished_at (which an index on it serves). The rows come as they
        are read, holding a connection until the last one is taken or the iterator closed."""

    @abc.abstractmethod
    def jobs_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (every status, 0 included)."""

    @abc.abstractmethod
    def oldest_queued(self) -> datetime | None:
        """When the longest-waiting QUEUED job was submitted; None when none is queued."""

    @abc.abstractmethod
    def queued_jobs(
        self,
        limit: int = 500,
        known: Mapping[int, models.Job] | None = None,
        shape: str | None = None,
    ) -> list[models.Job]:
        """Up to `limit` QUEUED jobs in the order they should run: highest priority first,
        then lowest id; with `shape`, only the jobs of that shape (models.Needs.shape). Those
        whose id is in `known` are not read again but returned as given there: what a job
        asks for does not change, so a scheduler may keep the jobs it read from one round to
        the next."""

    @abc.abstractmethod
    def queued_shapes(self) -> list[str]:
        """The shapes (models.Needs.shape) of the QUEUED jobs, each once, in no set order.
        It costs an index lookup per shape, not a read per job: 100,000 queued jobs of a few
        shapes cost no more than a few jobs."""

    # --- fair share and caps (store.sharing) -------------------------------------------------

    @abc.abstractmethod
    def queue_groups(self) -> list[QueueGroup]:
        """The QUEUED jobs by shape, priority and submitter, each group once, in no set
        order. It reads an index entry per queued job, not the jobs."""

    @abc.abstractmethod
    def queued_of(
        self,
        shape: str | None,
        priority: int,
        submitters: Sequence[str | None] | None,
        limit: int,
        known: Mapping[int, models.Job] | None = None,
    ) -> list[models.Job]:
        """Up to `limit` QUEUED jobs of this shape (None: of any) and priority, lowest id
        first, of these submitters (None among them: the jobs with none recorded;
        `submitters` None: of any). Those in `known` are returned as given there, not read
        again."""

    @abc.abstractmethod
    def get_jobs(self, ids: Sequence[int]) -> list[models.Job]:
        """The jobs with these ids, in this order (an id with no job is left out)."""

    @abc.abstractmethod
    def last_job_id(self) -> int:
        """The highest job id (0 when there is no job): an index lookup."""

    @abc.abstractmethod
    def queued_before(self, priority: int, job_id: int) -> dict[str | None, int]:
        """By submitter, how many QUEUED jobs of this priority have an id below job_id."""

    @abc.abstractmethod
    def running_workers(self) -> set[str]:
        """The workers that hold RUNNING jobs, each once."""

    @abc.abstractmethod
    def running_use(self) -> list[Use]:
        """Every RUNNING job's use, read from an index alone."""

    @abc.abstractmethod
    def ended_use(self, ids: Sequence[int]) -> list[Use]:
        """The use of those of these jobs that ran and have ended (finished_at and
        executed_at set)."""

    @abc.abstractmethod
    def ended_use_since(self, since: datetime) -> list[Use]:
        """The use of every job that ran and ended at `since` or later."""

    @abc.abstractmethod
    def set_caps(self, name: str, caps: dict[str, int | None]) -> models.Token:
        """Change some caps of token `name` (a key of models.Caps.NAMES each; None lifts
        it) and return the token; errors.NotFound if there is none."""

    @abc.abstractmethod
    def add_session(self, session: models.WebSession) -> None:
        """Store a dashboard session (and drop those that expired)."""

    @abc.abstractmethod
    def find_session(self, session_id: str) -> models.WebSession | None:
        """The session with this id (the digest of its cookie), if any."""

    @abc.abstractmethod
    def drop_sessions(self, session_id: str | None = None) -> None:
        """Drop one session, or (None) every one."""

    @abc.abstractmethod
    def token_caps(self) -> dict[str, models.Caps]:
        """The caps of every token that has any, by token name."""

    @abc.abstractmethod
    def batch(self) -> contextlib.AbstractContextManager[None]:
        """One transaction for every write this thread makes inside the block: one commit
        (one fsync) for many. A write that fails undoes only itself (a savepoint) and raises
        as usual; the others still commit at the end. If the commit fails, none of them
        happened. Reads in the block see its writes. Not re-entrant."""

    @abc.abstractmethod
    def claim_job(
        self, job_id: int, worker: str, gpu_ids: Sequence[str], now: datetime
    ) -> models.Job | None:
        """Atomically make a QUEUED job RUNNING on `worker` with exactly these GPUs (uuids):
        attempts incremented, gpu_ids set, in one transaction. None, changing nothing, when
        the job is not QUEUED any more or one of the GPUs belongs to a RUNNING job of that
        worker; of two concurrent claims of one job, one wins."""

    @abc.abstractmethod
    def unclaim_job(self, job_id: int, attempt: int, now: datetime) -> bool:
        """Put back a job whose claim never reached its worker, as if it had not been claimed:
        QUEUED, attempts decremented (CANCELLED if a cancel came meanwhile). False (no change) if
        that attempt is not RUNNING."""

    @abc.abstractmethod
    def mark_started(
        self,
        job_id: int,
        attempt: int,
        executed_at: datetime,
        image_id: str | None = None,
        image_digest: str | None = None,
    ) -> bool:
        """Record that this attempt's container started, from which image (its ID and repo
        digest, where known). False (no change) for a stale attempt."""

    @abc.abstractmethod
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
    ) -> Finish:
        """Apply a worker's final record of one attempt, idempotently.

        APPLIED only if the job is RUNNING in this attempt and every line up to last_seq is
        stored; the job then takes the terminal `status` and its write-only fields are erased.
        """

    @abc.abstractmethod
    def cancel_job(self, job_id: int, now: datetime) -> models.Job:
        """Cancel: QUEUED becomes CANCELLED at once; RUNNING gets cancel_requested (the worker
        stops it and reports CANCELLED). errors.WrongState for a terminal job."""

    @abc.abstractmethod
    def release_job(
        self, job_id: int, attempt: int, error: str, now: datetime
    ) -> models.Job | None:
        """A RUNNING attempt was lost with its worker: QUEUED again while attempts <= max_retries,
        else ERROR with `error`; CANCELLED if a cancel was requested. None for a stale attempt."""

    @abc.abstractmethod
    def running_jobs(self, worker: str | None = None) -> list[models.Job]:
        """Every RUNNING job, or those assigned to `worker`."""

    @abc.abstractmethod
    def placements(self) -> list[Placed]:
        """Where each RUNNING job runs, in id order: a read of three columns, where
        running_jobs reads and parses every job whole (8,000 of them at 1,000 busy workers,
        for each GET /api/v1/workers and each scrape of /metrics)."""

    # --- logs ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def append_logs(
        self,
        job_id: int,
        attempt: int,
        first_seq: int,
        lines: Sequence[RawLine],
        keep: int | None = None,
        last: int | None = None,
        keep_bytes: int | None = None,
    ) -> int:
        """Store a batch whose first line has sequence number first_seq, in one transaction.

        `last`, when past the batch's own last line, is the last sequence number the batch
        covers: the numbers after its lines up to `last` stay unused (lines the worker had to
        drop, which its marker line stands for).

        With `keep`, a job keeps at most that many lines: the first keep/2 and the latest,
        the line after the head replaced by a marker (stream gpubox) saying how many were
        dropped there. With `keep_bytes`, likewise at most that many bytes of text (UTF-8):
        a head of at most keep_bytes/2, the marker, and the latest lines. Lines go on being
        accepted (and acknowledged) past either cap; the newest line is always kept.

        Lines already stored are skipped (exactly once); a batch that would leave a gap, or
        belongs to a stale attempt, stores nothing. Returns the sequence number up to which the
        sender may forget its lines: the job's last stored seq, or the batch's end if stale.
        """

    @abc.abstractmethod
    def read_logs(self, job_id: int, since: int = 0, limit: int = 1000) -> list[models.LogLine]:
        """Up to `limit` stored lines with seq > since, in order."""

    @abc.abstractmethod
    def read_log_rows(
        self, job_id: int, since: int = 0, limit: int = 1000, max_bytes: int | None = None
    ) -> list[models.LogRow]:
        """read_logs as plain (seq, ts, stream, line) tuples, without a LogLine made for each.

        With `max_bytes`, the rows also stop at the first one whose text brings their total
        to max_bytes (in UTF-8) or more: a page of long lines stays near that size, and still
        holds a row when there is one. Rows past the page are not held in memory."""

    @abc.abstractmethod
    def log_marks(self, job_id: int) -> models.LogMarks:
        """For each stream of a job's own output ({} when none; gpubox's own lines are not
        counted): the latest timestamp stored, and how many lines have exactly that
        timestamp; to re-attach to its container. Timestamps are fixed-width RFC 3339, so
        they compare as text."""

    # --- workers ------------------------------------------------------------------------------

    # --- GPU telemetry (gpubox.telemetry) ------------------------------------------------------

    @abc.abstractmethod
    def add_points(
        self,
        job_id: int,
        attempt: int,
        seq: int,
        last: int,
        points: Sequence[telemetry.Point],
        max_points: int = 2000,
    ) -> int:
        """Store a TELEMETRY batch of the running attempt `attempt`, covering sequence
        numbers seq..last, exactly once: only if it comes right after the last one stored
        (seq <= stored + 1 < last + 1). Past `max_points` points of a GPU for the attempt,
        the older half of them is merged two by two. Returns the last seq now stored, which
        the worker is acknowledged with; for a job or attempt no longer running, `last`
        (nothing stored: the worker need not hold it)."""

    @abc.abstractmethod
    def points_seq(self, job_id: int, attempt: int) -> int:
        """The last TELEMETRY seq stored for the attempt; -1 when none."""

    @abc.abstractmethod
    def read_points(
        self, job_id: int, since: float | None = None, limit: int = 10_000
    ) -> list[tuple[int, telemetry.Point]]:
        """A job's points as (attempt, point), by attempt then start, at most `limit`: those
        ending after `since` (Unix seconds) when given."""

    @abc.abstractmethod
    def save_worker(self, worker: models.WorkerInfo) -> None:
        """Insert or replace what is known of a worker."""

    @abc.abstractmethod
    def list_workers(self) -> list[models.WorkerInfo]:
        """Every worker ever seen, by name."""

    # --- tokens -------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_token(self, token: models.Token) -> None:
        """Store a new token; errors.WrongState if the name is taken."""

    @abc.abstractmethod
    def find_token(self, digest: str) -> models.Token | None:
        """The token with this SHA-256 hex digest, if any. A token found may be taken on
        trust for a second (tokens.TOKEN_CACHE_S): a revoke through this store ends it at
        once, one through another process within that second."""

    @abc.abstractmethod
    def revoke_token(self, name: str) -> bool:
        """Delete a token by name; False if there was none."""

    @abc.abstractmethod
    def list_tokens(self) -> list[models.Token]:
        """Every token, by name."""

    # --- schema and bulk copy -----------------------------------------------------------------

    @property
    @abc.abstractmethod
    def latest_version(self) -> int:
        """The schema version this gpubox writes."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version the database holds; 0 for an empty database."""

    @abc.abstractmethod
    def upgrade(self) -> list[int]:
        """Apply every missing schema version in one transaction; the versions applied (none
        when up to date). errors.StoreError if the database is newer than this gpubox."""

    @abc.abstractmethod
    def count(self, table: str) -> int:
        """How many rows a table of TABLES holds."""

    @abc.abstractmethod
    def export_rows(self, table: str, batch: int = 5000) -> Iterator[list[dict[str, Any]]]:
        """Every row of a table, as column → value dicts, in key order, `batch` at a time."""

    @abc.abstractmethod
    def import_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows exported from another store of the same schema, keeping their keys."""

    @abc.abstractmethod
    def identity(self) -> str:
        """What tells this database from every other: two stores with the same identity are
        the same data, however their URLs are written (for `db copy`)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Delete every row of every table (for `db copy --replace`)."""

    @abc.abstractmethod
    def finish_import(self) -> None:
        """After import_rows: move the job id counter past the highest imported id."""
