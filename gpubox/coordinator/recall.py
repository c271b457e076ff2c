"""Which prefetched jobs to recall so that priority order holds with prefetch: a job a
worker holds (sent beyond its free slots, not started) goes back to the queue while a
queued job of higher priority waits that this worker could run. Pure: the broker lists
what is held and what waits, and sends the RECALLs this chooses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from gpubox import models
from gpubox.coordinator import scheduler

# A held job as Peer.held() gives it: (job id, (priority, attempt)), lowest priority last.
Held = tuple[int, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Recall:
    worker: str
    job_id: int
    attempt: int
    for_priority: int  # the priority of the queued job it makes way for


def lowest(held: Mapping[str, Sequence[Held]]) -> int | None:
    """The lowest priority of the held jobs (None: none is held)."""
    return min((priority for jobs in held.values() for _, (priority, _) in jobs), default=None)


def choose(
    held: Mapping[str, Sequence[Held]],
    waiting: Mapping[tuple[int, str], int],
    views: Sequence[scheduler.WorkerView],
) -> list[Recall]:
    """The held jobs to recall, one for each queued job that outranks it and could run
    on its worker: `waiting` counts the queued jobs by (priority, shape). Each worker's
    lowest held jobs go first; the queued job of highest priority is served first."""
    left = dict(waiting)
    needs = {shape: models.Needs.from_shape(shape) for _, shape in waiting}
    recalls = []
    for view in views:
        for job_id, (priority, attempt) in reversed(held.get(view.name, [])):
            wanted = [
                key
                for key, count in left.items()
                if count and key[0] > priority and view.can_ever_run(needs[key[1]])
            ]
            if not wanted:
                break  # the rest of its held jobs rank higher still
            first = max(wanted)
            left[first] -= 1
            recalls.append(Recall(view.name, job_id, attempt, first[0]))
    return recalls
