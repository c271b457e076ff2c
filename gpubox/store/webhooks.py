"""Webhook deliveries in SQL: the events of jobs turned into deliveries, those due read out,
each attempt recorded (store.base.Store says what each operation means)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gpubox import models
from gpubox.store import backend, columns

_time = models.format_time
TERMINAL = ("FINISHED", "ERROR", "CANCELLED")


class WebhookStore(backend.Backend):
    """The store's operations on webhook deliveries."""

    def webhook_events_due(self, limit: int = 100) -> list[tuple[models.Job, int]]:
        with self._read() as cur:
            cur.execute(
                "SELECT * FROM jobs WHERE hooks_due > 0 AND (executed_at IS NOT NULL"
                f" OR status IN ({', '.join('?' for _ in TERMINAL)})) ORDER BY id LIMIT ?",
                (*TERMINAL, limit),
            )
            return [(columns.job_from_row(row), int(row["hooks_due"])) for row in cur.fetchall()]

    def add_deliveries(
        self,
        job_id: int,
        was_due: int,
        still_due: int,
        deliveries: Sequence[models.WebhookDelivery],
    ) -> bool:
        with self._write() as cur:
            cur.execute(
                "UPDATE jobs SET hooks_due = ? WHERE id = ? AND hooks_due = ?",
                (still_due, job_id, was_due),
            )
            if cur.rowcount != 1:
                return False  # another coordinator's dispatcher took these events
            cur.executemany(
                "INSERT INTO webhook_deliveries (job_id, url, event, delivery, payload,"
                " secret, state, attempts, next_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)",
                [
                    (
                        job_id,
                        d.url,
                        d.event,
                        d.delivery,
                        d.payload,
                        d.secret,
                        _time(d.next_at),
                        _time(d.created_at),
                    )
                    for d in deliveries
                ],
            )
            return True

    def due_deliveries(self, now: datetime, limit: int = 50) -> list[models.WebhookDelivery]:
        with self._read() as cur:
            cur.execute(
                "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND next_at <= ?"
                " ORDER BY next_at LIMIT ?",
                (_time(now), limit),
            )
            return [_delivery(row) for row in cur.fetchall()]

    def next_delivery_at(self) -> datetime | None:
        with self._read() as cur:
            cur.execute("SELECT MIN(next_at) AS t FROM webhook_deliveries WHERE state = 'pending'")
            return models.parse_time(cur.fetchone()["t"])

    def record_attempt(
        self,
        delivery_id: int,
        state: str,
        status: int | None,
        error: str | None,
        next_at: datetime,
        now: datetime,
    ) -> None:
        # A delivery that is done (delivered or given up) keeps no secret.
        with self._write() as cur:
            cur.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1,"
                " last_status = ?, last_error = ?, next_at = ?,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END,"
                " secret = CASE WHEN ? = 'pending' THEN secret ELSE NULL END"
                " WHERE id = ?",
                (
                    state,
                    status,
                    error,
                    _time(next_at),
                    state,
                    _time(now),
                    state,
                    delivery_id,
                ),
            )

    def job_deliveries(self, job_id: int) -> list[models.WebhookDelivery]:
        with self._read() as cur:
            cur.execute("SELECT * FROM webhook_deliveries WHERE job_id = ? ORDER BY id", (job_id,))
            return [_delivery(row) for row in cur.fetchall()]


def _delivery(row: Any) -> models.WebhookDelivery:
    return models.WebhookDelivery(
        id=int(row["id"]),
        job_id=int(row["job_id"]),
        url=row["url"],
        event=row["event"],
        delivery=row["delivery"],
        payload=row["payload"],
        secret=row["secret"],
        state=row["state"],
        attempts=int(row["attempts"]),
        next_at=models.parse_time(row["next_at"]) or datetime.min,
        created_at=models.parse_time(row["created_at"]) or datetime.min,
        last_status=None if row["last_status"] is None else int(row["last_status"]),
        last_error=row["last_error"],
        delivered_at=models.parse_time(row["delivered_at"]),
    )
