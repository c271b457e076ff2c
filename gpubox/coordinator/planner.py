"""Each scheduling round's plan, and why each queued job waits."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from gpubox import models
from gpubox.coordinator import fairshare, metrics, reading, scheduler
from gpubox.store import Store
from gpubox.store.base import QueueGroup

# How often a round lists the queue's groups even when nothing said it changed: the net under
# a change no poke told of. Submits, requeues and failed claims each make a listing at once;
# a listing reads the whole queue (~20 ms for 100,000 queued jobs on SQLite), so it is not
# done every second: at 1,000 workers that made the slowest 3 % of decisions.
GROUPS_EVERY_S = 10.0
READ_AHEAD = 32  # at least this many more jobs of a group than a round needs are read
# A job's place in the queue (GET /api/v1/jobs/<id>, a submit's answer) counts the queue as
# listed at most this long ago: under a flood of submits, one listing serves many answers.
PLACE_GROUPS_S = 0.1


Key = tuple[str, int, tuple[str | None, ...] | None]  # a read: shape, priority, submitters


class Reads:
    """The queued jobs each read gave since the queue's groups were listed, less those
    claimed since, and whether they were all that the read found then. Until the next
    listing the queue only loses jobs (a job submitted or queued again makes a listing), so
    a later round reads the store again only for a group it needs more of. A job cancelled
    meanwhile may be planned once: its claim finds it gone, and that failed claim makes a
    listing.

    Each read's jobs are kept in id order in a dict, so a claim takes a job out in one step
    and a read of a group whose jobs were all claimed costs nothing: on a busy fleet, fair
    order went through dozens of those a round, and filtering them cost most of a decision."""

    def __init__(self, before: Mapping[int, models.Job] | None = None) -> None:
        self._jobs: dict[Key, dict[int, models.Job]] = {}
        self._whole: dict[Key, bool] = {}
        self._keys: dict[int, set[Key]] = {}  # job id → the reads that gave it
        self.by_id: dict[int, models.Job] = {}  # every job kept, by id
        # What the store need not parse again when it reads jobs: those kept here, and those
        # kept before the listing that made this (a job's spec never changes).
        self.known = collections.ChainMap(self.by_id, dict(before or {}))

    def get(self, key: Key, count: int) -> list[models.Job] | None:
        """The first `count` jobs kept for this read; None if the store must be read."""
        kept = self._jobs.get(key)
        if kept is None or (len(kept) < count and not self._whole[key]):
            return None
        return list(itertools.islice(kept.values(), count))

    def put(self, key: Key, jobs: list[models.Job], whole: bool) -> None:
        self._jobs[key] = {job.id: job for job in jobs}
        self._whole[key] = whole
        for job in jobs:
            self._keys.setdefault(job.id, set()).add(key)
            self.by_id[job.id] = job

    def drop(self, ids: Iterable[int]) -> None:
        """Jobs no longer queued (claimed, or gone): out of every read that gave them."""
        for job_id in ids:
            self.by_id.pop(job_id, None)
            for key in self._keys.pop(job_id, ()):
                self._jobs[key].pop(job_id, None)


class Planner:
    """Plans the whole queue in fair order on the ready workers (reading.plan_queue),
    reading only the jobs the plan needs, and keeps why each job waits. The broker thread
    plans; any thread may ask queue_reason or read `sharing`."""

    def __init__(self, store: Store, fair_share_half_life: float = 86400.0) -> None:
        self.store = store
        self.tracker = fairshare.Tracker(store, fair_share_half_life)
        # Why queued jobs wait, as of the last round: by job for the jobs it planned one by
        # one, by group or shape for the others.
        self.reasons: dict[int, str] = {}
        self.group_reasons: dict[tuple[str, int, str | None], str] = {}
        self.shape_reasons: dict[str, str] = {}
        self._needs: dict[str, models.Needs] = {}  # queued shapes read back, by shape
        self._matches = scheduler.Matches()  # which workers can run each shape
        # The queue's groups as last listed, and the highest job id then. The list is made
        # again when a job was submitted since (a higher id, or a poke: queue_changed), when
        # a job that ran is queued again (requeued, or fair share's read finds one), when a
        # claim failed, or GROUPS_EVERY_S after the last. A group that emptied since costs a
        # read that finds nothing, and no other change adds a group. So the round run as a
        # job ends lists nothing (3 ms for 10,000 queued jobs).
        self._groups: list[QueueGroup] = []
        self._groups_listed = -GROUPS_EVERY_S
        self._groups_stale = True
        self._last_id = 0
        self._reads = Reads()  # the jobs read since the groups were listed
        # The groups as queue_place last listed them, and when (time.monotonic).
        self._place_groups: tuple[float, list[QueueGroup]] = (-PLACE_GROUPS_S, [])

    @property
    def sharing(self) -> fairshare.Snapshot:
        """Every submitter's use and holdings, as of the last round."""
        return self.tracker.snapshot

    def plan(self, views: list[scheduler.WorkerView]) -> scheduler.Plan:
        """Plan the whole queue on these workers. Claims nothing."""
        sharing = self.tracker.refresh()
        now, last_id = time.monotonic(), self.store.last_job_id()
        if (
            self._groups_stale
            or sharing.requeued
            or last_id != self._last_id
            or now - self._groups_listed >= GROUPS_EVERY_S
        ):
            self._groups, self._groups_listed = self.store.queue_groups(), now
            self._groups_stale, self._last_id = False, last_id
            self._reads = Reads(self._reads.by_id)
        groups = self._groups
        # What a job asks for never changes: the shapes and jobs read are kept for the next
        # round, which reads only those it did not have.
        shapes = {group.shape for group in groups}
        self._needs = {s: self._needs.get(s) or models.Needs.from_shape(s) for s in shapes}

        def read(
            shape: str, priority: int, submitters: Sequence[str | None] | None, count: int
        ) -> list[models.Job]:
            key = (shape, priority, None if submitters is None else tuple(submitters))
            jobs = self._reads.get(key, count)
            if jobs is None:
                # Read ahead: the next rounds' claims take jobs out of what is kept, and a
                # read per round for each group cost a busy fleet most of its decision.
                ahead = count + max(count, READ_AHEAD)
                found = self.store.queued_of(shape, priority, submitters, ahead, self._reads.known)
                self._reads.put(key, found, whole=len(found) < ahead)
                jobs = found[:count]
            return jobs

        plan = reading.plan_queue(groups, self._needs, read, views, self._matches, sharing)
        self.reasons, self.shape_reasons = plan.reasons, plan.shape_reasons
        self.group_reasons = plan.group_reasons
        return plan

    def top_priority(self) -> int | None:
        """The highest priority among the queued jobs as last listed (None: none)."""
        return max((group.priority for group in self._groups), default=None)

    def queue_changed(self) -> None:
        """A job was queued: the next round lists the queue's groups again."""
        self._groups_stale = True

    def claimed(self, jobs: Sequence[models.Job], failed: Sequence[int] = ()) -> None:
        """Jobs this round claimed (see fairshare.Tracker.claimed), and the ids of those it
        planned and could not claim: cancelled since, or held back by a GPU the store still
        has busy. Those are dropped from what was read, and the next round lists the queue
        again, which finds the ones still queued."""
        self.tracker.claimed(jobs)
        self._reads.drop(job.id for job in jobs)
        if failed:
            self._reads.drop(failed)
            self._groups_stale = True

    def started(self, job_id: int, executed_at: datetime) -> None:
        """A claimed job started (see fairshare.Tracker.started)."""
        self.tracker.started(job_id, executed_at)

    def requeued(self, job_id: int) -> None:
        """A job that was running is queued again (its worker was lost, or never confirmed
        it): it holds nothing from now on, and the next round lists the queue again."""
        self.tracker.ended(job_id)
        self._groups_stale = True

    def ended(self, job_id: int) -> None:
        """A job ended (see fairshare.Tracker.ended)."""
        self.tracker.ended(job_id)

    def queue_place(self, job: models.Job, recent: bool = False) -> dict[str, Any]:
        """Where a QUEUED job stands in the fair order (fairshare.place). With `recent` (a
        submit's answer), counted from the queue's groups as listed at most PLACE_GROUPS_S
        ago: listing them is a pass over the queue, which at every submit's answer cost a
        flood of submits a fifth of its time. Any thread."""
        listed_at, groups = self._place_groups
        now = time.monotonic()
        if not recent or now - listed_at > PLACE_GROUPS_S:
            groups = self.store.queue_groups()
            self._place_groups = (now, groups)
        return fairshare.place(
            job,
            groups,
            lambda: self.store.queued_before(job.spec.priority, job.id),
            self.sharing,
        )

    def queue_in_order(self, limit: int) -> list[models.Job]:
        """The first `limit` queued jobs in the order they will start, priority and fair
        share as of the last round (jobs of different needs may overtake each other, as
        their workers free up). Any thread."""
        sharing = self.sharing
        jobs_of: dict[tuple[int, str | None], int] = {}
        for group in self.store.queue_groups():
            key = (group.priority, group.submitter)
            jobs_of[key] = jobs_of.get(key, 0) + group.jobs

        def order(key: tuple[int, str | None]) -> tuple[int, float]:
            return sharing.order(*key)

        found: list[models.Job] = []
        for (minus_priority, _), tied in itertools.groupby(sorted(jobs_of, key=order), order):
            if len(found) >= limit:
                break
            names = [submitter for _, submitter in tied]
            found += self.store.queued_of(None, -minus_priority, names, limit - len(found))
        return found

    def submitters(self) -> list[metrics.Submitter]:
        """What each submitter has queued, running and used, for /metrics. Any thread."""
        sharing = self.sharing
        queued: dict[str | None, int] = {}
        for group in self.store.queue_groups():
            queued[group.submitter] = queued.get(group.submitter, 0) + group.jobs
        names = {*queued, *sharing.held, *sharing.use}
        return [
            metrics.Submitter(
                name or "",
                queued.get(name, 0),
                sharing.held.get(name, fairshare.Held()).jobs,
                sharing.held.get(name, fairshare.Held()).gpus,
                round(sharing.use_of(name) / 3600, 6),
            )
            for name in sorted(names, key=lambda name: name or "")
        ]

    def queue_reason(self, job: models.Job) -> str:
        """Why a QUEUED job waits, as of the last round. Any thread."""
        why = self.reasons.get(job.id)
        if why is None:
            spec = job.spec
            why = self.group_reasons.get((spec.needs.shape, spec.priority, spec.submitter))
            why = why or self.shape_reasons.get(spec.needs.shape)
        return why or "waiting to be scheduled (submitted since the last scheduling round)"
