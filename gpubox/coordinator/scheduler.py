"""Which queued job goes to which worker, on which GPUs. Pure: the broker feeds it the queue
and what each worker has free, and applies the plan through the store.

The rule, in queue order (priority, then submission):

1. A job goes to a worker that has its labels and mounts, can run it (a process-runtime
   worker cannot apply Docker-only options, nor run a job without a command, and takes only
   jobs whose token may use process workers: labels alone never send a job there), a free job
   slot, and enough free GPUs that suit it (`gpu_model` in the NVML name, at least
   `gpu_memory_gb`). Of several, the one with the fewest such GPUs free, then the least
   memory on them (best fit: big blocks and big cards stay for the jobs that need them),
   then by name; its GPUs are taken in index order.
2. A job that could run on some worker but not now (too few GPUs free) reserves one: the one
   with the most suitable GPUs free (then by name). A reserved worker gives no GPU that suits
   the holder to a job behind it in the queue, so those GPUs gather as they free up until the
   job fits; its other GPUs and spare slots stay for anyone (one slot stays for the holder).
   A job is therefore never overtaken forever by smaller jobs of lower priority; jobs ahead
   of it come first, as they would.
3. Every job left queued gets a reason a person can act on.

The plan is made afresh each round from the current state, so a reservation needs no
bookkeeping: it lasts while its job is the earliest that cannot start there.

A round plans every queued job, yet reads only a few (plan_shapes): jobs with the same needs
(models.Needs, their "shape") fare alike. A shape that no connected worker can run is
skipped whole: its jobs hold nothing and share one reason. Of a shape that some worker can
run, only the first jobs can start or hold a worker this round (see _window); the rest wait
for the same reason as the last of those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from gpubox import models


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
    # shape → why its jobs wait, for the jobs the plan did not look at one by one.
    shape_reasons: dict[str, str] = dataclasses.field(default_factory=dict)


def plan_shapes(
    shapes: Mapping[str, models.Needs],
    read: Callable[[str, int], list[models.Job]],
    workers: list[WorkerView],
    matches: Matches | None = None,
) -> Plan:
    """The plan that plan() would make for the whole queue, reading only what it needs.

    `shapes` are the shapes of the queued jobs with their needs; `read(shape, n)` gives the
    first n queued jobs of a shape in queue order. Jobs that plan() would look at in vain
    are not read: their reason is in `shape_reasons`. `matches`, kept by the caller from
    one round to the next, saves matching every shape against every worker again."""
    queue: list[models.Job] = []
    last: dict[str, int] = {}  # shape → its last job read, when it has more
    reasons: dict[str, str] = {}
    found = (matches or Matches()).find(shapes, workers)
    by_name = {w.name: w for w in workers}
    for shape, needs in shapes.items():
        match = found[shape]
        if isinstance(match, str):
            reasons[shape] = match
            continue
        count = _window(needs, [by_name[name] for name in match])
        jobs = read(shape, count)
        queue.extend(jobs)
        if len(jobs) == count:
            last[shape] = jobs[-1].id
    queue.sort(key=lambda job: (-job.spec.priority, job.id))
    result = plan(queue, workers)
    for shape, job_id in last.items():
        if job_id in result.reasons:  # always, as _window explains
            reasons[shape] = result.reasons[job_id]
    result.shape_reasons = reasons
    return result


class Matches:
    """Which workers can ever run each shape, or why none can, kept from one round to the
    next while the workers offer the same (GPUs, labels, mounts, runtime). With a shape per
    job, matching each against every worker every round would cost the most: about 5 µs a
    shape with 8 workers."""

    def __init__(self) -> None:
        self._offer: tuple[Any, ...] = ()
        self._found: dict[str, tuple[str, ...] | str] = {}

    def find(
        self, shapes: Mapping[str, models.Needs], workers: list[WorkerView]
    ) -> dict[str, tuple[str, ...] | str]:
        """For each shape, the names of the workers that can ever run it, or why none can."""
        offer = tuple(
            (
                w.name,
                w.runtime,
                sorted(w.labels.items()),
                sorted(w.mounts),
                [sorted(gpu.items()) for gpu in w.gpus],
            )
            for w in workers
        )
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


def _window(needs: models.Needs, able: list[WorkerView]) -> int:
    """How many of the first queued jobs of a shape a round must plan, given the workers
    that can ever run it.

    Through a round, free GPUs, slots and open workers only get fewer, so once a job of
    the shape cannot start, none behind it can. Of those behind, each can at most reserve a
    worker that no job holds yet, and only when it needs GPUs. So no more jobs of the shape
    can start or reserve than the free slots and the workers that can run it, and the one
    after them (and every one behind it) waits for the same reason and changes nothing."""
    slots = sum(max(0, w.slots) for w in able)
    return slots + (len(able) if needs.gpus else 0) + 1


def plan(queue: list[models.Job], workers: list[WorkerView]) -> Plan:
    """Assignments for the queue (in its order) on these workers, and why the rest wait."""
    result = Plan()
    free = {w.name: list(w.free) for w in workers}
    slots = {w.name: w.slots for w in workers}
    info = {w.name: {gpu["uuid"]: gpu for gpu in w.gpus} for w in workers}
    holders: dict[str, models.Needs] = {}  # reserved worker → what its holder needs
    position = {job.id: index for index, job in enumerate(queue)}
    for job in queue:
        needs = job.spec.needs
        able = [w for w in workers if w.can_ever_run(needs)]
        if not able:
            result.reasons[job.id] = _no_worker(needs, workers)
            continue
        fits = []
        for worker in able:
            holder = holders.get(worker.name)
            if slots[worker.name] < (2 if holder else 1):
                continue  # a reserved worker keeps a slot for its holder
            suitable = _suitable(worker, free[worker.name], needs)
            if holder is not None:
                # The GPUs its holder could use gather for it; others stay for anyone.
                suitable = [u for u in suitable if not holder.wants_gpu(info[worker.name][u])]
            if len(suitable) >= needs.gpus:
                memory = sum(info[worker.name][u].get("memory_mb", 0) for u in suitable)
                fits.append((len(suitable), memory, worker.name, worker, suitable))
        if fits:
            *_, name, worker, suitable = min(fits, key=lambda fit: fit[:3])
            chosen = suitable[: needs.gpus]
            result.assignments.append(Assignment(job, name, chosen))
            free[name] = [uuid for uuid in free[name] if uuid not in chosen]
            slots[name] -= 1
            continue
        reason = _wait(job, able, free, result.reserved, position)
        if job.id in result.reserved.values():
            holders.update({w: needs for w, held in result.reserved.items() if held == job.id})
        result.reasons[job.id] = reason
    return result


def _suitable(worker: WorkerView, free: list[str], needs: models.Needs) -> list[str]:
    """The free GPUs of worker that suit needs, in index order."""
    return [
        gpu["uuid"]
        for gpu in sorted(worker.gpus, key=lambda gpu: gpu.get("index", 0))
        if gpu["uuid"] in free and needs.wants_gpu(gpu)
    ]


def _wait(
    job: models.Job,
    able: list[WorkerView],
    free: dict[str, list[str]],
    reserved: dict[str, int],
    position: dict[int, int],
) -> str:
    """Why a job that some worker could run waits; reserves a worker for it if it needs GPUs
    and one is not held already (the one with most of what it needs free; then by name)."""
    needs = job.spec.needs
    if needs.gpus == 0:
        return f"waiting for a free job slot (max_jobs) on {', '.join(w.name for w in able)}"
    open_workers = [w for w in able if w.name not in reserved]
    if not open_workers:
        holder = min((reserved[w.name] for w in able), key=position.__getitem__)
        held = ", ".join(w.name for w in able if reserved[w.name] == holder)
        return f"waiting behind job {holder}: the GPUs of {held} are held for it"
    counts = {w.name: len(_suitable(w, free[w.name], needs)) for w in open_workers}
    worker = min(open_workers, key=lambda w: (-counts[w.name], w.name))
    reserved[worker.name] = job.id
    if counts[worker.name] >= needs.gpus:
        return f"waiting for a free job slot (max_jobs) on {worker.name}"
    return (
        f"not enough free GPUs: {counts[worker.name]} of the {needs.gpus} it needs are free on"
        f" {worker.name}, which holds them for this job as others end"
    )


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
