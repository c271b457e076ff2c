"""One coordinator per store: the lock a coordinator holds on its store for as long as it runs.

Two coordinators on one store would each run a broker: each would take the other's workers
for lost and end their running jobs as ERROR, and hand out the same queue twice. Until
several coordinators can share a store under one leader, a coordinator holds this lock from
its start, and a second one refuses to start, saying which one holds it.

- SQLite: an exclusive flock on `<database file>.coordinator`, which holds the holder's pid
  and host. The kernel lets it go when the process ends, however it ends.
- PostgreSQL: a session advisory lock (keyed by the store's schema, so that stores in
  different schemas of one database do not collide), on a connection of its own, opened for
  the lock alone, never from the pool: a lock taken on a pooled connection would go back to
  the pool with it. Its application_name says who holds it (pg_stat_activity). The lock
  ends with its session: `watch()` notices a lost connection (a server restart, a
  terminated backend), connects again and takes the lock back, and fails, ending the
  coordinator, if another coordinator took it in between. Session locks do not work
  through a pooler in transaction mode (pgbouncer's): point the coordinator at PostgreSQL
  itself, or at a session-mode pool.

What this does not do: fence a coordinator that is frozen (SIGSTOP, a stalled VM) while
another starts. A frozen holder keeps its session and its lock, so the second refuses to
start; what it cannot tell apart is a holder that will never wake.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from gpubox import errors
from gpubox.store import _sqlite_path, redacted

log = logging.getLogger(__name__)

# The advisory lock's first key: "gpbx". The second is the hash of the store's schema.
LOCK_KEY = 0x67706278
WATCH_EVERY_S = 1.0  # how often watch() looks at the PostgreSQL lock's connection


class Lock(Protocol):
    def watch(self, stopping: threading.Event, tick: Callable[[], None]) -> None: ...

    def release(self) -> None: ...


def who() -> str:
    """This process, as the lock's holder is named."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def hold(url: str) -> Lock:
    """Take the coordinator lock of the store at `url`, or errors.ConfigError naming the
    coordinator that holds it."""
    if url.startswith("sqlite://"):
        return FileLock(_sqlite_path(url))
    return AdvisoryLock(url)


class FileLock:
    """The lock of a SQLite store: see the module's docstring."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}.coordinator"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise errors.ConfigError(
                f"another gpubox coordinator already runs on the store {db_path} ({holder}):"
                " one coordinator per store; stop it first"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{who()}\n".encode(), 0)

    def watch(self, stopping: threading.Event, tick: Callable[[], None]) -> None:
        """Nothing to watch: the kernel holds the lock until the process ends."""
        while not stopping.wait(WATCH_EVERY_S):
            tick()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AdvisoryLock:
    """The lock of a PostgreSQL store: see the module's docstring."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Any = None
        self._take()

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=5,
            application_name=f"gpubox coordinator, {who()}"[:63],
        )

    def _take(self) -> None:
        """Connect and take the lock; errors.ConfigError naming its holder if it is taken,
        errors.StoreUnavailable if PostgreSQL cannot be reached."""
        import psycopg

        try:
            conn = self._connect()
        except psycopg.OperationalError as exc:
            raise errors.StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            taken = conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(current_schema()))", (LOCK_KEY,)
            ).fetchone()[0]
            if not taken:
                holder = conn.execute(
                    "SELECT a.application_name, a.client_addr FROM pg_locks l"
                    " JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.classid = %s"
                    " AND l.objid = hashtext(current_schema())::oid AND l.granted",
                    (LOCK_KEY,),
                ).fetchone()
                said = f"{holder[0]} from {holder[1] or 'this host'}" if holder else "unknown"
                raise errors.ConfigError(
                    f"another gpubox coordinator already runs on the store at"
                    f" {redacted(self.url)} ({said}): one coordinator per store; stop it"
                    " first"
                )
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def watch(self, stopping: threading.Event, tick: Callable[[], None]) -> None:
        """Until `stopping`: look at the lock's connection every WATCH_EVERY_S; once it is
        lost, take the lock again as soon as PostgreSQL answers. errors.ConfigError (which
        ends the coordinator) if another coordinator took it meanwhile."""
        import psycopg

        lost_since = 0.0
        while not stopping.wait(WATCH_EVERY_S):
            tick()
            try:
                if self.conn is not None:
                    self.conn.execute("SELECT 1")
                    continue
                self._take()
                log.warning(
                    "took the store's coordinator lock again after %.0f s without it",
                    time.monotonic() - lost_since,
                )
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if self.conn is not None:
                    log.warning("lost the connection holding the store's coordinator lock")
                    self.conn.close()
                    self.conn, lost_since = None, time.monotonic()
            except errors.StoreUnavailable:
                pass  # still down: try again at the next turn

    def release(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
