"""Which coordinator leads, on a PostgreSQL store shared by several: the lease kept by the
leadership thread, and the broker's view as the HTTP API sees it (LiveSwitch).

Every coordinator of the store serves the HTTP API. One of them, the leader, also runs the
broker (the worker link and scheduling); the others stand by. The leadership thread of each
coordinator turns once a second (RENEW_S), or at once when the relay hears that a leader
gave its lease up:
- a standby asks to lead; it gets the lead once the lease has run out (the leader died or
  froze) or was given up (a clean stop), and then starts its broker (`promote`);
- the leader renews its lease; when it finds another epoch leading (it froze, and another
  took over meanwhile) it raises errors.Deposed, which ends the coordinator: systemd starts
  it again, as a standby. Its broker's writes were fenced all along (store.leases), so
  nothing it did while deposed reached the store.

The lease lasts half the liveness window (lease_s), so a leader that died is replaced
within lease_s + RENEW_S: 6 s with the defaults, inside the 10 s a worker waits before it
looks for another coordinator.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from gpubox import errors, models, supervise
from gpubox.coordinator.brokerview import BrokerView
from gpubox.coordinator.planner import Planner
from gpubox.store import leases

log = logging.getLogger(__name__)

RENEW_S = 1.0  # how often the leader renews its lease, and a standby asks for it (at most)
SEEN_WITHIN_S = 5.0  # a coordinator unheard of for longer is left out of the list


def coordinator_id() -> str:
    """A new coordinator's id: its host, and a random part that tells restarts apart."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Leadership:
    """The lease of one coordinator (see the module's docstring). `promote(epoch)` starts the
    broker; it runs in this thread."""

    def __init__(
        self,
        store: leases.LeaseStore,
        me: leases.CoordinatorRow,
        lease_s: float,
        promote: Callable[[int], None],
        stopping: threading.Event,
    ) -> None:
        self.store = store
        self.me = me
        self.lease_s = lease_s
        # A quarter of the lease at most, so that a late turn or two does not lose it.
        self.every_s = min(RENEW_S, lease_s / 4)
        self.promote = promote
        self.stopping = stopping
        self.wake = threading.Event()  # set by the relay: a lease was given up
        # Held by a turn of run() and by give_up(): a renewal that began as the coordinator
        # was told to stop would otherwise renew the lease just given up, and another
        # coordinator would wait for it to run out (a clean stop's takeover took 2.04 s).
        self._turn = threading.Lock()
        self.epoch: int | None = None  # the epoch this coordinator leads in
        self.since: datetime | None = None
        self.takeovers = 0
        self.loop = supervise.Loop(stall_s=60.0)

    def start(self) -> None:
        """Register, and take the lead if no one holds it: before the thread starts, so a
        coordinator that starts alone starts as the leader. StoreUnavailable propagates."""
        self.store.register_coordinator(self.me)
        self._try_lead()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.loop.tick()
            self.wake.wait(self.every_s)
            self.wake.clear()
            with self._turn:
                if self.stopping.is_set():
                    return
                try:
                    self.store.coordinator_seen(self.me.id)
                    if self.epoch is None:
                        self._try_lead()
                    elif not self.store.renew_lead(self.epoch, self.lease_s):
                        raise errors.Deposed(
                            f"epoch {self.epoch}'s lease was taken over by another coordinator"
                        )
                except errors.StoreUnavailable as exc:
                    # The fence keeps a stale leader harmless; PostgreSQL is back, the next
                    # turn renews (or finds another epoch and ends this coordinator).
                    log.warning("leadership: the store is unavailable: %s", exc)

    def _try_lead(self) -> None:
        epoch = self.store.take_lead(self.me.id, self.lease_s)
        if epoch is None:
            return
        self.epoch, self.since = epoch, models.utcnow()
        self.takeovers += 1
        log.info("this coordinator (%s) leads now, epoch %d", self.me.id, epoch)
        self.promote(epoch)

    def give_up(self) -> None:
        """A clean stop: end the lease now, so another coordinator leads at once. Call it
        once `stopping` is set: a turn of run() under way ends first, and none follows."""
        with self._turn:
            if self.epoch is None:
                return
            try:
                self.store.give_up_lead(self.epoch)
                log.info("gave the lead up (epoch %d)", self.epoch)
            except errors.StoreError as exc:
                log.warning(
                    "could not give the lead up (it lapses in %.0f s): %s", self.lease_s, exc
                )

    def leave(self) -> None:
        """Take this coordinator off the list (a clean stop)."""
        try:
            self.store.drop_coordinator(self.me.id)
        except errors.StoreError as exc:
            log.warning("could not take this coordinator off the list: %s", exc)

    def metrics(self) -> str:
        """The leadership lines of /metrics."""
        leading = self.epoch is not None
        return (
            "# HELP gpubox_coordinator_leader 1 while this coordinator leads (runs the broker)\n"
            "# TYPE gpubox_coordinator_leader gauge\n"
            f"gpubox_coordinator_leader {int(leading)}\n"
            "# HELP gpubox_coordinator_epoch The epoch this coordinator leads in (0: standby)\n"
            "# TYPE gpubox_coordinator_epoch gauge\n"
            f"gpubox_coordinator_epoch {self.epoch or 0}\n"
            "# HELP gpubox_coordinator_takeovers_total Times this coordinator took the lead\n"
            "# TYPE gpubox_coordinator_takeovers_total counter\n"
            f"gpubox_coordinator_takeovers_total {self.takeovers}\n"
        )


def this_coordinator(http: str, link: str) -> leases.CoordinatorRow:
    """The row this process registers as (its times are PostgreSQL's, set by the store)."""
    now = models.utcnow()
    return leases.CoordinatorRow(
        id=coordinator_id(),
        host=socket.gethostname(),
        pid=os.getpid(),
        http=http,
        link=link,
        started_at=now,
        seen_at=now,
        takeovers=0,
    )


STANDBY_REASON = "waiting to be scheduled by the leading coordinator (asked of a standby)"


class LiveSwitch:
    """The API's LiveView: the broker's, once this coordinator leads; before that, what a
    standby can say from the store. `poke` goes to the broker here, or to the leader
    through `relay`."""

    def __init__(
        self,
        store: Any,
        relay: Callable[[str, int], None],
        leadership: Leadership,
        fair_share_half_life: float,
    ) -> None:
        self.view: BrokerView | None = None  # the broker's, set by the coordinator when it leads
        self.relay = relay
        self.leadership = leadership
        self.planner = Planner(store, fair_share_half_life)  # the standby's read-only view

    def poke(self, kind: str, job_id: int = 0) -> None:
        view = self.view
        if view is not None:
            view.poke(kind, job_id)
        else:
            self.relay(kind, job_id)

    def queue_reason(self, job: models.Job) -> str:
        return self.view.queue_reason(job) if self.view is not None else STANDBY_REASON

    def queue_place(self, job: models.Job, recent: bool = False) -> dict[str, Any]:
        view = self.view or self.planner
        return dict(view.queue_place(job, recent))

    def queue_in_order(self, limit: int) -> list[models.Job]:
        view = self.view or self.planner
        return list(view.queue_in_order(limit))

    def queue_state(self, job: models.Job, place: bool, recent: bool) -> dict[str, Any]:
        state: dict[str, Any] = {"queue_reason": self.queue_reason(job)}
        if place:
            state["queue_place"] = self.queue_place(job, recent)
        return state

    def gpu_usage(self, worker: str) -> dict[str, dict[str, Any]]:
        return self.view.gpu_usage(worker) if self.view is not None else {}

    def metrics_page(self) -> str:
        page = self.view.metrics_page() if self.view is not None else ""
        return page + self.leadership.metrics()

    def last_heard(self, worker: str) -> datetime | None:
        return self.view.last_heard(worker) if self.view is not None else None

    def quarantine(self, worker: str) -> str:
        return self.view.quarantine(worker) if self.view is not None else ""

    def stalled(self) -> str:
        if self.view is not None:
            return self.view.stalled()
        trouble = self.leadership.loop.trouble()
        return f"the leadership thread {trouble}" if trouble else ""

    def last_turn_s(self) -> float:
        if self.view is not None:
            return self.view.last_turn_s()
        return self.leadership.loop.since()
