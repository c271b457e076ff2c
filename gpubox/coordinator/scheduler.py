"""Which queued job goes to which worker, on which GPUs. Pure: the broker feeds it the queue
and what each worker has free, and applies the plan through the store.

The rule, in queue order (priority; within one priority, fair share: the jobs of the submitter
that used the GPUs least lately first, then submission; see fairshare):

0. A job whose start would take its token past a cap (max_gpus, max_running) waits, and
   holds nothing.
1. A job goes to a worker that has its labels and mounts, can run it (a process-runtime
   worker cannot apply Docker-only options, nor run a job without a command, and takes only
   jobs whose token may use process workers: labels alone never send a job there), a free job
   slot, and enough free GPUs that suit it (`gpu_model` in the NVML name, at least
   `gpu_memory_gb`). Of several, the one with the fewest such GPUs free, then the least
   memory on them (best fit: big blocks and big cards stay for the jobs that need them),
   then by name; its GPUs are taken in index order.
2. A job that could run on some worker but not now (too few GPUs free, or no slot) reserves
   one that has a GPU free that suits it: the one with the most (then by name). A reserved
   worker gives no GPU that suits the holder to a job behind it in the queue, so those GPUs
   gather as they free up until the job fits; its other GPUs and spare slots stay for anyone
   (one slot stays for the holder). A job is therefore never overtaken forever by smaller
   jobs of lower priority: in the round that follows a GPU's release, the earliest job that
   could use it takes it or holds it. A worker with no suitable GPU free is not reserved:
   holding it would keep nothing from the jobs behind, and reserving each busy worker of a
   big fleet made every round plan as many jobs as there are workers (1,000 of them: 40 ms
   a round, against 3).
3. Every job left queued gets a reason a person can act on.

The plan is made afresh each round from the current state, so a reservation needs no
bookkeeping: it lasts while its job is the earliest that cannot start there.

A round plans every queued job, yet reads only a few (coordinator.reading): jobs with the
same needs (models.Needs, their "shape") fare alike.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

from gpubox import models
from gpubox.coordinator import fairshare


@dataclasses.dataclass
class WorkerView:
    """A connected worker ready for work, as the scheduler needs to see it."""

    name: str
    gpus: list[dict[str, Any]]  # every GPU it offers: uuid, name, memory_mb, index
    free: list[str]  # uuids free now
    slots: int  # jobs it can start now
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    mounts: frozenset[str] = frozenset()
    runtime: str = "docker"
    # offer(), once worked out: the broker keeps it from one round to the next, since a
    # worker's offer does not change within its session.
    offer_key: tuple[Any, ...] | None = dataclasses.field(default=None, compare=False, repr=False)

    def offer(self) -> tuple[Any, ...]:
        """What decides which shapes it can ever run, as a value that compares equal while
        that stays the same (Matches compares it from one round to the next)."""
        if self.offer_key is None:
            self.offer_key = (
                self.name,
                self.runtime,
                sorted(self.labels.items()),
                sorted(self.mounts),
                [sorted(gpu.items()) for gpu in self.gpus],
            )
        return self.offer_key

    def can_ever_run(self, needs: models.Needs) -> bool:
        return (
            needs.labels.items() <= self.labels.items()
            and set(needs.mounts) <= self.mounts
            and needs.runs_on(self.runtime)
            and sum(1 for gpu in self.gpus if needs.wants_gpu(gpu)) >= needs.gpus
        )


@dataclasses.dataclass(frozen=True)
class Assignment:
    job: models.Job
    worker: str
    gpus: list[str]


@dataclasses.dataclass
class Plan:
    assignments: list[Assignment] = dataclasses.field(default_factory=list)
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)  # job id → why queued
    reserved: dict[str, int] = dataclasses.field(default_factory=dict)  # worker → job id
    capped: set[int] = dataclasses.field(default_factory=set)  # jobs held back by a cap
    # Why the jobs the plan did not look at one by one wait: by (shape, priority,
    # submitter) for those that their token's caps hold back, else by shape.
    group_reasons: dict[tuple[str, int, str | None], str] = dataclasses.field(default_factory=dict)
    shape_reasons: dict[str, str] = dataclasses.field(default_factory=dict)


class Matches:
    """Which workers can ever run each shape, or why none can, kept from one round to the
    next while the workers offer the same (GPUs, labels, mounts, runtime). With a shape per
    job, matching each against every worker every round would cost the most: about 5 µs a
    shape with 8 workers."""

    def __init__(self) -> None:
        self._offer: list[tuple[Any, ...]] = []
        self._found: dict[str, tuple[str, ...] | str] = {}

    def find(
        self, shapes: Mapping[str, models.Needs], workers: list[WorkerView]
    ) -> dict[str, tuple[str, ...] | str]:
        """For each shape, the names of the workers that can ever run it, or why none can."""
        offer = [w.offer() for w in workers]
        known = self._found if offer == self._offer else {}
        found = {}
        for shape, needs in shapes.items():
            match = known.get(shape)
            if match is None:
                able = tuple(w.name for w in workers if w.can_ever_run(needs))
                match = able or _no_worker(needs, workers)
            found[shape] = match
        self._offer, self._found = offer, found  # shapes no longer queued are dropped
        return found


def plan(
    queue: list[models.Job],
    workers: list[WorkerView],
    sharing: fairshare.Snapshot | None = None,
    matched: Mapping[str, tuple[str, ...] | str] | None = None,
) -> Plan:
    """Assignments for the queue (in its order) on these workers, and why the rest wait.
    `sharing` says what each submitter's running jobs hold and its token's caps: a job whose
    start would pass a cap waits, and holds no worker. `matched`, when given, is what
    Matches.find says of the queue's shapes on these workers."""
    round_ = _Round(workers, sharing or fairshare.Snapshot())
    for shape, names in (matched or {}).items():
        round_.able[shape] = () if isinstance(names, str) else names
    return round_.plan(queue)


class _Round:
    """One plan in the making. A round's work grows with the jobs it looks at and the
    workers, so what stays true through the round is worked out once: through a round, free
    GPUs and slots only get fewer and reservations only more, so once a job of a shape
    cannot start, no later job of that shape can.

    For each shape, the workers that could take its next job are kept in a heap by how well
    they fit (`_fits`), and those it could reserve by how much of what it needs they have
    free (`_free`). A start or a reservation changes one worker: only its entries are worked
    out again (the old ones, of an older version, are skipped as they come up), so a round
    that starts thousands of jobs on a thousand workers costs that many heap steps, not
    jobs × workers.

    Only the workers with a free slot or a free GPU ("open") can take a job or be held for
    one, so those are all a round looks at; the others are named in reasons alone. On a busy
    fleet they are a few, however many workers it has."""

    def __init__(self, workers: list[WorkerView], sharing: fairshare.Snapshot) -> None:
        self.workers = workers
        self.sharing = sharing
        self.result = Plan()
        # Only the open workers (see above) are looked at one by one: what the round keeps
        # of each worker is kept for them alone.
        self.open = [w for w in workers if w.slots > 0 or w.free]
        self.free = {w.name: set(w.free) for w in self.open}
        self.slots = {w.name: w.slots for w in self.open}
        self.by_name = {w.name: w for w in self.open}
        # Each worker's GPUs by uuid, and in index order: worked out for the workers a round
        # looks at (those with a GPU free), not for every worker of a big fleet.
        self._info: dict[str, dict[str, dict[str, Any]]] = {}
        self._ordered: dict[str, list[dict[str, Any]]] = {}
        self.holders: dict[str, models.Needs] = {}  # reserved worker → what its holder needs
        self.held = dict(sharing.held)  # what each submitter's jobs hold, with this round's
        self.position: dict[int, int] = {}
        self.able: dict[str, tuple[str, ...]] = {}  # shape → the workers that can run it
        self.able_set: dict[str, frozenset[str]] = {}  # the same, as sets, once needed
        self._open_able: dict[str, list[WorkerView]] = {}  # shape → those of them open
        self.full: set[str] = set()  # shapes of which no more jobs can start this round
        self.behind: dict[str, str] = {}  # shape → its reason once every worker is reserved
        # A worker's versions: `fit` changes with its free GPUs, slots and holder, `free`
        # with its free GPUs alone. A heap entry of an older version is out of date.
        self.fit_version = dict.fromkeys(self.by_name, 0)
        self.free_version = dict.fromkeys(self.by_name, 0)
        # shape → (its needs, the names of its able workers, the heap)
        # _fits entries: (suitable GPUs free, their memory, name, fit version)
        # _free entries: (−suitable GPUs free, name, free version)
        self._fits: dict[str, tuple[models.Needs, set[str], list[tuple[int, int, str, int]]]]
        self._fits = {}
        self._free: dict[str, tuple[models.Needs, set[str], list[tuple[int, str, int]]]] = {}

    def plan(self, queue: list[models.Job]) -> Plan:
        self.position = {job.id: index for index, job in enumerate(queue)}
        for job in queue:
            self._place(job)
        return self.result

    def _place(self, job: models.Job) -> None:
        needs = job.spec.needs
        able = self.able.get(needs.shape)
        if able is None:
            able = tuple(w.name for w in self.workers if w.can_ever_run(needs))
            self.able[needs.shape] = able
        if not able:
            self.result.reasons[job.id] = _no_worker(needs, self.workers)
            return
        submitter = job.spec.submitter
        held = self.held.get(submitter, fairshare.Held())
        caps = self.sharing.caps_of(submitter)
        if caps:
            over = fairshare.over_cap(caps, held, needs.gpus)
            if over:
                self.result.reasons[job.id] = (
                    f"held back by the caps of its token {submitter!r}, which {over}"
                )
                self.result.capped.add(job.id)
                return
        open_able = self._open_of(needs.shape, able)
        if needs.shape not in self.full and self._start(job, open_able):
            self.held[submitter] = fairshare.Held(held.jobs + 1, held.gpus + needs.gpus)
            return
        self.full.add(needs.shape)
        self.result.reasons[job.id] = self._wait(job, able, open_able)

    def _open_of(self, shape: str, able: tuple[str, ...]) -> list[WorkerView]:
        """The open workers of those that can run a shape (see the class's docstring)."""
        found = self._open_able.get(shape)
        if found is None:
            if len(able) == len(self.workers):
                found = self.open  # every worker can run it
            else:
                wanted = self._able_set(shape, able)
                found = [w for w in self.open if w.name in wanted]
            self._open_able[shape] = found
        return found

    def _able_set(self, shape: str, able: tuple[str, ...]) -> frozenset[str]:
        found = self.able_set.get(shape)
        if found is None:
            found = self.able_set[shape] = frozenset(able)
        return found

    def _fit(self, name: str, needs: models.Needs) -> tuple[int, int, list[str]] | None:
        """How well worker `name` fits a job of these needs now (its suitable GPUs free, and
        their memory: fewer is better), and those GPUs; None if it has no room for one."""
        holder = self.holders.get(name)
        if self.slots[name] < (2 if holder else 1):
            return None  # a reserved worker keeps a slot for its holder
        suitable = self._suitable(name, needs)
        if holder is not None:
            # The GPUs its holder could use gather for it; others stay for anyone.
            info = self._gpus(name)
            suitable = [u for u in suitable if not holder.wants_gpu(info[u])]
        if len(suitable) < needs.gpus:
            return None
        info = self._gpus(name)
        memory = sum(info[u].get("memory_mb", 0) for u in suitable)
        return len(suitable), memory, suitable

    def _start(self, job: models.Job, able: list[WorkerView]) -> bool:
        """Assign the job to the best fit among `able` (the open workers that can run it:
        fewest suitable GPUs free, then the least memory on them, then by name), if one has
        room for it."""
        needs = job.spec.needs
        if needs.shape not in self._fits:
            heap = []
            for worker in able:
                fit = self._fit(worker.name, needs)
                if fit is not None:
                    heap.append((fit[0], fit[1], worker.name, self.fit_version[worker.name]))
            heapq.heapify(heap)
            self._fits[needs.shape] = (needs, {w.name for w in able}, heap)
        heap = self._fits[needs.shape][2]
        while heap and heap[0][3] != self.fit_version[heap[0][2]]:
            heapq.heappop(heap)  # out of date: its worker changed since
        if not heap:
            return False
        name = heap[0][2]
        fit = self._fit(name, needs)
        assert fit is not None  # its entry is of its current version
        chosen = fit[2][: needs.gpus]
        self.result.assignments.append(Assignment(job, name, chosen))
        self.free[name].difference_update(chosen)
        self.slots[name] -= 1
        self._changed(name, free=True)
        return True

    def _changed(self, name: str, free: bool) -> None:
        """Worker `name` changed (its free GPUs and slots when `free`, else its holder):
        its heap entries are worked out again."""
        self.fit_version[name] += 1
        for shape, (needs, able, heap) in self._fits.items():
            if shape not in self.full and name in able:
                fit = self._fit(name, needs)
                if fit is not None:
                    heapq.heappush(heap, (fit[0], fit[1], name, self.fit_version[name]))
        if not free:
            return
        self.free_version[name] += 1
        if name in self.result.reserved:
            return  # never reserved twice: its _free entries are of no use any more
        for needs, able, ranked in self._free.values():
            if name in able:
                count = len(self._suitable(name, needs))
                heapq.heappush(ranked, (-count, name, self.free_version[name]))

    def _suitable(self, name: str, needs: models.Needs) -> list[str]:
        """The free GPUs of worker `name` that suit needs, in index order."""
        free = self.free[name]
        if not free:
            return []
        ordered = self._ordered.get(name)
        if ordered is None:
            gpus = self.by_name[name].gpus
            ordered = self._ordered[name] = sorted(gpus, key=lambda gpu: gpu.get("index", 0))
        return [g["uuid"] for g in ordered if g["uuid"] in free and needs.wants_gpu(g)]

    def _gpus(self, name: str) -> dict[str, dict[str, Any]]:
        """Worker `name`'s GPUs by uuid."""
        info = self._info.get(name)
        if info is None:
            info = self._info[name] = {gpu["uuid"]: gpu for gpu in self.by_name[name].gpus}
        return info

    def _wait(self, job: models.Job, able: tuple[str, ...], open_able: list[WorkerView]) -> str:
        """Why a job that the workers `able` could run waits; reserves one of them for it
        (of `open_able`, those open) if it needs GPUs and one is not held already (the one
        with most of what it needs free; then by name)."""
        needs = job.spec.needs
        if needs.shape in self.behind:
            return self.behind[needs.shape]
        if needs.gpus == 0:
            # The same for every job of the shape behind it, through the round.
            names = _listed(able)
            self.behind[needs.shape] = f"waiting for a free job slot (max_jobs) on {names}"
            return self.behind[needs.shape]
        reserved = self.result.reserved
        if needs.shape not in self._free:
            ranked = [
                (-len(self._suitable(w.name, needs)), w.name, self.free_version[w.name])
                for w in open_able
                if w.name not in reserved
            ]
            ranked = [entry for entry in ranked if entry[0]]  # nothing to hold on the others
            heapq.heapify(ranked)
            self._free[needs.shape] = (needs, {w.name for w in open_able}, ranked)
        ranked = self._free[needs.shape][2]
        while ranked and (
            ranked[0][1] in reserved
            or ranked[0][2] != self.free_version[ranked[0][1]]
            or not ranked[0][0]
        ):
            heapq.heappop(ranked)  # held already, out of date, or with no suitable GPU free
        if not ranked:
            # Every worker that could run it is held or has no suitable GPU free, and stays so
            # through the round (free GPUs only get fewer).
            wanted = self._able_set(needs.shape, able)
            self.behind[needs.shape] = _behind(needs, able, wanted, reserved, self.position)
            return self.behind[needs.shape]
        minus_count, name, _ = heapq.heappop(ranked)
        count = -minus_count
        reserved[name] = job.id
        self.holders[name] = needs
        self._changed(name, free=False)
        if count >= needs.gpus:
            return f"waiting for a free job slot (max_jobs) on {name}"
        return (
            f"not enough free GPUs: {count} of the {needs.gpus} it needs are free"
            f" on {name}, which holds them for this job as others end"
        )


def _behind(
    needs: models.Needs,
    able: tuple[str, ...],
    wanted: frozenset[str],
    reserved: dict[str, int],
    position: dict[int, int],
) -> str:
    """Why a job waits when no worker that could run it (`able`, as a set: `wanted`) may be
    reserved for it: the earliest job holding one of them, or else that none has a GPU free
    that suits it. (A job holds one worker at most; few are held on a busy fleet.)"""
    holders = [(position[job_id], name) for name, job_id in reserved.items() if name in wanted]
    if not holders:
        where = able[0] if len(able) == 1 else f"any of {_listed(able)}"
        return f"not enough free GPUs: 0 of the {needs.gpus} it needs are free on {where}"
    _, held = min(holders)
    return f"waiting behind job {reserved[held]}: the GPUs of {held} are held for it"


LISTED = 5  # workers named in a reason at most; a reason names the rest by their number


def _listed(names: Sequence[str]) -> str:
    """Worker names for a reason: "w1, w2", or the first LISTED and how many more."""
    if len(names) <= LISTED:
        return ", ".join(names)
    return f"{', '.join(names[:LISTED])} and {len(names) - LISTED} more"


def _no_worker(needs: models.Needs, workers: list[WorkerView]) -> str:
    """Why no connected worker could ever run a job: the first requirement none meets."""
    if not workers:
        return "no worker is connected"
    labelled = [w for w in workers if needs.labels.items() <= w.labels.items()]
    if not labelled:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(needs.labels.items()))
        return f"no connected worker has the labels {wanted}"
    mounted = [w for w in labelled if set(needs.mounts) <= w.mounts]
    if not mounted:
        names = ", ".join(needs.mounts)
        return f"no connected worker with its labels declares the mounts {names}"
    runnable = [w for w in mounted if needs.runs_on(w.runtime)]
    if not runnable:
        return (
            "no connected worker with its labels runs Docker, and the process runtime's"
            f" cannot run it: {needs.process_refusal()}"
        )
    what = f"{needs.gpus} GPU" + ("s" if needs.gpus != 1 else "")
    if needs.gpu_model:
        what += f" of model {needs.gpu_model!r}"
    if needs.gpu_memory_gb:
        what += f" with {needs.gpu_memory_gb:g} GB or more"
    having = "its labels and mounts" if needs.mounts else "its labels"
    return f"no connected worker with {having} has {what}"
