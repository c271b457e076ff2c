"""Wake-ups between the coordinators of one PostgreSQL store, over LISTEN/NOTIFY.

What one coordinator does, the others must hear of at once: a job submitted or cancelled
through a standby must reach the leader's broker, and lines stored or a job ended by the
leader must wake the followers and waiters of every standby. Each coordinator runs a Relay:
- `publish(kind, job_id)` queues a notice; the sender thread sends what has queued up as
  few NOTIFYs as it can (notices joined in one payload), so a burst of stored lines costs a
  NOTIFY per burst, not per job;
- the listener thread LISTENs on the store's channel on a connection of its own and hands
  each notice from another coordinator to `on_notice`.

A notice is "<sender> <kind> <job id>". Kinds: "n" (the job's lines or status changed:
wake its followers), "f" (it ended: forget it), "schedule" and "cancel" (pokes for the
leader's broker), "leader" (a lease was given up: ask for it now). A coordinator hears its
own notices too and drops them. Should a notice be lost (the listener's connection dropped
for a moment), the followers' safety net (streams.WAKE_S) and the broker's timer round
(once a second) pick up what it said.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from gpubox import errors, supervise

log = logging.getLogger(__name__)

MAX_PAYLOAD = 7900  # PostgreSQL takes payloads below 8,000 bytes
RETRY_S = 1.0  # after a lost connection, wait this long before connecting again


class Relay:
    """See the module's docstring. `url` is the store's; `channel` its NOTIFY channel."""

    def __init__(
        self,
        url: str,
        channel: str,
        sender: str,
        on_notice: Callable[[str, int], None],
        stopping: threading.Event,
    ) -> None:
        self.url = url
        self.channel = channel
        self.sender = sender
        self.on_notice = on_notice
        self.stopping = stopping
        self._pending: dict[tuple[str, int], None] = {}  # ordered, without repeats
        self._cond = threading.Condition()
        self.listen_loop = supervise.Loop(stall_s=60.0)
        self.send_loop = supervise.Loop(stall_s=60.0)
        self.listening = threading.Event()  # set once LISTEN took
        self.heard = 0  # notices from other coordinators
        # Set in the listener thread while it hands a notice on: what that causes here (a
        # follower woken, say) is not published again.
        self._hearing = threading.local()

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name="gpubox relay"
        )

    def publish(self, kind: str, job_id: int = 0) -> None:
        """Queue a notice for the other coordinators (any thread; never blocks)."""
        if getattr(self._hearing, "active", False):
            return
        with self._cond:
            self._pending[(kind, job_id)] = None
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the sender thread ----------------------------------------------------------------

    def send(self) -> None:
        """Send queued notices until stopping (the sender thread's target)."""
        import psycopg

        conn: Any = None
        while not self.stopping.is_set():
            self.send_loop.tick()
            with self._cond:
                if not self._pending:
                    self._cond.wait(1.0)
                notices, self._pending = list(self._pending), {}
            if not notices:
                continue
            try:
                if conn is None:
                    conn = self._connect()
                for payload in self._payloads(notices):
                    conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
            except psycopg.Error as exc:
                log.warning("relay: could not notify the other coordinators: %s", exc)
                if conn is not None:
                    conn.close()
                    conn = None
                self.stopping.wait(RETRY_S)
        if conn is not None:
            conn.close()

    def _payloads(self, notices: list[tuple[str, int]]) -> list[str]:
        """The notices as payloads of at most MAX_PAYLOAD bytes: "<sender> kind id;kind id…"."""
        payloads: list[str] = []
        parts: list[str] = []
        size = 0
        for kind, job_id in notices:
            part = f"{kind} {job_id}"
            if parts and size + len(part) + 1 > MAX_PAYLOAD - len(self.sender) - 1:
                payloads.append(f"{self.sender} {';'.join(parts)}")
                parts, size = [], 0
            parts.append(part)
            size += len(part) + 1
        if parts:
            payloads.append(f"{self.sender} {';'.join(parts)}")
        return payloads

    # --- the listener thread --------------------------------------------------------------

    def listen(self) -> None:
        """Hear the other coordinators' notices until stopping (the listener's target)."""
        import psycopg
        from psycopg import sql

        while not self.stopping.is_set():
            self.listen_loop.tick()
            try:
                conn = self._connect()
            except psycopg.Error as exc:
                log.warning("relay: cannot listen for the other coordinators: %s", exc)
                self.stopping.wait(RETRY_S)
                continue
            try:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self.listening.set()
                while not self.stopping.is_set():
                    self.listen_loop.tick()
                    for notice in conn.notifies(timeout=0.5):
                        self._heard(notice.payload)
            except psycopg.Error as exc:
                log.warning("relay: lost the connection it listens on: %s", exc)
                self.stopping.wait(RETRY_S)
            finally:
                conn.close()

    def _heard(self, payload: str) -> None:
        sender, _, body = payload.partition(" ")
        if sender == self.sender:
            return
        for part in body.split(";"):
            kind, _, job_id = part.partition(" ")
            try:
                number = int(job_id)
            except ValueError:
                log.warning("relay: dropped a malformed notice %r", part[:100])
                continue
            self.heard += 1
            self._hearing.active = True
            try:
                self.on_notice(kind, number)
            except errors.GpuboxError:
                log.exception("relay: the notice %r failed", part[:100])
            finally:
                self._hearing.active = False
