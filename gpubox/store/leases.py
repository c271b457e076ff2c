"""Leadership among the coordinators of one PostgreSQL store: the lease, its epoch, the
fence on the leader's writes, and the list of coordinators.

One row of the `leadership` table says who leads: its `epoch` (a number that grows by one
with each new leader), its `holder` (a coordinator's id) and `lease_until`. The leader
renews the lease every second or so; any other coordinator takes the lead once the lease
has run out, or at once when the leader gave it up (a clean stop). Every time here is
PostgreSQL's own clock: the coordinators' clocks may disagree, the database's is one clock
for all of them. It is read with clock_timestamp(), the time the statement runs, never
now(), which is when its transaction began, and only once the row is locked
(_lock_the_row): a takeover whose UPDATE waited seconds for the leadership row would
otherwise start its lease seconds in the past, and lose it that much sooner.

The fence. The broker's thread marks its writes with the epoch it leads in (`fence`). Each
of its transactions first reads the leadership row FOR SHARE and goes on only if the epoch
is still its own (errors.Deposed otherwise). A takeover's UPDATE of that row waits for those
transactions to end, and every transaction that starts after it sees the new epoch. So a
leader that froze (SIGSTOP, a stalled VM) and wakes after another took over cannot assign,
start or end anything: its first write fails, and its broker stops. That holds whatever the
clocks say; the lease's length only decides how soon a frozen leader is replaced. A leader
that froze inside one of those transactions (or inside its lease's renewal) would hold the
row, and with it every takeover, for as long as it stays frozen: so a coordinator opens its
store with PostgreSQL's idle_in_transaction_session_timeout at the lease's length, and the
server ends such a frozen session (rolling its transaction back) once the lease has run
out. That timeout runs only while the server waits between statements; inside one, a
server that waits on the client has no timeout at all (not even statement_timeout, which
a server reading from its client does not act on). A COPY FROM STDIN waits for its rows,
a pipeline (psycopg's executemany) for its next statement: a leader frozen halfway
through either held every takeover off until it woke. So the store sends neither: each
statement goes whole, in one round trip (postgres.PostgresStore._insert_logs,
pgconn.Cursor.executemany).

Pitfalls designed against:
- The leader's lease is a row renewed over the store's pool, not a session lock: a session
  lock stays held by a frozen process (its connection is alive) and goes back to a pool
  with its connection. The fence makes a stale leader harmless however its connections are
  pooled, so a pooler in transaction mode (pgbouncer) in front of PostgreSQL is fine for
  it; LISTEN (the coordinator's relay) needs a session, so point the coordinators at
  PostgreSQL itself or at a session-mode pool.
- No decision reads a local clock against a stored time: "has the lease run out" is asked
  of PostgreSQL (lease_until < clock_timestamp()).
"""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime
from typing import Any

from gpubox import errors
from gpubox.store import backend


@dataclasses.dataclass(frozen=True)
class Leader:
    """The leadership row: who leads (holder "" when no one has yet), since when, in which
    epoch, and whether its lease still runs."""

    epoch: int
    holder: str
    since: datetime | None
    lease_until: datetime | None
    live: bool


@dataclasses.dataclass(frozen=True)
class CoordinatorRow:
    """One coordinator of the store, as it last said it was."""

    id: str
    host: str
    pid: int
    http: str
    link: str
    started_at: datetime
    seen_at: datetime
    takeovers: int  # how many times it took the lead


class LeaseStore(backend.Backend):
    """Leadership and the coordinators' list, on PostgreSQL (a SQLite store has one
    coordinator: gpubox.store.single)."""

    _local: threading.local

    def fence(self, epoch: int | None) -> None:
        """From now on, this thread's transactions go on only while `epoch` leads (None:
        no fence)."""
        self._local.fence = epoch

    def _check_fence(self, cur: Any) -> None:
        """In a transaction: errors.Deposed unless this thread's fence still leads."""
        fence = getattr(self._local, "fence", None)
        if fence is None:
            return
        cur.execute("SELECT epoch FROM leadership WHERE id = 1 FOR SHARE")
        row = cur.fetchone()
        epoch = int(row["epoch"]) if row else -1
        if epoch != fence:
            raise errors.Deposed(
                f"epoch {fence} no longer leads (epoch {epoch} does): another coordinator took over"
            )

    def _lock_the_row(self, cur: Any) -> None:
        """Wait for the leadership row and lock it, before an UPDATE computes a lease from
        clock_timestamp(). An UPDATE computes its new values first, then waits for a row
        that another transaction holds; if that one ends without changing the row (the
        fence's FOR SHARE of a frozen leader, ended by the server after the guard), the
        UPDATE writes the values of before its wait: a lease that began seconds ago and may
        have run out already, so a second standby waiting beside it took the lead 3 ms
        later (two epochs for one takeover, seen in the failover run)."""
        cur.execute("SELECT epoch FROM leadership WHERE id = 1 FOR UPDATE")

    def take_lead(self, holder: str, lease_s: float) -> int | None:
        """Lead from now on if no lease runs (or `holder` holds it): the new epoch, or None."""
        with self._write() as cur:
            # A look first, with no lock: while the lease runs (nearly every turn), a standby
            # takes nothing that the leader's writes would wait for.
            cur.execute(
                "SELECT COALESCE(lease_until < clock_timestamp(), true) AS open"
                " FROM leadership WHERE id = 1"
            )
            if not cur.fetchone()["open"]:
                return None
            self._lock_the_row(cur)
            cur.execute(
                "UPDATE leadership SET epoch = epoch + 1, holder = ?, since = clock_timestamp(),"
                " lease_until = clock_timestamp() + make_interval(secs => ?)"
                " WHERE id = 1 AND (lease_until IS NULL OR lease_until < clock_timestamp())"
                " RETURNING epoch",
                (holder, lease_s),
            )
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute("UPDATE coordinators SET takeovers = takeovers + 1 WHERE id = ?", (holder,))
            return int(row["epoch"])

    def renew_lead(self, epoch: int, lease_s: float) -> bool:
        """Extend the lease of `epoch`; False if another epoch leads now. StoreUnavailable
        when the row stayed taken for a quarter of the lease (the next turn tries again)."""
        with self._write() as cur:
            # The row is taken, for a moment, by each of this leader's broker transactions
            # (the fence). Waiting behind one when it froze, a renewal would get the row once
            # the server ended that one, then hold it itself, frozen, for another guard: a
            # takeover waited twice the guard (4.0 s against a 4 s limit in the failover run).
            cur.execute(f"SET LOCAL lock_timeout = {max(1, round(lease_s * 250))}")
            self._lock_the_row(cur)
            cur.execute(
                "UPDATE leadership SET lease_until = clock_timestamp() + make_interval(secs => ?)"
                " WHERE id = 1 AND epoch = ?",
                (lease_s, epoch),
            )
            return bool(cur.rowcount == 1)

    def give_up_lead(self, epoch: int) -> None:
        """End the lease of `epoch` now (a clean stop): the next coordinator to ask leads."""
        with self._write() as cur:
            cur.execute(
                "UPDATE leadership SET lease_until = clock_timestamp() - interval '1 second'"
                " WHERE id = 1 AND epoch = ?",
                (epoch,),
            )
            # The relay's notice format (coordinator.relay), from no coordinator in particular.
            cur.execute("SELECT pg_notify(?, ?)", (self.channel(), "- leader 0"))

    def leader(self) -> Leader:
        with self._read() as cur:
            cur.execute(
                "SELECT epoch, holder, since, lease_until,"
                " COALESCE(lease_until >= clock_timestamp(), false) AS live"
                " FROM leadership WHERE id = 1"
            )
            row = cur.fetchone()
        return Leader(
            int(row["epoch"]), row["holder"], row["since"], row["lease_until"], bool(row["live"])
        )

    def register_coordinator(self, row: CoordinatorRow) -> None:
        """Add or refresh this coordinator in the list (its seen_at is now)."""
        with self._write() as cur:
            cur.execute(
                "INSERT INTO coordinators (id, host, pid, http, link, started_at, seen_at)"
                " VALUES (?, ?, ?, ?, ?, clock_timestamp(), clock_timestamp())"
                " ON CONFLICT (id) DO UPDATE"
                " SET host = EXCLUDED.host, pid = EXCLUDED.pid, http = EXCLUDED.http,"
                " link = EXCLUDED.link, seen_at = clock_timestamp()",
                (row.id, row.host, row.pid, row.http, row.link),
            )

    def coordinator_seen(self, coordinator_id: str) -> None:
        with self._write() as cur:
            cur.execute(
                "UPDATE coordinators SET seen_at = clock_timestamp() WHERE id = ?",
                (coordinator_id,),
            )

    def drop_coordinator(self, coordinator_id: str) -> None:
        with self._write() as cur:
            cur.execute("DELETE FROM coordinators WHERE id = ?", (coordinator_id,))

    def coordinators(self, seen_within_s: float) -> list[CoordinatorRow]:
        """The coordinators seen in the last `seen_within_s` seconds, oldest first; those
        gone longer are deleted."""
        with self._write() as cur:
            cur.execute(
                "DELETE FROM coordinators"
                " WHERE seen_at < clock_timestamp() - make_interval(secs => ?)",
                (seen_within_s * 10,),
            )
            cur.execute(
                "SELECT id, host, pid, http, link, started_at, seen_at, takeovers"
                " FROM coordinators WHERE seen_at >= clock_timestamp() - make_interval(secs => ?)"
                " ORDER BY started_at, id",
                (seen_within_s,),
            )
            return [CoordinatorRow(**row) for row in cur.fetchall()]

    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of this store: one per schema, so that stores in
        different schemas of one database do not hear each other."""
        schema = getattr(self, "_schema_name", None)
        if schema is None:
            with self._read() as cur:
                cur.execute("SELECT current_schema() AS s")
                schema = str(cur.fetchone()["s"])
            self._schema_name = schema
        return f"gpubox_{schema}"[:63]
