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
"""

from __future__ import annotations

import dataclasses
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

    def can_ever_run(self, spec: models.JobSpec) -> bool:
        return (
            spec.labels.items() <= self.labels.items()
            and set(spec.container.mounts) <= self.mounts
            and spec.runs_on(self.runtime)
            and sum(1 for gpu in self.gpus if spec.wants_gpu(gpu)) >= spec.gpus
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


def plan(queue: list[models.Job], workers: list[WorkerView]) -> Plan:
    """Assignments for the queue (in its order) on these workers, and why the rest wait."""
    result = Plan()
    free = {w.name: list(w.free) for w in workers}
    slots = {w.name: w.slots for w in workers}
    info = {w.name: {gpu["uuid"]: gpu for gpu in w.gpus} for w in workers}
    holders: dict[str, models.JobSpec] = {}  # reserved worker → what its holder asks for
    position = {job.id: index for index, job in enumerate(queue)}
    for job in queue:
        spec = job.spec
        able = [w for w in workers if w.can_ever_run(spec)]
        if not able:
            result.reasons[job.id] = _no_worker(spec, workers)
            continue
        fits = []
        for worker in able:
            holder = holders.get(worker.name)
            if slots[worker.name] < (2 if holder else 1):
                continue  # a reserved worker keeps a slot for its holder
            suitable = _suitable(worker, free[worker.name], spec)
            if holder is not None:
                # The GPUs its holder could use gather for it; others stay for anyone.
                suitable = [u for u in suitable if not holder.wants_gpu(info[worker.name][u])]
            if len(suitable) >= spec.gpus:
                memory = sum(info[worker.name][u].get("memory_mb", 0) for u in suitable)
                fits.append((len(suitable), memory, worker.name, worker, suitable))
        if fits:
            *_, name, worker, suitable = min(fits, key=lambda fit: fit[:3])
            chosen = suitable[: spec.gpus]
            result.assignments.append(Assignment(job, name, chosen))
            free[name] = [uuid for uuid in free[name] if uuid not in chosen]
            slots[name] -= 1
            continue
        reason = _wait(job, able, free, result.reserved, position)
        if job.id in result.reserved.values():
            holders.update({w: spec for w, held in result.reserved.items() if held == job.id})
        result.reasons[job.id] = reason
    return result


def _suitable(worker: WorkerView, free: list[str], spec: models.JobSpec) -> list[str]:
    """The free GPUs of worker that suit spec, in index order."""
    return [
        gpu["uuid"]
        for gpu in sorted(worker.gpus, key=lambda gpu: gpu.get("index", 0))
        if gpu["uuid"] in free and spec.wants_gpu(gpu)
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
    spec = job.spec
    if spec.gpus == 0:
        return f"waiting for a free job slot (max_jobs) on {', '.join(w.name for w in able)}"
    open_workers = [w for w in able if w.name not in reserved]
    if not open_workers:
        holder = min((reserved[w.name] for w in able), key=position.__getitem__)
        held = ", ".join(w.name for w in able if reserved[w.name] == holder)
        return f"waiting behind job {holder}: the GPUs of {held} are held for it"
    counts = {w.name: len(_suitable(w, free[w.name], spec)) for w in open_workers}
    worker = min(open_workers, key=lambda w: (-counts[w.name], w.name))
    reserved[worker.name] = job.id
    if counts[worker.name] >= spec.gpus:
        return f"waiting for a free job slot (max_jobs) on {worker.name}"
    return (
        f"not enough free GPUs: {counts[worker.name]} of the {spec.gpus} it needs are free on"
        f" {worker.name}, which holds them for this job as others end"
    )


def _no_worker(spec: models.JobSpec, workers: list[WorkerView]) -> str:
    """Why no connected worker could ever run a job: the first requirement none meets."""
    if not workers:
        return "no worker is connected"
    labelled = [w for w in workers if spec.labels.items() <= w.labels.items()]
    if not labelled:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items()))
        return f"no connected worker has the labels {wanted}"
    mounted = [w for w in labelled if set(spec.container.mounts) <= w.mounts]
    if not mounted:
        names = ", ".join(spec.container.mounts)
        return f"no connected worker with its labels declares the mounts {names}"
    runnable = [w for w in mounted if spec.runs_on(w.runtime)]
    if not runnable:
        return (
            "no connected worker with its labels runs Docker, and the process runtime's"
            f" cannot run it: {spec.process_refusal()}"
        )
    what = f"{spec.gpus} GPU" + ("s" if spec.gpus != 1 else "")
    if spec.gpu_model:
        what += f" of model {spec.gpu_model!r}"
    if spec.gpu_memory_gb:
        what += f" with {spec.gpu_memory_gb:g} GB or more"
    having = "its labels and mounts" if spec.container.mounts else "its labels"
    return f"no connected worker with {having} has {what}"
