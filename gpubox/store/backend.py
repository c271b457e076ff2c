"""What a SQL backend provides to the SQL that both backends share: its transactions, its
schema, and the few statements that differ. The shared SQL (jobs, logs, workers, tokens,
schema) is written once against this class, one module per part, and sql.SqlStore puts the
parts together."""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Sequence
from typing import Any

from gpubox.store import base

# A text's bytes in UTF-8, as the logs' byte caps count them (a lone surrogate that a job
# printed counts as its three bytes).
utf8 = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")


class Backend(base.Store):
    """The store contract, with the hooks that each SQL backend fills in. The SQL it runs is
    the same text on both backends: no RETURNING, `?` placeholders (rewritten by a backend
    that needs another style)."""

    # Appended to a read that the same transaction then updates (SQLite's BEGIN IMMEDIATE
    # already serialises writers; PostgreSQL locks the row).
    row_lock = ""
    # The bytes of a log line's text in UTF-8, in SQL (SQLite reads the text to count them;
    # PostgreSQL's OCTET_LENGTH reads the size it stored).
    octet_length = "LENGTH(CAST(line AS BLOB))"
    # The jobs table as the scheduler's reads of every queued and running job name it: the
    # index each one must read (SQLite, with no statistics, would take jobs_status and
    # read every job's row: 10 ms instead of 1.5 for 10,000 queued jobs).
    queue_index = "jobs"
    running_index = "jobs"
    deadline_index = "jobs"  # the queued jobs by queue_deadline (27 ms → 0.07 at 100,000)
    # The schema, one script per version: MIGRATIONS[0] makes version 1, and so on
    # (columns.migrations writes them).
    MIGRATIONS: Sequence[str] = ()

    def json_text(self, column: str, key: str) -> tuple[str, str]:
        """SQL for the value of top-level `key` in the JSON text `column`, as text (a string
        as it is, a number as written), and the parameter that SQL takes."""
        return f"CAST(json_extract({column}, ?) AS TEXT)", f'$."{key}"'

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

    @abc.abstractmethod
    def _current_version(self, cur: Any) -> int:
        """The schema version recorded in the database, 0 when it has no schema yet."""

    @abc.abstractmethod
    def _apply(self, cur: Any, script: str) -> None:
        """Run one migration script inside the open write transaction."""

    def _insert_logs(self, cur: Any, rows: Sequence[tuple[int, int, str, str, str]]) -> None:
        """Insert log rows in as few round trips as the backend allows."""
        cur.executemany(
            "INSERT INTO logs (job_id, seq, ts, stream, line) VALUES (?, ?, ?, ?, ?)", rows
        )

    def _plain_rows(self, cur: Any) -> None:
        """Let `cur` return plain tuples, not dicts (for reads of many rows)."""
        cur.row_factory = None
