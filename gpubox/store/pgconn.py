"""The psycopg plumbing under the PostgreSQL store: the shared SQL's `?` placeholders in
psycopg's style, a cursor that takes them and never sends a statement in pieces, psycopg's
errors as the store's, transaction blocks that raise unless they committed, and the
connection pool's checks."""

from __future__ import annotations

import contextlib
import functools
import logging
import select
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg.rows import tuple_row

from gpubox import errors

MAX_PARAMETERS = 65_535  # the most parameters one statement may carry (the protocol's limit)


@functools.lru_cache(maxsize=1024)
def pg_sql(text: str) -> str:
    """The shared SQL `text`, written with SQLite's `?` placeholders, in psycopg's style.

    Each `?` outside quotes becomes `%s`. psycopg reads `%` everywhere, even inside a quoted
    string, so every `%` becomes `%%`. A `?` inside a string ('...', where '' is a quote), a
    quoted name ("...") or a `--` comment stays as it is, so no literal changes meaning.
    The shared SQL uses no other quoting (no E'...' strings, no $$ bodies).
    The answer is cached per text, since every statement passes here: the store's texts are
    fixed strings, except IN lists of 1 to 500 ids, so 1024 entries hold them all.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "'\"":  # a string or a quoted name: copy it up to its closing quote
            end = text.find(char, i + 1)
            end = len(text) if end < 0 else end + 1
            out.append(text[i:end].replace("%", "%%"))
            i = end  # a doubled quote ('') closes one string and opens the next: same text
            continue
        if text.startswith("--", i):  # a comment: copy it up to the end of its line
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(text[i:end].replace("%", "%%"))
            i = end
            continue
        out.append("%s" if char == "?" else "%%" if char == "%" else char)
        i += 1
    return "".join(out)


class Cursor:
    """A psycopg cursor that takes the shared SQL's `?` placeholders (see pg_sql)."""

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    def execute(self, text: str, params: Sequence[Any] = ()) -> None:
        self._cur.execute(pg_sql(text), params)

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        """`text` once per row of `rows`, in as few statements as it allows: an INSERT …
        VALUES (…) goes as one statement of many rows, anything else one statement per row.
        Never psycopg's executemany, which pipelines: inside a pipeline the server waits for
        the client's next message with no timeout at all, so a coordinator frozen there
        would hold its transaction's locks, the fence's among them, until it woke (see
        leases). Each statement here is a whole round trip, and between two of them the
        server's idle_in_transaction_session_timeout runs."""
        if not rows:
            return
        text = pg_sql(text)
        at = text.find(" VALUES (")
        if at < 0:
            for row in rows:
                self._cur.execute(text, row)
            return
        end = text.index(")", at) + 1
        head, one, tail = text[: at + 8], text[at + 8 : end], text[end:]
        per_statement = max(1, MAX_PARAMETERS // len(rows[0]))
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            many = head + ", ".join([one] * len(chunk)) + tail
            self._cur.execute(many, [value for row in chunk for value in row])

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def row_factory(self) -> Any:
        return self._cur.row_factory

    @row_factory.setter
    def row_factory(self, factory: Any) -> None:
        self._cur.row_factory = factory or tuple_row


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """psycopg's errors as the store contract's."""
    try:
        yield
    except (
        psycopg.OperationalError,
        psycopg.errors.IdleInTransactionSessionTimeout,  # the session is gone with it
        psycopg_pool.PoolTimeout,
    ) as exc:
        raise errors.StoreUnavailable(f"postgresql: {exc}".strip()) from exc
    except psycopg.Error as exc:
        raise errors.StoreError(f"postgresql: {exc}".strip()) from exc


@contextlib.contextmanager
def transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """conn.transaction(), except that a block whose commit did not happen raises. psycopg
    leaves a block quietly, committing nothing, when the connection broke inside it and the
    block caught the error itself, as a batch of the broker's reports does (a report that
    fails alone): the broker then acknowledged reports that were never stored, and their
    workers forgot jobs the store still held as running."""
    with conn.transaction() as transaction:
        yield
    if transaction.status is not psycopg.Transaction.Status.COMMITTED:
        raise psycopg.OperationalError("the connection was lost: nothing of it was committed")


def check_idle(conn: psycopg.Connection[Any]) -> None:
    """Refuse a pooled connection the server has ended (a restart, pg_terminate_backend),
    without a round trip: an idle connection has nothing to read unless the server closed it."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        conn.close()  # so the pool discards it rather than handing it out again
        raise psycopg.OperationalError("the server ended this connection")


def connect_error(url: str) -> str:
    """Why a connection to `url` fails, as libpq says it (the pool only logs its tries)."""
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return "it did not answer in time"


class DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False
