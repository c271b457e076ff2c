"""coordinator.recall: which held (prefetched) jobs go back to the queue so that a queued job
of higher priority gets their place."""

from __future__ import annotations

from gpubox import models
from gpubox.coordinator import recall, scheduler


def view(name: str, gpus: int = 0) -> scheduler.WorkerView:
    cards = [
        {"uuid": f"{name}-{i}", "name": "A100", "memory_mb": 81920, "index": i} for i in range(gpus)
    ]
    return scheduler.WorkerView(name, cards, [], 0)


def shape(gpus: int) -> str:
    return models.Needs(gpus=gpus).shape


def test_one_held_job_per_queued_job_that_outranks_it_the_lowest_first() -> None:
    held = {"a": [(1, (2, 1)), (2, (0, 1)), (3, (0, 1))], "b": [(4, (0, 1))]}
    chosen = recall.choose(held, {(5, shape(0)): 2}, [view("a"), view("b")])
    # Two queued jobs: a's two held jobs of priority 0 go, the last sent first; b's stays.
    assert [(c.worker, c.job_id, c.for_priority) for c in chosen] == [("a", 3, 5), ("a", 2, 5)]
    assert recall.lowest(held) == 0 and recall.lowest({}) is None


def test_no_recall_for_a_job_that_does_not_outrank_or_could_never_run_there() -> None:
    held = {"a": [(1, (3, 2))], "b": [(2, (3, 1))]}
    waiting = {(3, shape(0)): 1, (9, shape(4)): 1}  # a tie, and one that needs 4 GPUs
    assert recall.choose(held, waiting, [view("a"), view("b", gpus=2)]) == []
    # A worker with 4 GPUs could run the second: its held job goes.
    (chosen,) = recall.choose(held, waiting, [view("a"), view("b", gpus=4)])
    assert (chosen.worker, chosen.job_id, chosen.attempt, chosen.for_priority) == ("b", 2, 1, 9)
