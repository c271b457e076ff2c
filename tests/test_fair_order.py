"""Fair share's parts one at a time: each submitter's use as the tracker keeps it from a real
store (both backends), the order and the caps as the scheduler applies them, the reads that
plan the whole queue from a few jobs, and a queued job's place. The whole thing, with
workers, is in test_fairshare.py."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpubox import models, validate
from gpubox.coordinator import fairshare, planner, scheduler
from gpubox.coordinator.fairshare import Held, Snapshot
from gpubox.store import base
from tests.test_scheduler import make_gpus, make_worker, placed, plan_queue, random_case

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
HOUR = 3600.0


def spec(submitter: str | None, gpus: int = 1, **fields: Any) -> models.JobSpec:
    parsed = validate.parse_spec({"name": "j", "docker": {"image": "i"}, "gpus": gpus, **fields})
    return dataclasses.replace(parsed, submitter=submitter)


def job(job_id: int, submitter: str | None, gpus: int = 1, **fields: Any) -> models.Job:
    return models.Job(
        id=job_id,
        spec=spec(submitter, gpus, **fields),
        status=models.Status.QUEUED,
        created_at=T0,
        updated_at=T0,
    )


def ran(
    store: base.Store, submitter: str | None, gpus: int, start: datetime, end: datetime | None
) -> int:
    """A job of `submitter` that started at `start` and ended at `end` (None: still runs)."""
    made = store.create_job(spec(submitter, gpus), start)
    claimed = store.claim_job(made.id, "w", [f"g{made.id}-{i}" for i in range(gpus)], start)
    assert claimed is not None
    assert store.mark_started(made.id, 1, start)
    if end is not None:
        finish = store.finish_job(made.id, 1, models.Status.FINISHED, 0, None, start, end, 0)
        assert finish is base.Finish.APPLIED
    return made.id


class Clock:
    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


# --- each submitter's use, from the store ------------------------------------------------------


def test_use_is_gpu_seconds_halved_per_half_life_since_the_job_ended(store: base.Store) -> None:
    now = T0 + timedelta(days=2)
    ran(store, "a", 2, now - timedelta(hours=3), now - timedelta(hours=2))  # 2 GPU-h, 2 h ago
    ran(store, "b", 0, now - timedelta(seconds=1000), now)  # no GPU: a tenth of one
    ran(store, "c", 1, now - timedelta(seconds=500), None)  # still running: so far, undecayed
    ran(store, "old", 8, now - timedelta(days=30), now - timedelta(days=29))  # past the horizon
    tracker = fairshare.Tracker(store, half_life_s=2 * HOUR, clock=Clock(now))
    use = tracker.refresh(read=True).use
    assert use["a"] == pytest.approx(2 * HOUR * 0.5)
    assert use["b"] == pytest.approx(0.1 * 1000)
    assert use["c"] == pytest.approx(500)
    assert "old" not in use
    assert tracker.snapshot.held == {"c": Held(jobs=1, gpus=1)}


def test_a_job_that_ends_moves_from_running_to_ended_and_then_decays(store: base.Store) -> None:
    clock = Clock(T0)
    tracker = fairshare.Tracker(store, half_life_s=HOUR, clock=clock)
    job_id = ran(store, "a", 4, T0, None)
    assert tracker.refresh(read=True).use == {"a": 0.0}
    clock.now += 900
    assert tracker.refresh(read=True).use["a"] == pytest.approx(4 * 900)
    end = T0 + timedelta(seconds=900)
    store.finish_job(job_id, 1, models.Status.FINISHED, 0, None, T0, end, 0)
    assert tracker.refresh(read=True).use["a"] == pytest.approx(4 * 900)  # read once, as it ends
    assert tracker.snapshot.held == {}
    clock.now += HOUR
    assert tracker.refresh(read=True).use["a"] == pytest.approx(4 * 900 / 2)
    assert not tracker.snapshot.requeued


def test_a_job_queued_again_counts_nothing_and_says_the_queue_changed(store: base.Store) -> None:
    tracker = fairshare.Tracker(store, half_life_s=HOUR, clock=Clock(T0))
    made = store.create_job(spec("a"), T0)
    claimed = store.claim_job(made.id, "w", ["g"], T0)
    assert claimed is not None
    tracker.claimed([claimed])
    assert store.unclaim_job(made.id, 1, T0)
    snapshot = tracker.refresh(read=True)
    assert snapshot.requeued and snapshot.use == {} and snapshot.held == {}
    assert not tracker.refresh(read=True).requeued


def claimed_at_t0(store: base.Store, clock: Clock) -> tuple[fairshare.Tracker, models.Job]:
    """A tracker that has read the store once, and a 2-GPU job of "a" it saw claimed at T0."""
    tracker = fairshare.Tracker(store, half_life_s=HOUR, clock=clock)
    tracker.refresh(read=True)
    made = store.create_job(spec("a", 2), T0)
    claimed = store.claim_job(made.id, "w", ["g0", "g1"], T0)
    assert claimed is not None
    tracker.claimed([claimed])
    return tracker, made


def test_between_reads_what_the_broker_claims_and_sees_end_is_counted_at_once(
    store: base.Store,
) -> None:
    clock = Clock(T0)
    tracker, made = claimed_at_t0(store, clock)
    assert tracker.refresh().held == {"a": Held(1, 2)}  # no read: from the claim
    store.mark_started(made.id, 1, T0)
    other = ran(store, "b", 1, T0, None)
    tracker.refresh(read=True)
    clock.now += 0.5  # within READ_EVERY_S: the next refreshes read nothing
    end = T0 + timedelta(seconds=0.5)
    for job_id in (made.id, other):
        store.finish_job(job_id, 1, models.Status.FINISHED, 0, None, T0, end, 0)
    tracker.ended(made.id)  # the broker saw its DONE; b's ended another way
    snapshot = tracker.refresh()
    assert snapshot.held == {"b": Held(1, 1)}  # held until the next read: the safe side
    assert snapshot.use == {"a": pytest.approx(2 * 0.5), "b": pytest.approx(0.5)}
    assert tracker.refresh(read=True).held == {}


def test_a_start_the_broker_saw_counts_use_from_then_without_a_read(store: base.Store) -> None:
    clock = Clock(T0)
    tracker, made = claimed_at_t0(store, clock)
    started = T0 + timedelta(seconds=10)
    store.mark_started(made.id, 1, started)
    tracker.started(made.id, started)
    clock.now = (started + timedelta(seconds=30)).timestamp()
    assert tracker.refresh().use == {"a": pytest.approx(2 * 30)}  # no read: from its STARTED
    assert tracker.refresh(read=True).use == {"a": pytest.approx(2 * 30)}  # a read agrees
    tracker.ended(made.id)
    assert tracker.refresh().use == {"a": pytest.approx(2 * 30)} and tracker.snapshot.held == {}


def test_a_job_claimed_and_ended_between_two_reads_still_counts(store: base.Store) -> None:
    clock = Clock(T0)
    tracker = fairshare.Tracker(store, half_life_s=HOUR, clock=clock)
    tracker.refresh(read=True)
    made = store.create_job(spec("a", 1), T0)
    claimed = store.claim_job(made.id, "w", ["g0"], T0)
    assert claimed is not None
    tracker.claimed([claimed])
    end = T0 + timedelta(seconds=0.4)
    store.mark_started(made.id, 1, T0)
    store.finish_job(made.id, 1, models.Status.FINISHED, 0, None, T0, end, 0)
    clock.now += 0.5
    tracker.ended(made.id)  # the tracker never saw it start
    assert tracker.refresh().use == {}
    assert tracker.refresh(read=True).use["a"] == pytest.approx(0.4 * 2 ** (-0.1 / HOUR))


def test_a_half_life_of_zero_counts_no_use_but_still_what_each_holds(store: base.Store) -> None:
    ran(store, "a", 2, T0 - timedelta(hours=1), T0)
    ran(store, "b", 3, T0, None)
    snapshot = fairshare.Tracker(store, half_life_s=0, clock=Clock(T0)).refresh()
    assert snapshot.use == {} and snapshot.held == {"b": Held(1, 3)}


def test_the_tokens_caps_reach_the_snapshot(store: base.Store) -> None:
    caps = models.Caps(max_gpus=8, max_queued=500)
    store.add_token(models.Token("ci", "d" * 64, "submit", T0, caps=caps))
    store.add_token(models.Token("free", "e" * 64, "submit", T0))
    assert fairshare.Tracker(store, HOUR, Clock(T0)).refresh(read=True).caps == {"ci": caps}
    changed = store.set_caps("ci", {"max_gpus": None, "max_running": 3})
    assert changed.caps == models.Caps(max_running=3, max_queued=500)


def test_the_store_keeps_max_queued_in_the_inserts_transaction(store: base.Store) -> None:
    store.add_token(models.Token("ci", "d" * 64, "submit", T0, caps=models.Caps(max_queued=2)))
    store.create_job(spec("ci"), T0, max_queued=2)
    store.create_job_once(spec("ci"), T0, "ci", "key-1", "digest", max_queued=2)
    with pytest.raises(Exception, match="has 2 jobs queued, its max_queued cap") as refused:
        store.create_job(spec("ci"), T0, max_queued=2)
    assert getattr(refused.value, "field", None) == "max_queued"
    again, made = store.create_job_once(spec("ci"), T0, "ci", "key-1", "digest", max_queued=2)
    assert not made  # a replay is not a new job: no cap refuses it
    assert store.create_job(spec("other"), T0, max_queued=2).id  # others' jobs do not count


def test_the_queue_is_read_by_group(store: base.Store) -> None:
    ids = [
        store.create_job(spec(who, priority=p), T0).id
        for who, p in [("a", 0), ("b", 0), ("a", 0), (None, 0), ("a", 1)]
    ]
    shape = spec("a").needs.shape
    groups = {(g.priority, g.submitter): (g.jobs, g.first) for g in store.queue_groups()}
    assert groups == {
        (0, "a"): (2, ids[0]),
        (0, "b"): (1, ids[1]),
        (0, None): (1, ids[3]),
        (1, "a"): (1, ids[4]),
    }
    of = [job.id for job in store.queued_of(shape, 0, ["b", None], 10)]
    assert of == [ids[1], ids[3]]
    assert [job.id for job in store.queued_of(shape, 0, None, 2)] == ids[:2]
    assert store.queued_before(0, ids[3]) == {"a": 2, "b": 1}
    assert store.last_job_id() == ids[-1]
    assert store.running_workers() == set()
    for index, worker in enumerate(["w1", "w2", "w1"]):
        assert store.claim_job(ids[index], worker, [], T0) is not None
    assert store.running_workers() == {"w1", "w2"}


def test_the_dashboards_queue_lists_the_jobs_in_the_order_they_will_start(
    store: base.Store,
) -> None:
    ran(store, "heavy", 4, T0 - timedelta(hours=2), T0 - timedelta(hours=1))
    ids = {
        (who, p): store.create_job(spec(who, gpus, priority=p), T0).id
        for who, gpus, p in [("heavy", 1, 0), ("light", 2, 0), ("heavy", 0, 1), (None, 1, 0)]
    }
    plans = planner.Planner(store, HOUR)
    plans.tracker.clock = Clock(T0)
    plans.plan([])
    order = [job.id for job in plans.queue_in_order(10)]
    # priority first; then no use (light, and the job with no submitter: by id); then heavy
    assert order == [ids["heavy", 1], ids["light", 0], ids[None, 0], ids["heavy", 0]]
    assert [job.id for job in plans.queue_in_order(2)] == order[:2]


def two_jobs_on_one_gpu(store: base.Store) -> tuple[planner.Planner, int, int]:
    """A planner over two queued 1-GPU jobs, and their ids."""
    first, second = (store.create_job(spec("a"), T0) for _ in range(2))
    return planner.Planner(store, HOUR), first.id, second.id


def planned(plans: planner.Planner) -> list[int]:
    """The ids of the jobs a round starts on one worker with one free GPU."""
    return [a.job.id for a in plans.plan([make_worker("w1", count=1)]).assignments]


def test_a_job_queued_again_is_planned_at_the_next_round_not_at_the_next_listing(
    store: base.Store,
) -> None:
    # The listing of the queue's groups is a net every GROUPS_EVERY_S; a job the broker
    # queues again (its worker was lost) says so itself, and the next round plans it.
    plans, first, second = two_jobs_on_one_gpu(store)
    assert planned(plans) == [first]
    claimed = store.claim_job(first, "w1", ["w1-0"], T0)
    assert claimed is not None
    plans.claimed([claimed])
    assert planned(plans) == [second]
    assert store.unclaim_job(first, 1, T0)  # its worker never confirmed it
    plans.requeued(first)
    assert planned(plans) == [first]
    assert plans.sharing.held == {}


def test_a_claimed_job_leaves_every_read_that_gave_it_and_an_emptied_read_stays_empty() -> None:
    reads = planner.Reads()
    a1, a2, b1 = job(1, "a"), job(2, "a"), job(3, "b")
    shape = a1.spec.needs.shape
    everyone, only_a = (shape, 0, None), (shape, 0, ("a",))
    reads.put(everyone, [a1, a2, b1], whole=True)
    reads.put(only_a, [a1, a2], whole=True)
    assert reads.get(everyone, 2) == [a1, a2] and reads.known[3] is b1
    reads.drop([1])
    assert reads.get(everyone, 5) == [a2, b1]
    assert reads.get(only_a, 5) == [a2]
    reads.drop([2])
    assert reads.get(only_a, 5) == []  # all it had, all claimed: no store read needed
    assert reads.get((shape, 1, None), 1) is None  # never read: the store must be
    reads.put((shape, 1, None), [], whole=False)
    assert reads.get((shape, 1, None), 1) is None  # part of a group, used up: read more
    assert planner.Reads(reads.by_id).known[3] is b1  # kept across a listing, for the store


def test_a_job_cancelled_after_it_was_read_is_planned_once_then_dropped(
    store: base.Store,
) -> None:
    plans, first, second = two_jobs_on_one_gpu(store)
    assert planned(plans) == [first]
    assert store.cancel_job(first, T0) is not None  # between the read and the claim
    assert store.claim_job(first, "w1", ["w1-0"], T0) is None
    plans.claimed([], [first])
    assert planned(plans) == [second]


# --- the order and the caps in a plan ------------------------------------------------------------


def sharing(use: dict[str | None, float] | None = None, **more: Any) -> Snapshot:
    return Snapshot(at=0.0, half_life_s=HOUR, use=use or {}, **more)


def test_within_a_priority_the_least_used_submitter_goes_first_then_submission() -> None:
    queue = [job(1, "a"), job(2, "a"), job(3, "b"), job(4, "c"), job(5, "b")]
    use = sharing({"a": 10 * HOUR, "b": HOUR, "c": HOUR})
    ordered = sorted(queue, key=use.key)
    assert [j.id for j in ordered] == [3, 4, 5, 1, 2]  # b and c tie: by id
    result = scheduler.plan(ordered, [make_worker("w1", count=2)], use)
    assert [a.job.id for a in result.assignments] == [3, 4]


def test_a_higher_priority_goes_first_whatever_its_submitter_used() -> None:
    use = sharing({"a": 100 * HOUR})
    queue = sorted([job(1, "b"), job(2, "a", priority=1)], key=use.key)
    assert [j.id for j in queue] == [2, 1]


def test_caps_hold_within_a_round_and_a_held_back_job_holds_no_worker() -> None:
    caps = {"a": models.Caps(max_gpus=3), "b": models.Caps(max_running=1)}
    use = sharing(held={"a": Held(1, 1)}, caps=caps)
    queue = [job(1, "a", 2), job(2, "a", 1), job(3, "b", 1), job(4, "b", 1), job(5, "c", 4)]
    worker = make_worker("w1", count=8, free=6)
    result = scheduler.plan(queue, [worker], use)
    assert placed(result) == [(1, "w1", ["w1-0", "w1-1"]), (3, "w1", ["w1-2"])]
    assert result.capped == {2, 4}
    assert (
        result.reasons[2]
        == "held back by the caps of its token 'a', which holds 3 GPUs of its max_gpus 3"
    )
    assert (
        result.reasons[4]
        == "held back by the caps of its token 'b', which runs 1 job of its max_running 1"
    )
    # job 5 needs 4 of the 3 left: it, not a capped job, holds the worker
    assert result.reserved == {"w1": 5}


def test_a_job_without_gpus_passes_max_gpus_but_not_max_running() -> None:
    use = sharing(held={"a": Held(2, 2)}, caps={"a": models.Caps(max_gpus=2, max_running=3)})
    result = scheduler.plan([job(1, "a", 0), job(2, "a", 0)], [make_worker("w1", free=0)], use)
    assert [a.job.id for a in result.assignments] == [1]
    assert result.capped == {2}


# --- reading the queue by group plans it as the whole queue would -------------------------------


def test_the_reads_by_group_plan_the_whole_queue_in_fair_order() -> None:
    rng = random.Random(24)
    for case in range(400):
        queue, workers = random_case(rng)
        submitters = ["a", "b", "c", None][: rng.randint(1, 4)]
        queue = [
            dataclasses.replace(
                j, spec=dataclasses.replace(j.spec, submitter=rng.choice(submitters))
            )
            for j in queue
        ]
        use = sharing({s: rng.choice([0.0, HOUR, 2 * HOUR]) for s in submitters})
        whole = scheduler.plan(sorted(queue, key=use.key), workers, use)
        result = plan_queue(queue, workers, sharing=use)
        assert placed(result) == placed(whole), case
        assert result.reserved == whole.reserved, case
        for j in queue:
            if j.id in result.reasons:
                assert result.reasons[j.id] == whole.reasons[j.id], case
            elif j.id in whole.reasons:
                assert result.shape_reasons[j.spec.needs.shape] == whole.reasons[j.id], case


def test_a_capped_submitters_jobs_are_not_read_past_what_its_caps_let_start() -> None:
    use = sharing(held={"a": Held(3, 3)}, caps={"a": models.Caps(max_gpus=4)})
    queue = [job(i, "a") for i in range(1, 201)] + [job(201, "b")]
    reads: list[tuple[str, int]] = []
    worker = make_worker("w1", gpus=make_gpus("w1", 8), free=4, slots=4)
    result = plan_queue(queue, [worker], reads, sharing=use)
    assert placed(result) == [(1, "w1", ["w1-0"]), (201, "w1", ["w1-1"])]
    assert sum(count for _, count in reads) <= 1 + 6  # a: what its cap lets start; b: the rest
    shape = queue[0].spec.needs.shape
    assert result.group_reasons[(shape, 0, "a")].startswith(
        "held back by the caps of its token 'a'"
    )


# --- a queued job's place ---------------------------------------------------------------------


def test_a_place_counts_the_jobs_ahead_by_submitter_with_their_use() -> None:
    groups = [
        base.QueueGroup("s1", 0, "ci", 3, 1, 3),
        base.QueueGroup("s2", 0, "ci", 2, 4, 5),
        base.QueueGroup("s1", 1, "bob", 1, 9, 9),  # a higher priority: ahead of anything
        base.QueueGroup("s1", 0, "me", 5, 6, 15),  # two of them after job 12
        base.QueueGroup("s1", 0, "tie", 4, 2, 14),
    ]
    use = sharing({"ci": 41 * HOUR, "me": 2 * HOUR, "tie": 2 * HOUR, "bob": 90 * HOUR})
    mine = dataclasses.replace(job(12, "me"), spec=spec("me"))
    where = fairshare.place(mine, groups, lambda: {"me": 2, "tie": 1, "ci": 5}, use)
    assert where["place"] == 1 + 1 + 2 + 1  # bob's, me's two earlier, tie's one earlier
    assert where["ahead"] == [
        {"submitter": "me", "jobs": 2, "use_gpu_hours": 2.0},
        {"submitter": "bob", "jobs": 1, "use_gpu_hours": 90.0},
        {"submitter": "tie", "jobs": 1, "use_gpu_hours": 2.0},
    ]
    assert where["use_gpu_hours"] == 2.0
    # ci used more: its 5 jobs are behind, though submitted earlier


def test_the_place_of_the_last_queued_job_is_counted_from_the_groups_alone() -> None:
    """A submit's answer: no tied group holds a later job, so every job of a tied group is
    ahead (but the job itself), and the count of the queue by id is not read."""
    groups = [
        base.QueueGroup("s1", 0, "ci", 3, 1, 3),
        base.QueueGroup("s1", 1, "bob", 1, 9, 9),
        base.QueueGroup("s1", 0, "me", 5, 6, 12),  # job 12 itself, the last
        base.QueueGroup("s2", 0, "me", 2, 7, 8),
        base.QueueGroup("s1", 0, "tie", 4, 2, 11),
    ]
    use = sharing({"ci": 41 * HOUR, "me": 2 * HOUR, "tie": 2 * HOUR, "bob": 90 * HOUR})
    mine = dataclasses.replace(job(12, "me"), spec=spec("me"))

    def unread() -> dict[str | None, int]:
        raise AssertionError("the queue was counted by id")

    where = fairshare.place(mine, groups, unread, use)
    assert where["place"] == 1 + 1 + (4 + 2) + 4  # bob's, me's six others, tie's four
    assert [(a["submitter"], a["jobs"]) for a in where["ahead"]] == [
        ("me", 6),
        ("tie", 4),
        ("bob", 1),
    ]
