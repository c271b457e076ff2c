"""Which queued jobs a scheduling round reads, so that it plans the whole queue from a few.

Jobs with the same needs (models.Needs, their "shape") fare alike. A shape that no
connected worker can run is skipped whole: its jobs hold nothing and share one reason. Of a
shape that some worker can run, only the first jobs in the queue's order can start or hold a
worker this round (see _window); the rest wait for the same reason as the last of those.

The queue is read group by group (store.queue_groups: its jobs by shape, priority and
submitter). A shape's groups are taken in fair order (fairshare.Snapshot.order); groups that
tie are read together, by id. A submitter whose caps let no more of its jobs of the shape
start is not read there: those jobs wait, held back by the caps (Plan.group_reasons).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from gpubox import models
from gpubox.coordinator import fairshare, scheduler
from gpubox.store.base import QueueGroup

# read(shape, priority, submitters, n): the first n queued jobs (lowest id first) of that
# shape and priority, of those submitters (None: of any).
Read = Callable[[str, int, Sequence[str | None] | None, int], list[models.Job]]


def plan_queue(
    groups: Sequence[QueueGroup],
    needs_of: Mapping[str, models.Needs],
    read: Read,
    workers: list[scheduler.WorkerView],
    matches: scheduler.Matches | None = None,
    sharing: fairshare.Snapshot | None = None,
) -> scheduler.Plan:
    """The plan that scheduler.plan would make for the whole queue in fair order, reading
    only what it needs. `needs_of` gives the needs of each shape in `groups`. `matches`,
    kept by the caller from one round to the next, saves matching every shape against every
    worker again."""
    sharing = sharing or fairshare.Snapshot()
    by_shape: dict[str, list[QueueGroup]] = {}
    for group in groups:
        by_shape.setdefault(group.shape, []).append(group)
    found = (matches or scheduler.Matches()).find(
        {shape: needs_of[shape] for shape in by_shape}, workers
    )
    # Only workers with a free slot or GPU count in a window (see _window): on a busy fleet,
    # a few of many.
    open_workers = [w for w in workers if w.slots > 0 or w.free]
    queue: list[models.Job] = []
    shape_reasons: dict[str, str] = {}
    group_reasons: dict[tuple[str, int, str | None], str] = {}
    unread: dict[str, list[models.Job]] = {}  # shape → its jobs read, when it has more
    for shape, shape_groups in by_shape.items():
        match = found[shape]
        if isinstance(match, str):
            shape_reasons[shape] = match
            continue
        needs = needs_of[shape]
        if len(match) == len(workers):
            count = _window(needs, open_workers)
        else:
            wanted = set(match)
            count = _window(needs, [w for w in open_workers if w.name in wanted])
        jobs = _read_fair(shape, needs, shape_groups, count, read, sharing, group_reasons)
        queue.extend(jobs)
        if len(jobs) == count:
            unread[shape] = jobs
    queue.sort(key=sharing.key)
    result = scheduler.plan(queue, workers, sharing, found)
    for shape, jobs in unread.items():
        # Those not read wait as the last one read that its caps did not hold back would.
        last = next((job for job in reversed(jobs) if job.id not in result.capped), None)
        if last is not None:
            shape_reasons[shape] = result.reasons[last.id]  # always there, as _window says
    result.shape_reasons = shape_reasons
    result.group_reasons = group_reasons
    return result


def _read_fair(
    shape: str,
    needs: models.Needs,
    groups: list[QueueGroup],
    count: int,
    read: Read,
    sharing: fairshare.Snapshot,
    group_reasons: dict[tuple[str, int, str | None], str],
) -> list[models.Job]:
    """The first `count` jobs of a shape in fair order, less those its caps hold back."""
    jobs: list[models.Job] = []
    per_priority = Counter(group.priority for group in groups)

    def order(group: QueueGroup) -> tuple[int, float]:
        return sharing.order(group.priority, group.submitter)

    for _, tied_groups in itertools.groupby(sorted(groups, key=order), key=order):
        if count <= 0:
            break
        tied = list(tied_groups)
        priority = tied[0].priority
        room: dict[str | None, int | None] = {}
        for group in tied:
            room[group.submitter] = left = _room(sharing, group.submitter, needs.gpus)
            if left is not None and left < group.jobs:
                key = (shape, priority, group.submitter)
                group_reasons[key] = _cap_reason(sharing, group.submitter, needs.gpus, left)
        able = [group for group in tied if room[group.submitter] != 0]
        if not able:
            continue
        if all(_most(room[g.submitter], count) == count for g in able):
            # One read, by id: of every submitter at this priority when none is left out.
            names = None if len(able) == per_priority[priority] else [g.submitter for g in able]
            got = read(shape, priority, names, count)
        else:
            each = [
                read(shape, priority, [g.submitter], _most(room[g.submitter], count)) for g in able
            ]
            got = sorted(itertools.chain(*each), key=lambda job: job.id)[:count]
        jobs += got
        count -= len(got)
    return jobs


def _most(room: int | None, count: int) -> int:
    return count if room is None else min(room, count)


def _room(sharing: fairshare.Snapshot, submitter: str | None, gpus: int) -> int | None:
    """How many more jobs of `gpus` GPUs the submitter's caps let start (None: no limit)."""
    caps = sharing.caps_of(submitter)
    if not caps:
        return None
    return fairshare.allowance(caps, sharing.held.get(submitter, fairshare.Held()), gpus)


def _cap_reason(sharing: fairshare.Snapshot, submitter: str | None, gpus: int, left: int) -> str:
    """Why the jobs of a submitter past the `left` that its caps still let start wait."""
    held = sharing.held.get(submitter, fairshare.Held())
    then = fairshare.Held(held.jobs + left, held.gpus + left * gpus)
    over = fairshare.over_cap(sharing.caps_of(submitter), then, gpus)
    return f"held back by the caps of its token {submitter!r}, which {over}"


def _window(needs: models.Needs, able: list[scheduler.WorkerView]) -> int:
    """How many of the first queued jobs of a shape a round must plan, given the workers
    that can ever run it (those with a free slot or GPU: the others count for nothing).

    Through a round, free GPUs, slots and open workers only get fewer, so once a job of
    the shape cannot start, none behind it can. Of those behind, each can at most reserve a
    worker that no job holds yet and that has a GPU free, and only when it needs GPUs. So no
    more jobs of the shape can start or reserve than the free slots and those workers, and
    the one after them (and every one behind it) waits for the same reason and changes
    nothing. On a busy fleet that is a few jobs, however many workers it has.

    A worker can start no more jobs of the shape than it has free slots, nor, when they need
    GPUs, than its free GPUs hold."""
    if not needs.gpus:
        return sum(max(0, w.slots) for w in able) + 1
    starts = sum(min(max(0, w.slots), len(w.free) // needs.gpus) for w in able)
    holdable = sum(1 for w in able if w.free)
    return starts + holdable + 1
