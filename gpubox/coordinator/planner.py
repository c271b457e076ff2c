"""Each scheduling round's plan, and why each queued job waits."""

from __future__ import annotations

from gpubox import models
from gpubox.coordinator import scheduler
from gpubox.store import Store


class Planner:
    """Plans the whole queue on the ready workers (scheduler.plan_shapes), reading only the
    jobs the plan needs, and keeps why each job waits. The broker thread plans; any thread
    may ask queue_reason."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Why queued jobs wait, as of the last round: by job for the jobs it planned one by
        # one, by shape for the others.
        self.reasons: dict[int, str] = {}
        self.shape_reasons: dict[str, str] = {}
        self._needs: dict[str, models.Needs] = {}  # queued shapes read back, by shape
        self._matches = scheduler.Matches()  # which workers can run each shape
        self._queued: dict[int, models.Job] = {}  # queued jobs read last round, by id

    def plan(self, views: list[scheduler.WorkerView]) -> scheduler.Plan:
        """Plan the whole queue on these workers. Claims nothing."""
        # What a job asks for never changes: the shapes and jobs read are kept for the next
        # round, which reads only those it did not have.
        shapes = self.store.queued_shapes()
        self._needs = {s: self._needs.get(s) or models.Needs.from_shape(s) for s in shapes}
        known, self._queued = self._queued, {}

        def read(shape: str, count: int) -> list[models.Job]:
            jobs = self.store.queued_jobs(count, known, shape)
            self._queued.update((job.id, job) for job in jobs)
            return jobs

        plan = scheduler.plan_shapes(self._needs, read, views, self._matches)
        self.reasons, self.shape_reasons = plan.reasons, plan.shape_reasons
        return plan

    def queue_reason(self, job_id: int) -> str:
        """Why a QUEUED job waits, as of the last round. Any thread."""
        why = self.reasons.get(job_id)
        if why is None:
            why = self.shape_reasons.get(self.store.get_job(job_id).spec.needs.shape)
        return why or "waiting to be scheduled (submitted since the last scheduling round)"
