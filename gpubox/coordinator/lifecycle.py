"""The job changes the broker makes on its own, not on a worker's report: a job whose worker
was lost is released, one that cannot be sent fails, one a worker never confirmed is queued
again. Store and follower work only: no sockets, no worker state."""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpubox import models
from gpubox.coordinator.events import Changes
from gpubox.coordinator.reports import LogLimits
from gpubox.logfmt import fields
from gpubox.store import Store

log = logging.getLogger(__name__)


class Lifecycle:
    """Ends, releases and requeues jobs in the store, and wakes their followers. `on_end` is
    told of every job that ended, so its caller drops what it kept about it; `on_requeue` of
    every running job queued again, so the next round plans it."""

    def __init__(
        self,
        store: Store,
        changes: Changes,
        limits: LogLimits,
        on_end: Callable[[int], None] = lambda job_id: None,
        on_requeue: Callable[[int], None] = lambda job_id: None,
    ) -> None:
        self.store = store
        self.changes = changes
        self.limits = limits
        self.on_end = on_end
        self.on_requeue = on_requeue

    def ended(self, job_id: int) -> None:
        """Wake the job's followers for the last time and drop its change counter, which
        would otherwise be kept for every job ever run."""
        self.changes.notify(job_id)
        self.changes.forget(job_id)
        self.on_end(job_id)

    def end_overdue(self, reason: Callable[[models.Job], str]) -> None:
        """End as ERROR the QUEUED jobs past their queue_timeout, each with why it waited
        (`reason`, the scheduler's word for it)."""
        now = models.utcnow()
        for job in self.store.overdue_queued(now):
            why = reason(job) or "waiting to be scheduled"
            error = f"queue timeout: queued for {job.spec.queue_timeout:g} s; {why}"
            if self.store.fail_queued(job.id, error, now):
                log.warning("job %d: %s", job.id, error, extra=fields(job=job.id))
                self.ended(job.id)

    def fail(self, job: models.Job, reason: str) -> None:
        """End a claimed job that cannot be sent at all."""
        log.error("job %d: %s", job.id, reason, extra=fields(job=job.id))
        now = models.utcnow()
        self.store.finish_job(
            job.id, job.attempts, models.Status.ERROR, None, reason, None, now, job.log_seq
        )
        self.ended(job.id)

    def release(self, job: models.Job, reason: str) -> None:
        """A running job whose worker is gone: queued again (without spending an attempt if
        it never started), or ended when it has no attempts left."""
        if job.executed_at is None:
            # Its container never started: nothing ran, so no attempt is spent on it.
            self.unclaim(job.id, job.attempts, f"{reason} before it started", logging.WARNING)
            return
        released = self.store.release_job(job.id, job.attempts, reason, models.utcnow())
        if released is not None:
            log.warning(
                "job %d: %s; now %s",
                job.id,
                reason,
                released.status.value,
                extra=fields(job=job.id, worker=job.worker, status=released.status.value),
            )
            if released.status.terminal:
                self.ended(job.id)
            else:
                self.changes.notify(job.id)
                self.on_requeue(job.id)

    def unclaim(self, job_id: int, attempt: int, why: str, level: int = logging.INFO) -> None:
        """Queue again a claimed job that never started, without spending an attempt; one
        whose cancel came in meanwhile ends CANCELLED instead."""
        if not self.store.unclaim_job(job_id, attempt, models.utcnow()):
            return
        if self.store.get_job(job_id).status is models.Status.CANCELLED:
            log.log(level, "job %d: %s; cancelled", job_id, why, extra=fields(job=job_id))
            self.ended(job_id)
            return
        log.log(level, "job %d: %s; queued again", job_id, why, extra=fields(job=job_id))
        self.changes.notify(job_id)
        self.on_requeue(job_id)

    def requeue_unconfirmed(self, worker: str, job_id: int, attempt: int, within_s: float) -> None:
        """Queue again a job that `worker` was sent and never confirmed within `within_s`,
        with a line in its log that tells its owner where it (and its secrets) went."""
        job = self.store.get_job(job_id)
        if job.status is not models.Status.RUNNING or job.attempts != attempt:
            return
        at = models.utcnow()
        marker = (
            f"[gpubox: worker {worker} was sent this job (attempt {attempt}, with its secrets"
            f" and registry credentials) and did not confirm it within {within_s:g} s;"
            " the job is queued again]"
        )
        stamp = f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond:06d}000Z"
        self.store.append_logs(
            job_id,
            attempt,
            job.log_seq + 1,
            [(stamp, models.GPUBOX_STREAM, marker)],
            self.limits.max_lines,
            keep_bytes=self.limits.max_bytes,
        )
        if self.store.unclaim_job(job_id, attempt, at):
            log.warning(
                "job %d: %s never confirmed it; queued again",
                job_id,
                worker,
                extra=fields(job=job_id, worker=worker),
            )
            self.changes.notify(job_id)
            self.on_requeue(job_id)
