"""The store contract suite: every test speaks only base.Store, so each runs on every backend."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpubox import errors, models, validate
from gpubox.store import base, open_store, tokens

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
Status = models.Status
Finish = base.Finish
SEALED = "gAAAAA-opaque-sealed-credentials"  # what the coordinator seals; the store keeps it as is


def at(seconds: float) -> datetime:
    """A time `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def make_spec(sealed: str | None = None, **overrides: Any) -> models.JobSpec:
    """A valid JobSpec; keyword arguments replace top-level submission fields; `sealed` stands
    for the sealed credentials the coordinator would add."""
    spec = validate.parse_spec({"name": "job", "docker": {"image": "busybox"}, **overrides})
    return dataclasses.replace(spec, sealed=sealed)


def queued(store: base.Store, now: datetime = T0, **overrides: Any) -> models.Job:
    """A new QUEUED job."""
    return store.create_job(make_spec(**overrides), now)


def running(
    store: base.Store, worker: str = "w1", gpus: tuple[str, ...] = (), **overrides: Any
) -> models.Job:
    """A new job claimed by `worker` with these GPUs."""
    job = queued(store, **overrides)
    claimed = store.claim_job(job.id, worker, list(gpus), at(1))
    assert claimed is not None and claimed.id == job.id
    return claimed


def finish(
    store: base.Store,
    job: models.Job,
    status: Status = Status.FINISHED,
    attempt: int | None = None,
    last_seq: int = 0,
    exit_code: int | None = 0,
    error: str | None = None,
) -> Finish:
    """finish_job with defaults for the fields a test does not care about."""
    return store.finish_job(
        job.id,
        job.attempts if attempt is None else attempt,
        status,
        exit_code,
        error,
        at(2),
        at(3),
        last_seq,
    )


def raw(first: int, count: int, tag: str = "") -> list[base.RawLine]:
    """`count` raw log lines whose text names their seq, starting at `first`."""
    return [
        (
            f"2024-05-01T12:00:00.{seq:06d}Z",
            "stderr" if seq % 3 == 0 else "stdout",
            f"line {seq}{tag}",
        )
        for seq in range(first, first + count)
    ]


def seqs(lines: list[models.LogLine]) -> list[int]:
    return [line.seq for line in lines]


# --- create / get ---------------------------------------------------------------------------


def test_create_returns_queued_job_with_increasing_ids(store: base.Store) -> None:
    ids = [queued(store, now=at(i)).id for i in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    job = store.get_job(ids[0])
    assert job.status is Status.QUEUED
    assert job.worker is None
    assert job.attempts == 0
    assert job.gpu_ids == []
    assert job.log_seq == 0
    assert job.cancel_requested is False
    assert job.executed_at is None and job.finished_at is None
    assert job.exit_code is None and job.error is None


def test_create_round_trips_every_spec_field(store: base.Store) -> None:
    spec = make_spec(
        name="train-ü",
        description="a long\nstory",
        priority=-7,
        docker={
            "image": "registry.example.com/train:1",
            "command": ["python", "-c", "print('hi there')"],
            "env": {"A": "1", "PATH_X": "ü/x y"},
        },
        gpus=3,
        labels={"zone": "eu", "tier": "a100"},
        timeout=1.5,
        max_retries=4,
        metadata={"nested": {"list": [1, 2.5, None, True, "ü"]}, "n": 0},
        sealed=SEALED,
    )
    spec = dataclasses.replace(spec, submitter="ci-ü", allow_process=True)
    created = store.create_job(spec, T0)
    fetched = store.get_job(created.id)
    for job in (created, fetched):
        assert job.spec == spec
        assert job.spec.sealed == SEALED
        assert job.spec.metadata == {"nested": {"list": [1, 2.5, None, True, "ü"]}, "n": 0}
        assert job.spec.command == ["python", "-c", "print('hi there')"]
        assert job.created_at == T0
        assert job.updated_at == T0
    assert created == fetched


def test_create_returns_the_job_exactly_as_stored(store: base.Store) -> None:
    # Whole numbers where the store keeps reals, and the write-only fields, which are never
    # stored: the job create_job returns is the one get_job reads, to the JSON it shows.
    spec = make_spec(timeout=60, gpus=1, gpu_memory_gb=16, docker={"image": "x", "shm_size": 2**30})
    spec = dataclasses.replace(spec, auth={"username": "u", "password": "p"}, secrets={"K": "v"})
    created = store.create_job(spec, T0)
    fetched = store.get_job(created.id)
    assert created == fetched
    assert json.dumps(created.to_dict()) == json.dumps(fetched.to_dict())
    assert created.spec.auth is None and created.spec.secrets == {}


def test_create_round_trips_defaults(store: base.Store) -> None:
    job = store.get_job(queued(store).id)
    assert job.spec == make_spec()
    assert job.spec.command is None
    assert job.spec.sealed is None
    assert job.spec.env == {} and job.spec.labels == {} and job.spec.metadata == {}
    assert job.spec.timeout is None


@pytest.mark.parametrize("end", ["finish", "cancel", "release"])
def test_sealed_credentials_are_erased_at_a_terminal_status(store: base.Store, end: str) -> None:
    if end == "cancel":
        job = queued(store, sealed=SEALED)
        assert store.get_job(job.id).spec.sealed == SEALED
        store.cancel_job(job.id, at(1))
    else:
        job = running(store, sealed=SEALED)
        assert store.get_job(job.id).spec.sealed == SEALED
        if end == "finish":
            assert finish(store, job) is Finish.APPLIED
        else:
            store.release_job(job.id, job.attempts, "worker lost", at(5))
    final = store.get_job(job.id)
    assert final.status.terminal
    assert final.spec.sealed is None
    assert final.spec.image == "busybox"


def test_sealed_credentials_are_kept_while_requeued(store: base.Store) -> None:
    job = running(store, sealed=SEALED, max_retries=1)
    requeued = store.release_job(job.id, 1, "worker lost", at(5))
    assert requeued is not None and requeued.status is Status.QUEUED
    assert store.get_job(job.id).spec.sealed == SEALED


def test_get_unknown_job_raises_job_not_found(store: base.Store) -> None:
    with pytest.raises(errors.JobNotFound) as caught:
        store.get_job(12345)
    assert caught.value.job_id == 12345
    known = queued(store)
    with pytest.raises(errors.JobNotFound):
        store.get_job(known.id + 1)


# --- list_jobs ------------------------------------------------------------------------------


def test_list_jobs_newest_first(store: base.Store) -> None:
    ids = [queued(store, name=f"j{i}").id for i in range(4)]
    listed = store.list_jobs()
    assert [job.id for job in listed] == ids[::-1]
    assert [job.spec.name for job in listed] == ["j3", "j2", "j1", "j0"]


def test_list_jobs_empty_store(store: base.Store) -> None:
    assert store.list_jobs() == []
    assert store.list_jobs(status=Status.RUNNING) == []


def test_list_jobs_filters_by_status(store: base.Store) -> None:
    first = running(store)
    cancelled = queued(store)
    store.cancel_job(cancelled.id, at(1))
    waiting = [queued(store).id, queued(store).id]
    assert [job.id for job in store.list_jobs(status=Status.QUEUED)] == waiting[::-1]
    assert [job.id for job in store.list_jobs(status=Status.RUNNING)] == [first.id]
    assert [job.id for job in store.list_jobs(status=Status.CANCELLED)] == [cancelled.id]
    assert store.list_jobs(status=Status.FINISHED) == []
    assert all(job.status is Status.QUEUED for job in store.list_jobs(status=Status.QUEUED))


def test_list_jobs_limit(store: base.Store) -> None:
    ids = [queued(store).id for _ in range(7)]
    assert [job.id for job in store.list_jobs(limit=3)] == ids[::-1][:3]
    assert [job.id for job in store.list_jobs(limit=1)] == [ids[-1]]
    assert len(store.list_jobs(limit=100)) == 7
    assert len(store.list_jobs()) == 7


def test_list_jobs_pages_with_before(store: base.Store) -> None:
    ids = [queued(store).id for _ in range(25)]
    pages: list[list[int]] = []
    before: int | None = None
    for _ in range(10):  # bounded: a `before` that repeats a page must fail, not hang
        page = [job.id for job in store.list_jobs(limit=10, before=before)]
        if not page:
            break
        pages.append(page)
        before = page[-1]
    assert [len(page) for page in pages] == [10, 10, 5]
    flat = [job_id for page in pages for job_id in page]
    assert flat == ids[::-1]  # newest first, no overlap, no gap


def test_list_jobs_before_combines_with_status(store: base.Store) -> None:
    ids = [queued(store).id for _ in range(6)]
    for job_id in ids[::2]:
        store.cancel_job(job_id, at(1))
    listed = store.list_jobs(status=Status.QUEUED, before=ids[5])
    assert [job.id for job in listed] == [ids[3], ids[1]]


# --- queued_jobs / claim_job ---------------------------------------------------------------


def claim_next(store: base.Store, worker: str, gpus: list[str], now: datetime) -> models.Job | None:
    """Claim the head of the queue with its first GPUs from `gpus`, or None when empty or
    another claimer was first (as the broker does with the scheduler's plan)."""
    head = store.queued_jobs(1)
    if not head:
        return None
    return store.claim_job(head[0].id, worker, gpus[: head[0].spec.gpus], now)


def test_claim_marks_job_running_for_worker_with_exactly_its_gpus(store: base.Store) -> None:
    job = queued(store, gpus=2)
    claimed = store.claim_job(job.id, "w1", ["GPU-x", "GPU-y"], at(7))
    assert claimed is not None
    assert claimed.id == job.id
    assert claimed.status is Status.RUNNING
    assert claimed.worker == "w1"
    assert claimed.attempts == 1
    assert claimed.gpu_ids == ["GPU-x", "GPU-y"]
    assert claimed.updated_at == at(7)
    assert store.get_job(job.id) == claimed


def test_claim_of_a_job_not_queued_changes_nothing(store: base.Store) -> None:
    assert store.claim_job(999_999, "w1", [], T0) is None
    job = running(store)
    assert store.claim_job(job.id, "w2", ["GPU-0"], T0) is None
    assert store.get_job(job.id) == job
    cancelled = queued(store)
    store.cancel_job(cancelled.id, at(1))
    assert store.claim_job(cancelled.id, "w1", [], at(2)) is None
    assert store.get_job(cancelled.id).status is Status.CANCELLED


def test_a_gpu_of_a_running_job_is_not_handed_out_again(store: base.Store) -> None:
    holder = queued(store, gpus=2)
    assert store.claim_job(holder.id, "w1", ["GPU-a", "GPU-b"], at(1)) is not None
    job = queued(store, gpus=1)
    assert store.claim_job(job.id, "w1", ["GPU-b"], at(2)) is None
    assert store.get_job(job.id).status is Status.QUEUED
    assert store.claim_job(job.id, "w2", ["GPU-b"], at(2)) is not None  # another box's GPU-b
    assert finish(store, holder, attempt=1) is Finish.APPLIED
    again = queued(store, gpus=1)
    assert store.claim_job(again.id, "w1", ["GPU-b"], at(3)) is not None  # free once it ended


def test_jobs_by_status_and_the_oldest_queued(store: base.Store) -> None:
    assert store.jobs_by_status() == {status.value: 0 for status in Status}
    assert store.oldest_queued() is None
    first = queued(store, now=at(5))
    queued(store, now=at(9))
    claimed = running(store)
    assert finish(store, claimed) is Finish.APPLIED
    counts = store.jobs_by_status()
    assert counts["QUEUED"] == 2 and counts["FINISHED"] == 1 and counts["RUNNING"] == 0
    assert store.oldest_queued() == first.created_at == at(5)


def test_queue_is_priority_then_submission_order(store: base.Store) -> None:
    low = queued(store, priority=-1)
    mid_a = queued(store, priority=5)
    high = queued(store, priority=10)
    mid_b = queued(store, priority=5)
    zero = queued(store)
    claimed = running(store, priority=99)
    order = [job.id for job in store.queued_jobs()]
    assert order == [high.id, mid_a.id, mid_b.id, zero.id, low.id]
    assert claimed.id not in order
    assert [job.id for job in store.queued_jobs(limit=2)] == [high.id, mid_a.id]


def test_queued_jobs_already_known_are_not_read_again(store: base.Store) -> None:
    first, second, third = queued(store), queued(store, priority=5), queued(store)
    kept = dataclasses.replace(first, worker="as the scheduler kept it")  # an object we can tell
    store.claim_job(second.id, "w1", [], at(1))  # no longer queued: left out, even if known
    known = {first.id: kept, second.id: second}
    listed = store.queued_jobs(known=known)
    assert [job.id for job in listed] == [first.id, third.id]
    assert listed[0] is kept  # given back, not read
    assert listed[1] == third  # read
    assert store.queued_jobs(1, known) == [kept]


def test_queued_jobs_carry_what_the_scheduler_matches_on(store: base.Store) -> None:
    job = queued(
        store,
        gpus=2,
        gpu_model="A100",
        gpu_memory_gb=40,
        labels={"zone": "eu"},
        docker={"image": "busybox", "mounts": ["datasets"], "shm_size": "8g"},
    )
    (listed,) = store.queued_jobs()
    assert listed == job
    assert listed.spec.gpu_model == "A100" and listed.spec.gpu_memory_gb == 40
    assert listed.spec.labels == {"zone": "eu"}
    assert listed.spec.container.mounts == ["datasets"]
    assert listed.spec.container.shm_size == 8 * 1024**3


def test_queued_shapes_are_the_needs_of_the_queued_jobs_each_once(store: base.Store) -> None:
    plain = queued(store)
    queued(store, priority=5)
    big = queued(store, gpus=64)
    labelled = queued(store, labels={"zone": "eu", "tier": "gold"})
    queued(store, labels={"tier": "gold", "zone": "eu"})  # the same labels in another order
    claimed = queued(store, gpus=1, gpu_model="A100")
    assert store.claim_job(claimed.id, "w1", ["GPU-0"], at(1))  # not queued: not listed
    cancelled = queued(store, gpus=2)
    store.cancel_job(cancelled.id, at(1))
    shapes = [job.spec.needs.shape for job in (plain, big, labelled)]
    assert sorted(store.queued_shapes()) == sorted(shapes)
    assert [models.Needs.from_shape(shape) for shape in shapes] == [
        job.spec.needs for job in (plain, big, labelled)
    ]
    assert claimed.spec.needs.shape not in store.queued_shapes()
    assert store.unclaim_job(claimed.id, 1, at(2))  # queued again: listed again
    assert claimed.spec.needs.shape in store.queued_shapes()


def test_queued_jobs_of_one_shape_come_in_queue_order(store: base.Store) -> None:
    low = queued(store, gpus=1)
    queued(store, gpus=2)
    high = queued(store, gpus=1, priority=9)
    queued(store, gpus=1, labels={"zone": "eu"})
    last = queued(store, gpus=1)
    shape = low.spec.needs.shape
    assert [job.id for job in store.queued_jobs(shape=shape)] == [high.id, low.id, last.id]
    assert [job.id for job in store.queued_jobs(2, shape=shape)] == [high.id, low.id]
    known = {low.id: dataclasses.replace(low, worker="as the scheduler kept it")}
    assert store.queued_jobs(3, known, shape)[1] is known[low.id]
    assert store.queued_jobs(shape=models.JobSpec(name="x", image="y").needs.shape) == []


def test_concurrent_claims_hand_out_each_job_once(store: base.Store) -> None:
    jobs = 500
    created = {queued(store).id for _ in range(jobs)}
    threads = 8
    barrier = threading.Barrier(threads)
    claimed: list[list[int]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            while queue := store.queued_jobs(20):
                for candidate in queue:  # all threads race for the same few jobs
                    job = store.claim_job(candidate.id, f"w{index}", [], at(1))
                    if job is not None:
                        assert job.worker == f"w{index}"
                        claimed[index].append(job.id)
        except BaseException as exc:  # reported below, from the test's thread
            failures.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in pool)
    assert failures == []
    flat = [job_id for ids in claimed for job_id in ids]
    assert len(flat) == jobs
    assert set(flat) == created
    assert store.list_jobs(status=Status.QUEUED) == []
    assert len(store.running_jobs()) == jobs
    for index, ids in enumerate(claimed):
        assert sorted(job.id for job in store.running_jobs(f"w{index}")) == sorted(ids)


def test_unclaim_puts_the_job_back_as_if_never_claimed(store: base.Store) -> None:
    job = queued(store, gpus=1)
    claimed = claim_next(store, "w1", ["GPU-a"], at(1))
    assert claimed is not None and claimed.attempts == 1
    assert store.unclaim_job(job.id, 1, at(2)) is True
    back = store.get_job(job.id)
    assert back.status is Status.QUEUED
    assert back.worker is None
    assert back.gpu_ids == []
    assert back.attempts == 0
    assert store.running_jobs() == []
    again = claim_next(store, "w2", ["GPU-b"], at(3))
    assert again is not None and again.id == job.id
    assert again.attempts == 1
    assert again.gpu_ids == ["GPU-b"]


def test_unclaim_stale_or_not_running_changes_nothing(store: base.Store) -> None:
    job = running(store)
    assert store.unclaim_job(job.id, 2, at(2)) is False
    assert store.unclaim_job(job.id, 0, at(2)) is False
    assert store.get_job(job.id) == job
    waiting = queued(store, labels={"never": "claimed"})
    assert store.unclaim_job(waiting.id, 0, at(2)) is False
    assert store.get_job(waiting.id) == waiting
    assert finish(store, job) is Finish.APPLIED
    done = store.get_job(job.id)
    assert store.unclaim_job(job.id, 1, at(3)) is False
    assert store.get_job(job.id) == done


def test_unclaim_after_cancel_request_cancels(store: base.Store) -> None:
    # A cancel can land between the claim and the failed send. Had the job never been claimed,
    # that cancel would have made it CANCELLED at once; put back, it must not run again.
    job = running(store)
    store.cancel_job(job.id, at(1))
    store.unclaim_job(job.id, 1, at(2))
    back = store.get_job(job.id)
    assert back.status is Status.CANCELLED
    assert claim_next(store, "w2", [], at(3)) is None


# --- mark_started / finish_job --------------------------------------------------------------


def test_mark_started_then_finish_applies(store: base.Store) -> None:
    job = running(store, sealed=SEALED)
    assert store.mark_started(job.id, 1, at(1.5)) is True
    assert store.get_job(job.id).executed_at == at(1.5)
    result = store.finish_job(job.id, 1, Status.FINISHED, 0, None, at(2), at(4), 0)
    assert result is Finish.APPLIED
    done = store.get_job(job.id)
    assert done.status is Status.FINISHED
    assert done.exit_code == 0
    assert done.error is None
    assert done.executed_at == at(1.5)  # the time mark_started recorded wins
    assert done.finished_at == at(4)
    assert done.duration == 2.5
    assert done.worker == "w1"
    assert done.spec.sealed is None
    assert store.running_jobs() == []


def test_finish_without_mark_started_uses_given_executed_at(store: base.Store) -> None:
    job = running(store)
    result = store.finish_job(job.id, 1, Status.ERROR, 137, "killed", at(2), at(3), 0)
    assert result is Finish.APPLIED
    done = store.get_job(job.id)
    assert done.status is Status.ERROR
    assert done.exit_code == 137
    assert done.error == "killed"
    assert done.executed_at == at(2)
    assert done.finished_at == at(3)


def test_finish_cancelled(store: base.Store) -> None:
    job = running(store)
    store.cancel_job(job.id, at(1))
    assert finish(store, job, Status.CANCELLED, exit_code=None, error="cancelled") is Finish.APPLIED
    assert store.get_job(job.id).status is Status.CANCELLED


def test_mark_started_stale_attempt_changes_nothing(store: base.Store) -> None:
    job = running(store)
    assert store.mark_started(job.id, 2, at(1.5)) is False
    assert store.get_job(job.id).executed_at is None
    never_claimed = queued(store)
    assert store.mark_started(never_claimed.id, 0, at(1.5)) is False
    assert store.get_job(never_claimed.id).executed_at is None


def test_second_finish_is_ignored_and_changes_nothing(store: base.Store) -> None:
    job = running(store)
    assert finish(store, job, Status.FINISHED, exit_code=0) is Finish.APPLIED
    before = store.get_job(job.id)
    again = store.finish_job(job.id, 1, Status.ERROR, 1, "late", at(8), at(9), 0)
    assert again is Finish.IGNORED
    assert store.get_job(job.id) == before


def test_finish_with_stale_attempt_is_ignored(store: base.Store) -> None:
    job = running(store, max_retries=2)
    assert finish(store, job, attempt=2) is Finish.IGNORED
    assert store.get_job(job.id).status is Status.RUNNING
    store.release_job(job.id, 1, "worker lost", at(2))
    second = claim_next(store, "w2", [], at(3))
    assert second is not None and second.attempts == 2
    assert finish(store, job, attempt=1) is Finish.IGNORED
    current = store.get_job(job.id)
    assert current.status is Status.RUNNING
    assert current.worker == "w2"
    assert finish(store, job, attempt=2) is Finish.APPLIED


def test_finish_of_queued_job_is_ignored(store: base.Store) -> None:
    job = queued(store)
    assert finish(store, job, attempt=0) is Finish.IGNORED
    assert store.get_job(job.id).status is Status.QUEUED


def test_log_marks_are_the_last_time_stored_per_stream_and_its_line_count(
    store: base.Store,
) -> None:
    job = running(store)
    assert store.log_marks(job.id) == {}
    late = "2024-05-01T12:00:09.000000000Z"
    lines = [*raw(1, 4), (late, "stdout", "a long line's first piece"), (late, "stdout", "its 2nd")]
    assert store.append_logs(job.id, 1, 1, lines) == 6
    # raw(1, 4): stdout at .000001, .000002, .000004; stderr at .000003
    assert store.log_marks(job.id) == {"stdout": (late, 2), "stderr": (raw(3, 1)[0][0], 1)}


def test_finish_before_lines_are_stored_reports_missing_lines(store: base.Store) -> None:
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 3)) == 3
    assert finish(store, job, last_seq=5) is Finish.MISSING_LINES
    assert store.get_job(job.id).status is Status.RUNNING
    assert store.append_logs(job.id, 1, 4, raw(4, 2)) == 5
    assert finish(store, job, last_seq=5) is Finish.APPLIED
    done = store.get_job(job.id)
    assert done.status is Status.FINISHED
    assert done.log_seq == 5


def test_a_large_batch_is_stored_whole_and_in_order(store: base.Store) -> None:
    # More lines than one INSERT carries (SQLite writes 100 rows per statement), and not a
    # multiple of it.
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 1234)) == 1234
    lines = store.read_logs(job.id, limit=5000)
    assert seqs(lines) == list(range(1, 1235))
    assert [(line.ts, line.stream, line.line) for line in lines] == raw(1, 1234)


def test_a_batch_may_cover_numbers_past_its_lines_for_a_drop_marker(store: base.Store) -> None:
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 2)) == 2
    # one marker line standing for seq 3..10, which the worker dropped
    assert store.append_logs(job.id, 1, 3, raw(3, 1, "dropped"), last=10) == 10
    assert store.append_logs(job.id, 1, 3, raw(3, 1, "dropped"), last=10) == 10  # again: nothing
    assert store.append_logs(job.id, 1, 11, raw(11, 2)) == 12
    assert finish(store, job, last_seq=12) is Finish.APPLIED
    lines = store.read_logs(job.id)
    assert [line.seq for line in lines] == [1, 2, 3, 11, 12]
    assert store.get_job(job.id).log_seq == 12


@pytest.mark.parametrize("status", [Status.QUEUED, Status.RUNNING])
def test_finish_with_non_terminal_status_raises_wrong_state(
    store: base.Store, status: Status
) -> None:
    job = running(store)
    with pytest.raises(errors.WrongState):
        finish(store, job, status)
    assert store.get_job(job.id) == job


# --- cancel_job -----------------------------------------------------------------------------


def test_cancel_queued_job_is_immediate(store: base.Store) -> None:
    job = queued(store)
    cancelled = store.cancel_job(job.id, at(3))
    assert cancelled.status is Status.CANCELLED
    assert cancelled.finished_at == at(3)
    assert store.get_job(job.id) == cancelled
    assert claim_next(store, "w1", [], at(4)) is None


def test_cancel_running_job_requests_cancel(store: base.Store) -> None:
    job = running(store)
    assert job.cancel_requested is False
    requested = store.cancel_job(job.id, at(3))
    assert requested.status is Status.RUNNING
    assert requested.cancel_requested is True
    assert requested.worker == "w1"
    assert store.get_job(job.id).cancel_requested is True
    again = store.cancel_job(job.id, at(4))  # asking twice is harmless
    assert again.status is Status.RUNNING and again.cancel_requested is True


@pytest.mark.parametrize("status", [Status.FINISHED, Status.ERROR, Status.CANCELLED])
def test_cancel_terminal_job_raises_wrong_state(store: base.Store, status: Status) -> None:
    job = running(store)
    assert finish(store, job, status) is Finish.APPLIED
    before = store.get_job(job.id)
    with pytest.raises(errors.WrongState):
        store.cancel_job(job.id, at(9))
    assert store.get_job(job.id) == before


def test_cancel_cancelled_queued_job_raises_wrong_state(store: base.Store) -> None:
    job = queued(store)
    store.cancel_job(job.id, at(1))
    with pytest.raises(errors.WrongState):
        store.cancel_job(job.id, at(2))


def test_cancel_unknown_job_raises_job_not_found(store: base.Store) -> None:
    with pytest.raises(errors.JobNotFound):
        store.cancel_job(999, T0)


# --- release_job ----------------------------------------------------------------------------


def test_release_requeues_while_retries_remain(store: base.Store) -> None:
    job = queued(store, gpus=1, max_retries=1)
    first = claim_next(store, "w1", ["GPU-a"], at(1))
    assert first is not None and first.id == job.id and first.attempts == 1
    store.append_logs(job.id, 1, 1, raw(1, 2))
    requeued = store.release_job(job.id, 1, "worker w1 lost", at(2))
    assert requeued is not None
    assert requeued.status is Status.QUEUED
    assert requeued.worker is None
    assert requeued.gpu_ids == []
    assert requeued.attempts == 1
    assert requeued.finished_at is None
    assert store.get_job(job.id) == requeued
    assert store.running_jobs() == []
    # After the attempt's lines, one that says it ended; the next attempt's lines follow.
    assert requeued.log_seq == 3
    assert store.read_logs(job.id, since=2) == [
        (
            3,
            f"{at(2):%Y-%m-%dT%H:%M:%S}.{at(2).microsecond:06d}000Z",
            "gpubox",
            "[gpubox: attempt 1 ended: worker w1 lost; the job is queued again (retry 1 of 1)]",
        )
    ]
    second = claim_next(store, "w2", ["GPU-b"], at(3))
    assert second is not None and second.id == job.id
    assert second.attempts == 2
    assert second.worker == "w2"
    assert second.gpu_ids == ["GPU-b"]
    assert second.status is Status.RUNNING


def test_release_errors_when_no_retries_left(store: base.Store) -> None:
    job = running(store, max_retries=1)
    assert store.release_job(job.id, 1, "lost once", at(2)) is not None
    again = claim_next(store, "w2", [], at(3))
    assert again is not None and again.attempts == 2
    failed = store.release_job(job.id, 2, "worker w2 lost", at(4))
    assert failed is not None
    assert failed.status is Status.ERROR
    assert failed.error == "worker w2 lost"
    assert failed.finished_at == at(4)
    assert store.get_job(job.id) == failed
    assert claim_next(store, "w3", [], at(5)) is None


def test_release_without_retries_errors_at_once(store: base.Store) -> None:
    job = running(store)
    failed = store.release_job(job.id, 1, "worker lost", at(2))
    assert failed is not None
    assert failed.status is Status.ERROR
    assert failed.error == "worker lost"


def test_release_after_cancel_request_cancels(store: base.Store) -> None:
    job = running(store, max_retries=3)
    store.cancel_job(job.id, at(1))
    released = store.release_job(job.id, 1, "worker lost", at(2))
    assert released is not None
    assert released.status is Status.CANCELLED
    assert released.finished_at == at(2)
    assert store.get_job(job.id) == released
    assert claim_next(store, "w1", [], at(3)) is None


def test_release_stale_attempt_returns_none(store: base.Store) -> None:
    job = running(store, max_retries=3)
    assert store.release_job(job.id, 2, "lost", at(2)) is None
    assert store.release_job(job.id, 0, "lost", at(2)) is None
    assert store.get_job(job.id) == job
    assert finish(store, job) is Finish.APPLIED
    done = store.get_job(job.id)
    assert store.release_job(job.id, 1, "lost", at(5)) is None
    assert store.get_job(job.id) == done
    waiting = queued(store)
    assert store.release_job(waiting.id, 0, "lost", at(5)) is None
    assert store.get_job(waiting.id).status is Status.QUEUED


# --- running_jobs ---------------------------------------------------------------------------


def test_running_jobs_all_and_per_worker(store: base.Store) -> None:
    a1 = running(store, "a")
    b1 = running(store, "b")
    a2 = running(store, "a")
    done = running(store, "a")
    assert finish(store, done) is Finish.APPLIED
    queued(store, labels={"never": "claimed"})
    assert [job.id for job in store.running_jobs()] == [a1.id, b1.id, a2.id]
    assert [job.id for job in store.running_jobs("a")] == [a1.id, a2.id]
    assert [job.id for job in store.running_jobs("b")] == [b1.id]
    assert store.running_jobs("nobody") == []
    assert all(job.status is Status.RUNNING for job in store.running_jobs())


def test_placements_say_where_each_running_job_runs(store: base.Store) -> None:
    a1 = running(store, "a", gpus=("GPU-1", "GPU-2"))
    b1 = running(store, "b")
    done = running(store, "a", gpus=("GPU-3",))
    assert finish(store, done) is Finish.APPLIED
    queued(store)
    assert store.placements() == [
        base.Placed(a1.id, "a", ("GPU-1", "GPU-2")),
        base.Placed(b1.id, "b", ()),
    ]


# --- logs -----------------------------------------------------------------------------------


def test_append_and_read_logs_in_order(store: base.Store) -> None:
    job = running(store)
    lines = [
        ("2024-05-01T12:00:01.000000Z", "stdout", "hello"),
        ("2024-05-01T12:00:02.000000Z", "stderr", "warn: ü"),
        ("2024-05-01T12:00:03.000000Z", "stdout", ""),
    ]
    assert store.append_logs(job.id, 1, 1, lines) == 3
    assert store.read_logs(job.id) == [
        models.LogLine(seq=1, ts="2024-05-01T12:00:01.000000Z", stream="stdout", line="hello"),
        models.LogLine(seq=2, ts="2024-05-01T12:00:02.000000Z", stream="stderr", line="warn: ü"),
        models.LogLine(seq=3, ts="2024-05-01T12:00:03.000000Z", stream="stdout", line=""),
    ]
    assert store.get_job(job.id).log_seq == 3
    assert store.append_logs(job.id, 1, 4, raw(4, 2)) == 5
    assert seqs(store.read_logs(job.id)) == [1, 2, 3, 4, 5]
    # The same rows as plain tuples (pages are rendered from these), and the same window.
    rows = store.read_log_rows(job.id, since=1, limit=3)
    assert rows == [tuple(line) for line in store.read_logs(job.id, since=1, limit=3)]
    assert [type(row) for row in rows] == [tuple] * 3
    assert rows[0] == (2, "2024-05-01T12:00:02.000000Z", "stderr", "warn: ü")


def test_a_read_of_log_rows_stops_at_max_bytes(store: base.Store) -> None:
    """The rows stop at the first that brings their text (UTF-8) to max_bytes; a line
    longer than max_bytes comes alone; the line limit still applies."""

    def row_seqs(rows: list[models.LogRow]) -> list[int]:
        return [row[0] for row in rows]

    job = running(store)
    texts = ["a" * 100, "ü" * 100, "b" * 100, "c" * 1000, "d" * 10]  # ü: 200 bytes
    store.append_logs(
        job.id, 1, 1, [("2024-05-01T12:00:01.000000Z", "stdout", text) for text in texts]
    )
    assert row_seqs(store.read_log_rows(job.id, 0, 100, max_bytes=300)) == [1, 2]
    assert row_seqs(store.read_log_rows(job.id, 0, 100, max_bytes=301)) == [1, 2, 3]
    assert row_seqs(store.read_log_rows(job.id, 3, 100, max_bytes=10)) == [4]
    assert row_seqs(store.read_log_rows(job.id, 0, 2, max_bytes=10_000)) == [1, 2]
    assert row_seqs(store.read_log_rows(job.id, 0, 100, max_bytes=10_000)) == [1, 2, 3, 4, 5]
    assert store.read_log_rows(job.id, 5, 100, max_bytes=10) == []
    # more rows than one fetch holds (logs.FETCH_ROWS)
    many = [("2024-05-01T12:00:01.000000Z", "stdout", "x" * 10) for _ in range(100)]
    store.append_logs(job.id, 1, 6, many)
    assert row_seqs(store.read_log_rows(job.id, 5, 1000, max_bytes=505)) == list(range(6, 57))


def test_logs_of_jobs_are_separate(store: base.Store) -> None:
    one = running(store)
    two = running(store)
    store.append_logs(one.id, 1, 1, raw(1, 2, "a"))
    store.append_logs(two.id, 1, 1, raw(1, 3, "b"))
    assert [line.line for line in store.read_logs(one.id)] == ["line 1a", "line 2a"]
    assert [line.line for line in store.read_logs(two.id)] == ["line 1b", "line 2b", "line 3b"]


def test_writes_in_a_batch_commit_together_and_a_failed_one_undoes_only_itself(
    store: base.Store, db_url: str
) -> None:
    one, two = running(store), running(store)
    other = open_store(db_url)  # another coordinator's view
    try:
        with store.batch():
            assert store.mark_started(one.id, 1, at(2))
            with pytest.raises(errors.WrongState):
                finish(store, two, Status.QUEUED)  # refused: undoes only itself
            assert store.append_logs(two.id, 1, 1, raw(1, 2)) == 2
            assert store.get_job(two.id).log_seq == 2  # the batch sees its own writes
            assert other.get_job(one.id).executed_at is None  # others see them at the commit
        assert other.get_job(one.id).executed_at == at(2)
    finally:
        other.close()
    assert store.get_job(two.id).status is Status.RUNNING
    assert seqs(store.read_logs(two.id)) == [1, 2]


def test_a_batch_left_by_an_exception_changes_nothing(store: base.Store) -> None:
    job = running(store)
    with pytest.raises(RuntimeError), store.batch():
        store.append_logs(job.id, 1, 1, raw(1, 3))
        assert finish(store, job, last_seq=3) is Finish.APPLIED
        raise RuntimeError("the commit never comes")
    assert store.get_job(job.id).status is Status.RUNNING
    assert store.read_logs(job.id) == []
    store.append_logs(job.id, 1, 1, raw(1, 1))  # and the store is usable after
    assert seqs(store.read_logs(job.id)) == [1]


def test_log_batches_in_one_transaction_are_each_answered_in_order(store: base.Store) -> None:
    one, two = running(store), running(store)
    with store.batch():
        answers = [
            store.append_logs(one.id, 1, 1, raw(1, 2, "a")),
            store.append_logs(two.id, 1, 1, raw(1, 1, "b")),
            store.append_logs(one.id, 1, 3, raw(3, 2, "a")),  # follows the first: applied after it
            store.append_logs(two.id, 1, 5, raw(5, 1, "b")),  # a gap: nothing, say what is stored
            store.append_logs(one.id, 2, 1, raw(1, 1, "x")),  # a stale attempt: forget it
        ]
    assert answers == [2, 1, 4, 1, 1]
    assert [line.line for line in store.read_logs(one.id)] == [f"line {i}a" for i in (1, 2, 3, 4)]
    assert [line.line for line in store.read_logs(two.id)] == ["line 1b"]


def test_overlapping_batch_stores_each_line_once(store: base.Store) -> None:
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 3)) == 3
    # A resend after a lost acknowledgement starts before the stored end.
    assert store.append_logs(job.id, 1, 2, raw(2, 4, " again")) == 5
    stored = store.read_logs(job.id)
    assert seqs(stored) == [1, 2, 3, 4, 5]
    assert [line.line for line in stored] == [
        "line 1",
        "line 2",
        "line 3",
        "line 4 again",
        "line 5 again",
    ]
    assert store.get_job(job.id).log_seq == 5


def test_fully_stored_batch_changes_nothing(store: base.Store) -> None:
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 5)) == 5
    assert store.append_logs(job.id, 1, 2, raw(2, 3, " dup")) == 5
    assert store.append_logs(job.id, 1, 1, raw(1, 5, " dup")) == 5
    stored = store.read_logs(job.id)
    assert seqs(stored) == [1, 2, 3, 4, 5]
    assert all("dup" not in line.line for line in stored)
    assert store.get_job(job.id).log_seq == 5


def test_batch_leaving_a_gap_stores_nothing(store: base.Store) -> None:
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 3)) == 3
    assert store.append_logs(job.id, 1, 5, raw(5, 4)) == 3
    assert seqs(store.read_logs(job.id)) == [1, 2, 3]
    assert store.get_job(job.id).log_seq == 3
    fresh = running(store)
    assert store.append_logs(fresh.id, 1, 2, raw(2, 2)) == 0
    assert store.read_logs(fresh.id) == []
    assert store.get_job(fresh.id).log_seq == 0


def test_stale_attempt_batch_stores_nothing_and_returns_its_end(store: base.Store) -> None:
    job = running(store, max_retries=1)
    assert store.append_logs(job.id, 1, 1, raw(1, 2)) == 2
    assert store.append_logs(job.id, 2, 3, raw(3, 4)) == 6
    assert seqs(store.read_logs(job.id)) == [1, 2]
    store.release_job(job.id, 1, "lost", at(2))  # seq 3: the line saying attempt 1 ended
    assert claim_next(store, "w2", [], at(3)) is not None
    assert store.append_logs(job.id, 1, 3, raw(3, 10, " old")) == 12
    assert seqs(store.read_logs(job.id)) == [1, 2, 3]
    assert store.get_job(job.id).log_seq == 3
    assert store.append_logs(job.id, 2, 4, raw(4, 1, " new")) == 4
    assert [line.line for line in store.read_logs(job.id, since=3)] == ["line 4 new"]


def test_logs_after_finish_are_dropped(store: base.Store) -> None:
    job = running(store)
    assert store.append_logs(job.id, 1, 1, raw(1, 2)) == 2
    assert finish(store, job, last_seq=2) is Finish.APPLIED
    assert store.append_logs(job.id, 1, 3, raw(3, 3)) == 5
    assert seqs(store.read_logs(job.id)) == [1, 2]
    waiting = queued(store)
    assert store.append_logs(waiting.id, 0, 1, raw(1, 2)) == 2
    assert store.read_logs(waiting.id) == []


def test_read_logs_since_and_limit(store: base.Store) -> None:
    job = running(store)
    store.append_logs(job.id, 1, 1, raw(1, 10))
    assert seqs(store.read_logs(job.id, since=7)) == [8, 9, 10]
    assert seqs(store.read_logs(job.id, limit=4)) == [1, 2, 3, 4]
    assert seqs(store.read_logs(job.id, since=3, limit=2)) == [4, 5]
    assert store.read_logs(job.id, since=10) == []
    assert store.read_logs(job.id + 1000) == []


def test_twenty_thousand_lines_in_batches_are_stored_once(store: base.Store) -> None:
    job = running(store)
    total, batch = 20_000, 100
    acked = 0
    for first in range(1, total + 1, batch):
        acked = store.append_logs(job.id, 1, first, raw(first, batch))
        assert acked == first + batch - 1
    # Every third batch is resent, as after a lost acknowledgement; nothing is stored twice.
    for first in range(1, total + 1, batch * 3):
        assert store.append_logs(job.id, 1, first, raw(first, batch, " dup")) == total
    assert store.get_job(job.id).log_seq == total
    stored: list[models.LogLine] = []
    since = 0
    while page := store.read_logs(job.id, since=since):
        assert len(page) <= 1000
        stored.extend(page)
        since = page[-1].seq
    assert seqs(stored) == list(range(1, total + 1))
    assert all(line.line == f"line {line.seq}" for line in stored)
    assert finish(store, job, last_seq=total) is Finish.APPLIED


def test_concurrent_resends_store_each_line_once(store: base.Store) -> None:
    job = running(store)
    threads, total, batch = 4, 400, 40
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def sender(offset: int) -> None:
        # Each thread sends every batch, shifted so that batches overlap across threads.
        try:
            barrier.wait(timeout=10)
            first = 1
            while first <= total:
                count = min(batch + offset, total - first + 1)
                acked = store.append_logs(job.id, 1, first, raw(first, count))
                first = acked + 1
        except BaseException as exc:  # reported below, from the test's thread
            failures.append(exc)

    pool = [threading.Thread(target=sender, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in pool)
    assert failures == []
    stored = store.read_logs(job.id, limit=total + 10)
    assert seqs(stored) == list(range(1, total + 1))
    assert store.get_job(job.id).log_seq == total


# --- workers --------------------------------------------------------------------------------


def make_worker(**overrides: Any) -> models.WorkerInfo:
    """A WorkerInfo; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "name": "w1",
        "version": "0.1.0",
        "gpus": [{"uuid": "GPU-a", "name": "H100", "memory_mb": 81559}],
        "labels": {"zone": "eu"},
        "max_jobs": 2,
        "connected": True,
        "last_seen": at(10),
    }
    fields.update(overrides)
    return models.WorkerInfo(**fields)


def test_workers_round_trip_by_name(store: base.Store) -> None:
    assert store.list_workers() == []
    beta = make_worker(name="beta", gpus=[], labels={}, connected=False)
    alpha = make_worker(name="alpha")
    store.save_worker(beta)
    store.save_worker(alpha)
    assert store.list_workers() == [alpha, beta]


def test_save_worker_replaces(store: base.Store) -> None:
    store.save_worker(make_worker(name="w1"))
    store.save_worker(make_worker(name="w2"))
    newer = make_worker(
        name="w1",
        version="0.2.0",
        gpus=[],
        labels={"zone": "us"},
        max_jobs=5,
        connected=False,
        last_seen=at(99),
    )
    store.save_worker(newer)
    workers = store.list_workers()
    assert [worker.name for worker in workers] == ["w1", "w2"]
    assert workers[0] == newer


# --- tokens ---------------------------------------------------------------------------------


def make_token(name: str, role: str = "user") -> models.Token:
    """A Token whose digest is the SHA-256 of a secret derived from its name."""
    digest = hashlib.sha256(f"secret-{name}".encode()).hexdigest()
    return models.Token(name=name, digest=digest, role=role, created_at=at(20))


def test_add_and_find_token(store: base.Store) -> None:
    token = make_token("ci", role="admin")
    store.add_token(token)
    assert store.find_token(token.digest) == token
    trusted = dataclasses.replace(make_token("trusted"), allow_process=True)
    store.add_token(trusted)
    assert store.find_token(trusted.digest) == trusted
    assert store.find_token(hashlib.sha256(b"other").hexdigest()) is None


def test_add_token_with_taken_name_raises_wrong_state(store: base.Store) -> None:
    first = make_token("ci")
    store.add_token(first)
    clash = models.Token(
        name="ci", digest=hashlib.sha256(b"different").hexdigest(), role="admin", created_at=T0
    )
    with pytest.raises(errors.WrongState):
        store.add_token(clash)
    assert store.list_tokens() == [first]
    assert store.find_token(clash.digest) is None


def test_revoke_token(store: base.Store) -> None:
    token = make_token("ci")
    store.add_token(token)
    assert store.find_token(token.digest) == token  # found lately: a revoke here still ends it
    assert store.revoke_token("ci") is True
    assert store.find_token(token.digest) is None
    assert store.revoke_token("ci") is False
    assert store.revoke_token("never") is False
    assert store.list_tokens() == []


def test_list_tokens_by_name(store: base.Store) -> None:
    assert store.list_tokens() == []
    tokens = [make_token("zeta"), make_token("alpha", role="admin"), make_token("mid")]
    for token in tokens:
        store.add_token(token)
    assert store.list_tokens() == sorted(tokens, key=lambda token: token.name)


# --- lifecycle ------------------------------------------------------------------------------


def test_reopened_store_keeps_everything(store: base.Store, db_url: str) -> None:
    job = running(store, sealed=SEALED)
    store.append_logs(job.id, 1, 1, raw(1, 3))
    store.save_worker(make_worker())
    store.add_token(make_token("ci"))
    store.close()
    again = open_store(db_url)
    try:
        assert again.get_job(job.id) == dataclasses.replace(job, log_seq=3)
        assert seqs(again.read_logs(job.id)) == [1, 2, 3]
        assert again.list_workers() == [make_worker()]
        assert again.list_tokens() == [make_token("ci")]
        assert queued(again).id > job.id
    finally:
        again.close()


def test_closed_store_refuses_work(store: base.Store) -> None:
    job = queued(store)
    store.close()
    with pytest.raises(errors.StoreError):  # StoreUnavailable too
        store.get_job(job.id)
    with pytest.raises(errors.StoreError):  # StoreUnavailable too
        queued(store)


def test_append_logs_keeps_head_and_tail_with_a_marker_past_the_cap(store: base.Store) -> None:
    job = running(store)
    for first in range(1, 26, 5):
        store.append_logs(job.id, 1, first, raw(first, 5), keep=10)
    lines = store.read_logs(job.id)
    assert seqs(lines) == [1, 2, 3, 4, 5, 6, 22, 23, 24, 25]
    marker = lines[5]
    assert marker.stream == "gpubox"  # gpubox's own line: no job can print one
    assert "16 lines dropped" in marker.line and "10 lines" in marker.line
    assert [line.line for line in lines[6:]] == ["line 22", "line 23", "line 24", "line 25"]
    assert store.get_job(job.id).log_seq == 25
    # the marker keeps counting as lines go on
    store.append_logs(job.id, 1, 26, raw(26, 5), keep=10)
    lines = store.read_logs(job.id)
    assert seqs(lines) == [1, 2, 3, 4, 5, 6, 27, 28, 29, 30]
    assert "21 lines dropped" in lines[5].line
    assert finish(store, job, last_seq=30) is Finish.APPLIED


def test_a_token_revoked_by_another_process_ends_within_the_cache_time(
    store: base.Store, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens found are trusted for TOKEN_CACHE_S without reading the database again; a
    revoke through another store (`gpubox token revoke` is another process) shows after."""
    monkeypatch.setattr(tokens, "TOKEN_CACHE_S", 30.0)
    token = make_token("ci")
    store.add_token(token)
    assert store.find_token(token.digest) == token
    other = open_store(db_url)
    try:
        assert other.revoke_token("ci") is True
    finally:
        other.close()
    assert store.find_token(token.digest) == token  # still trusted: found just now
    monkeypatch.setattr(tokens, "TOKEN_CACHE_S", 0.0)
    assert store.find_token(token.digest) is None  # past the cache time: read, and gone


def test_append_logs_keeps_head_and_tail_within_keep_bytes(store: base.Store) -> None:
    """Lines of 1,000 bytes past a cap of 20,000 bytes: a head of at most 10,000 bytes, a
    marker (stream gpubox) counting the lines dropped, then the latest lines; the job keeps
    at most the cap (and the marker); every batch is acknowledged to its end."""
    job = running(store)
    ts = "2024-05-01T12:00:00.000000001Z"

    def batch(first: int, count: int) -> list[base.RawLine]:
        return [(ts, "stdout", f"{seq:04d}" + "x" * 996) for seq in range(first, first + count)]

    for first in range(1, 101, 10):
        assert store.append_logs(job.id, 1, first, batch(first, 10), keep_bytes=20_000) == first + 9
    lines = store.read_logs(job.id)
    (marker,) = [line for line in lines if line.stream == "gpubox"]
    head = [line for line in lines if line.seq < marker.seq]
    tail = [line for line in lines if line.seq > marker.seq]
    assert [line.seq for line in head] == list(range(1, 11))  # 10,000 bytes: half the cap
    assert sum(len(line.line) for line in head + tail) <= 20_000
    assert tail[-1].seq == 100 and [line.seq for line in tail] == list(range(tail[0].seq, 101))
    assert marker.line == (
        f"[gpubox: {tail[0].seq - marker.seq} lines dropped here; the job logged more than"
        " the 20000 bytes kept per job (max_log_bytes)]"
    )
    # The marker keeps counting; the line cap applies beside the byte cap.
    store.append_logs(job.id, 1, 101, batch(101, 10), keep=15, keep_bytes=20_000)
    lines = store.read_logs(job.id)
    assert len(lines) == 15 and lines[10].stream == "gpubox" and lines[-1].seq == 110
    assert "lines kept per job (max_log_lines)" in lines[10].line
    assert finish(store, job, last_seq=110) is Finish.APPLIED
