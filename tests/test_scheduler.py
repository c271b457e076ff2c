"""The scheduler's rule (coordinator.scheduler), as pure unit tests: jobs and worker views in,
a plan out. No Docker, no database, no network."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from gpubox import models, validate
from gpubox.coordinator import fairshare, reading, scheduler
from gpubox.coordinator.scheduler import Plan, WorkerView
from gpubox.store.base import QueueGroup

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
A100 = ("NVIDIA A100-SXM4-80GB", 81559)  # NVML name, memory_mb of an "80 GB" card
H100 = ("NVIDIA H100 80GB HBM3", 81559)
A100_40 = ("NVIDIA A100-PCIE-40GB", 40960)
T4 = ("Tesla T4", 15360)

Placed = tuple[int, str, list[str]]


def make_job(
    job_id: int, mounts: list[str] | None = None, allow_process: bool = True, **fields: Any
) -> models.Job:
    """A QUEUED job with this id; keyword arguments are top-level submission fields (gpus,
    labels, gpu_model, …), `mounts` goes to docker.mounts; `allow_process`: whether its
    token may use process workers."""
    docker: dict[str, Any] = {"image": "busybox"}
    if mounts is not None:
        docker["mounts"] = mounts
    spec = validate.parse_spec({"name": f"job-{job_id}", "docker": docker, **fields})
    spec = dataclasses.replace(spec, allow_process=allow_process)
    created = T0 + timedelta(seconds=job_id)
    return models.Job(
        id=job_id,
        spec=spec,
        status=models.Status.QUEUED,
        created_at=created,
        updated_at=created,
    )


def make_gpus(
    prefix: str, count: int, model: tuple[str, int] = A100, first_index: int = 0
) -> list[dict[str, Any]]:
    """`count` GPUs of one model as a worker reports them, uuids `prefix-<index>`."""
    name, memory_mb = model
    return [
        {"uuid": f"{prefix}-{i}", "name": name, "memory_mb": memory_mb, "index": i}
        for i in range(first_index, first_index + count)
    ]


def make_worker(
    name: str,
    count: int = 4,
    free: int | list[str] | None = None,
    slots: int = 8,
    model: tuple[str, int] = A100,
    labels: dict[str, str] | None = None,
    mounts: tuple[str, ...] = (),
    gpus: list[dict[str, Any]] | None = None,
    runtime: str = "docker",
) -> WorkerView:
    """A worker view with `count` GPUs of `model` (uuids `name-<index>`) unless `gpus` is given;
    `free` is how many of them are free (the lowest indexes), or their uuids; all by default."""
    offered = gpus if gpus is not None else make_gpus(name, count, model)
    if free is None:
        free_uuids = [gpu["uuid"] for gpu in offered]
    elif isinstance(free, int):
        free_uuids = [gpu["uuid"] for gpu in offered[:free]]
    else:
        free_uuids = list(free)
    return WorkerView(
        name=name,
        gpus=offered,
        free=free_uuids,
        slots=slots,
        labels=dict(labels or {}),
        mounts=frozenset(mounts),
        runtime=runtime,
    )


def placed(result: Plan) -> list[Placed]:
    """The plan's assignments as (job id, worker, gpu uuids), in the plan's order."""
    return [(a.job.id, a.worker, list(a.gpus)) for a in result.assignments]


def not_enough(have: int, need: int, worker: str) -> str:
    """The reason of a job that reserves `worker` and waits for GPUs there."""
    return (
        f"not enough free GPUs: {have} of the {need} it needs are free on {worker},"
        " which holds them for this job as others end"
    )


def none_free(need: int, where: str) -> str:
    """The reason of a job that holds no worker: none that could run it has a GPU free that
    suits it (`where`: one worker's name, or "any of w1, w2")."""
    return f"not enough free GPUs: 0 of the {need} it needs are free on {where}"


# --- queue order and GPU choice ------------------------------------------------------------


def test_assignments_follow_the_queue_order_not_the_job_ids() -> None:
    queue = [make_job(3, gpus=1), make_job(1, gpus=2), make_job(2, gpus=1)]
    result = scheduler.plan(queue, [make_worker("w1")])
    assert placed(result) == [
        (3, "w1", ["w1-0"]),
        (1, "w1", ["w1-1", "w1-2"]),
        (2, "w1", ["w1-3"]),
    ]
    assert result.reasons == {}
    assert result.reserved == {}


def test_the_job_first_in_the_queue_wins_when_gpus_are_short() -> None:
    queue = [make_job(5, gpus=2), make_job(1, gpus=2)]
    result = scheduler.plan(queue, [make_worker("w1", free=2)])
    assert placed(result) == [(5, "w1", ["w1-0", "w1-1"])]
    assert result.reasons == {1: none_free(2, "w1")}
    assert result.reserved == {}  # w1 has no GPU free: holding it would keep nothing


def test_gpus_are_taken_in_index_order_even_when_gpus_and_free_are_unordered() -> None:
    gpus = make_gpus("w1", 4)
    shuffled = [gpus[2], gpus[0], gpus[3], gpus[1]]
    worker = make_worker("w1", gpus=shuffled, free=["w1-3", "w1-1", "w1-0", "w1-2"])
    queue = [make_job(1, gpus=2), make_job(2, gpus=1), make_job(3, gpus=1)]
    assert placed(scheduler.plan(queue, [worker])) == [
        (1, "w1", ["w1-0", "w1-1"]),
        (2, "w1", ["w1-2"]),
        (3, "w1", ["w1-3"]),
    ]


def test_only_free_gpus_are_given_in_index_order() -> None:
    worker = make_worker("w1", free=["w1-3", "w1-1"])
    result = scheduler.plan([make_job(1, gpus=2)], [worker])
    assert placed(result) == [(1, "w1", ["w1-1", "w1-3"])]


def test_four_one_gpu_jobs_get_four_distinct_gpus_and_the_fifth_waits() -> None:
    queue = [make_job(i, gpus=1) for i in range(1, 6)]
    result = scheduler.plan(queue, [make_worker("w1")])
    assert placed(result) == [
        (1, "w1", ["w1-0"]),
        (2, "w1", ["w1-1"]),
        (3, "w1", ["w1-2"]),
        (4, "w1", ["w1-3"]),
    ]
    uuids = [uuid for _, _, gpus in placed(result) for uuid in gpus]
    assert len(set(uuids)) == 4
    assert result.reasons == {5: none_free(1, "w1")}
    assert "not enough free GPUs" in result.reasons[5]


# --- job slots -----------------------------------------------------------------------------


def test_a_job_without_gpus_needs_only_a_slot() -> None:
    busy = make_worker("busy", free=0, slots=1)  # every GPU taken, one slot
    gpuless = make_worker("cpu", count=0, slots=1)  # no GPU at all
    result = scheduler.plan([make_job(1), make_job(2)], [busy, gpuless])
    assert placed(result) == [(1, "busy", []), (2, "cpu", [])]
    assert result.reasons == {}


def test_a_job_without_gpus_goes_to_the_worker_with_the_fewest_free_gpus() -> None:
    result = scheduler.plan(
        [make_job(1)], [make_worker("alpha", free=4), make_worker("beta", free=1)]
    )
    assert placed(result) == [(1, "beta", [])]


def test_one_slot_lets_only_one_job_start() -> None:
    result = scheduler.plan([make_job(1), make_job(2)], [make_worker("w1", slots=1)])
    assert placed(result) == [(1, "w1", [])]
    assert result.reasons == {2: "waiting for a free job slot (max_jobs) on w1"}


def test_one_slot_lets_only_one_gpu_job_start_though_gpus_are_free() -> None:
    queue = [make_job(1, gpus=1), make_job(2, gpus=1)]
    result = scheduler.plan(queue, [make_worker("w1", slots=1)])
    assert placed(result) == [(1, "w1", ["w1-0"])]
    assert result.reasons == {2: "waiting for a free job slot (max_jobs) on w1"}
    assert result.reserved == {"w1": 2}


def test_a_worker_with_nothing_free_is_not_reserved() -> None:
    # w1 has no free GPU and no slot: holding it would change nothing, so the 8-GPU job
    # holds w2 (1 GPU free, a slot), and the job behind waits behind it.
    full = make_worker("w1", count=8, free=0, slots=0)
    queue = [make_job(1, gpus=8), make_job(2, gpus=8)]
    result = scheduler.plan(queue, [full, make_worker("w2", count=8, free=1, slots=2)])
    assert result.reserved == {"w2": 1}
    assert result.reasons[2] == "waiting behind job 1: the GPUs of w2 are held for it"
    alone = scheduler.plan(queue, [full])
    assert alone.reserved == {}
    assert alone.reasons[1] == none_free(8, "w1")


def test_a_busy_worker_with_a_free_slot_is_not_held_until_a_gpu_frees_there() -> None:
    # Every GPU busy, a slot free on each: holding a worker would keep nothing from the jobs
    # behind, so none is held. The round after a GPU frees on w2, the big job, first in the
    # queue, holds it, and the small job behind it does not take it.
    queue = [make_job(1, gpus=4, priority=5), make_job(2, gpus=1)]
    busy = [make_worker("w1", free=0, slots=2), make_worker("w2", free=0, slots=2)]
    result = scheduler.plan(queue, busy)
    assert result.reserved == {}
    assert result.reasons == {1: none_free(4, "any of w1, w2"), 2: none_free(1, "any of w1, w2")}
    freed = [busy[0], make_worker("w2", free=["w2-3"], slots=2)]
    result = scheduler.plan(queue, freed)
    assert placed(result) == []
    assert result.reserved == {"w2": 1}
    assert result.reasons == {
        1: not_enough(1, 4, "w2"),
        2: "waiting behind job 1: the GPUs of w2 are held for it",
    }


def test_a_busy_fleets_round_reads_a_few_jobs_however_many_workers_it_has() -> None:
    # 1,000 workers, every GPU busy and a slot free on each, 3,000 queued jobs: no job can
    # start or hold a worker, so a round reads one job of each shape, and lists a few names.
    fleet = [make_worker(f"w{n:04d}", count=8, free=0, slots=1) for n in range(1000)]
    queue = [make_job(i, gpus=2 - i % 2) for i in range(1, 3001)]
    reads: list[tuple[str, int]] = []
    result = plan_queue(queue, fleet, reads)
    assert placed(result) == [] and result.reserved == {}
    assert sorted(count for _, count in reads) == [1, 1]
    reason = none_free(1, "any of w0000, w0001, w0002, w0003, w0004 and 995 more")
    assert reason in result.shape_reasons.values()
    # One GPU frees on one worker: one job holds it, the next of its shape is read too.
    fleet[500] = make_worker("w0500", count=8, free=1, slots=1)
    reads.clear()
    result = plan_queue(queue, fleet, reads)
    assert [a.worker for a in result.assignments] == ["w0500"]
    assert sum(count for _, count in reads) <= 5


def test_a_worker_with_gpus_free_but_no_slot_still_holds_a_big_job() -> None:
    # w1: 7 of 8 GPUs free, no slot. The 8-GPU job holds w1, the nearest to fitting it,
    # so the 1-GPU job behind it starts on w2.
    busy = make_worker("w1", count=8, free=7, slots=0)
    queue = [make_job(1, gpus=8), make_job(2, gpus=1)]
    result = scheduler.plan(queue, [busy, make_worker("w2", count=8, free=1, slots=2)])
    assert result.reserved == {"w1": 1}
    assert placed(result) == [(2, "w2", ["w2-0"])]


def test_no_slot_means_no_job_starts() -> None:
    result = scheduler.plan([make_job(1)], [make_worker("w1", slots=0)])
    assert placed(result) == []
    assert result.reasons == {1: "waiting for a free job slot (max_jobs) on w1"}


# --- reservations: no starvation -----------------------------------------------------------


def test_a_big_job_is_not_overtaken_by_small_jobs_behind_it() -> None:
    queue = [make_job(1, gpus=4, priority=5)] + [make_job(i, gpus=1) for i in range(2, 7)]
    result = scheduler.plan(queue, [make_worker("w1", free=2)])
    assert placed(result) == []
    assert result.reserved == {"w1": 1}
    assert result.reasons[1] == not_enough(2, 4, "w1")
    for job_id in range(2, 7):
        assert result.reasons[job_id] == "waiting behind job 1: the GPUs of w1 are held for it"


def test_small_jobs_still_run_on_a_worker_the_big_job_cannot_use() -> None:
    queue = [make_job(1, gpus=4, priority=5)] + [make_job(i, gpus=1) for i in range(2, 7)]
    workers = [make_worker("w1", free=2), make_worker("w2", count=2)]
    result = scheduler.plan(queue, workers)
    assert placed(result) == [(2, "w2", ["w2-0"]), (3, "w2", ["w2-1"])]
    assert not any(worker == "w1" for _, worker, _ in placed(result))
    # job 4 is the first small job that cannot start: w2 has no GPU free to hold for it
    assert result.reserved == {"w1": 1}
    assert result.reasons == {
        1: not_enough(2, 4, "w1"),
        **{i: "waiting behind job 1: the GPUs of w1 are held for it" for i in (4, 5, 6)},
    }


def test_the_big_job_starts_first_when_all_its_gpus_are_free() -> None:
    queue = [make_job(1, gpus=4, priority=5)] + [make_job(i, gpus=1) for i in range(2, 5)]
    result = scheduler.plan(queue, [make_worker("w1")])
    assert placed(result) == [(1, "w1", ["w1-0", "w1-1", "w1-2", "w1-3"])]
    assert result.reserved == {}
    assert result.reasons == {i: none_free(1, "w1") for i in (2, 3, 4)}


def test_the_big_job_starts_first_and_small_jobs_use_the_other_worker() -> None:
    queue = [make_job(1, gpus=4, priority=5)] + [make_job(i, gpus=1) for i in range(2, 5)]
    result = scheduler.plan(queue, [make_worker("w1"), make_worker("w2", count=2)])
    assert placed(result) == [
        (1, "w1", ["w1-0", "w1-1", "w1-2", "w1-3"]),
        (2, "w2", ["w2-0"]),
        (3, "w2", ["w2-1"]),
    ]
    # neither has a GPU free: none is held
    assert result.reserved == {}
    assert result.reasons == {4: none_free(1, "any of w1, w2")}


def test_a_job_without_gpus_may_use_a_spare_slot_of_a_reserved_worker() -> None:
    queue = [make_job(1, gpus=4), make_job(2), make_job(3)]
    result = scheduler.plan(queue, [make_worker("w1", free=2, slots=2)])
    assert placed(result) == [(2, "w1", [])]
    assert result.reserved == {"w1": 1}
    assert result.reasons == {
        1: not_enough(2, 4, "w1"),
        3: "waiting for a free job slot (max_jobs) on w1",
    }


def test_a_reserved_worker_keeps_its_last_slot_for_the_holder() -> None:
    queue = [make_job(1, gpus=4), make_job(2)]
    result = scheduler.plan(queue, [make_worker("w1", free=2, slots=1)])
    assert placed(result) == []
    assert result.reserved == {"w1": 1}
    assert "job slot" in result.reasons[2]
    assert result.reasons[2] == "waiting for a free job slot (max_jobs) on w1"


def test_a_job_waits_behind_the_job_that_holds_every_worker_it_could_use() -> None:
    workers = [
        make_worker("w1", free=2, labels={"zone": "us"}),
        make_worker("w2", free=2, labels={"zone": "eu"}),
    ]
    queue = [
        make_job(1, gpus=4),  # holds w1 (equal free GPUs: the first worker)
        make_job(2, gpus=4),  # holds w2, the only one left
        make_job(3, gpus=1),  # could use either
        make_job(4, gpus=1, labels={"zone": "eu"}),  # could use only w2
    ]
    result = scheduler.plan(queue, workers)
    assert placed(result) == []
    assert result.reserved == {"w1": 1, "w2": 2}
    assert result.reasons == {
        1: not_enough(2, 4, "w1"),
        2: not_enough(2, 4, "w2"),
        3: "waiting behind job 1: the GPUs of w1 are held for it",
        4: "waiting behind job 2: the GPUs of w2 are held for it",
    }


def test_a_waiting_job_reserves_the_worker_with_the_most_suitable_free_gpus() -> None:
    workers = [make_worker("w1", free=1), make_worker("w2", free=3)]
    result = scheduler.plan([make_job(1, gpus=4), make_job(2, gpus=1)], workers)
    assert result.reserved == {"w2": 1}
    assert placed(result) == [(2, "w1", ["w1-0"])]
    assert result.reasons == {1: not_enough(3, 4, "w2")}


# --- labels and mounts ---------------------------------------------------------------------


def test_a_labelled_job_runs_only_on_a_worker_with_all_its_labels() -> None:
    workers = [
        make_worker("w1", free=1, labels={"zone": "us"}),
        make_worker("w2", labels={"zone": "eu", "tier": "gold"}),
    ]
    queue = [
        make_job(1, gpus=1, labels={"zone": "eu"}),
        make_job(2, gpus=1, labels={"zone": "eu", "tier": "gold"}),
    ]
    assert placed(scheduler.plan(queue, workers)) == [
        (1, "w2", ["w2-0"]),
        (2, "w2", ["w2-1"]),
    ]


def test_labels_match_exactly_and_case_sensitively() -> None:
    workers = [make_worker("w1", labels={"zone": "eu"})]
    queue = [
        make_job(1, gpus=1, labels={"zone": "EU"}),
        make_job(2, gpus=1, labels={"Zone": "eu"}),
        make_job(3, gpus=1, labels={"zone": "eu", "tier": "gold"}),
    ]
    result = scheduler.plan(queue, workers)
    assert placed(result) == []
    assert result.reasons == {
        1: "no connected worker has the labels zone=EU",
        2: "no connected worker has the labels Zone=eu",
        3: "no connected worker has the labels tier=gold, zone=eu",
    }


def test_an_unlabelled_job_runs_on_a_labelled_worker() -> None:
    result = scheduler.plan([make_job(1, gpus=1)], [make_worker("w1", labels={"zone": "eu"})])
    assert placed(result) == [(1, "w1", ["w1-0"])]


def test_a_job_whose_labels_no_worker_has_is_told_so() -> None:
    workers = [make_worker("w1", labels={"zone": "us"}), make_worker("w2")]
    result = scheduler.plan([make_job(1, gpus=1, labels={"zone": "eu"})], workers)
    assert placed(result) == []
    assert result.reasons == {1: "no connected worker has the labels zone=eu"}
    assert result.reserved == {}


def test_a_job_with_mounts_goes_only_to_a_worker_that_declares_them() -> None:
    workers = [
        make_worker("w1", free=1),
        make_worker("w2", mounts=("datasets", "models")),
    ]
    queue = [make_job(1, gpus=1, mounts=["datasets"]), make_job(2, mounts=["models"])]
    assert placed(scheduler.plan(queue, workers)) == [(1, "w2", ["w2-0"]), (2, "w2", [])]


def test_a_job_whose_mounts_no_worker_declares_is_told_so() -> None:
    workers = [make_worker("w1", mounts=("models",))]
    result = scheduler.plan([make_job(1, gpus=1, mounts=["datasets"])], workers)
    assert placed(result) == []
    assert "mounts" in result.reasons[1] and "datasets" in result.reasons[1]
    assert result.reasons[1] == ("no connected worker with its labels declares the mounts datasets")


def test_a_process_runtime_worker_gets_only_jobs_it_can_run() -> None:
    # "a-proc" is the better fit (fewer free GPUs, first by name) for every job here, so a job
    # goes to "b-docker" only because the process runtime could not run it
    workers = [
        make_worker("a-proc", count=0, runtime="process"),
        make_worker("b-docker", count=1),
    ]
    queue = [
        make_job(1, docker={"image": "i", "command": ["true"], "memory": "64m"}),
        make_job(2, docker={"image": "i", "command": ["true"], "shm_size": "1g"}),
        make_job(3, docker={"image": "i", "command": ["true"], "user": "1000"}),
        make_job(4, docker={"image": "i"}),  # no command: the image's own, which it lacks
        make_job(5, docker={"image": "i", "command": ["true"], "workdir": "/tmp"}),
    ]
    assert [(job, worker) for job, worker, _ in placed(scheduler.plan(queue, workers))] == [
        (1, "b-docker"),
        (2, "b-docker"),
        (3, "b-docker"),
        (4, "b-docker"),
        (5, "a-proc"),
    ]


def test_a_job_only_docker_can_run_is_told_why_when_only_process_workers_are_connected() -> None:
    workers = [make_worker("proc", runtime="process")]
    memory = make_job(1, docker={"image": "i", "command": ["true"], "memory": "64m"})
    image_only = make_job(2)
    result = scheduler.plan([memory, image_only], workers)
    assert placed(result) == []
    assert result.reasons == {
        1: "no connected worker with its labels runs Docker, and the process runtime's cannot"
        " run it: it sets docker.memory",
        2: "no connected worker with its labels runs Docker, and the process runtime's cannot"
        " run it: it has no docker.command",
    }


def test_the_reason_names_the_mounts_when_only_a_worker_without_them_has_the_gpus() -> None:
    workers = [
        make_worker("small", count=1, mounts=("datasets",)),
        make_worker("big", count=4),
    ]
    result = scheduler.plan([make_job(1, gpus=2, mounts=["datasets"])], workers)
    assert placed(result) == []
    # "big" has its labels and 4 GPUs; what stops the job is that only "small" has the mount
    assert result.reasons[1] == "no connected worker with its labels and mounts has 2 GPUs"


# --- GPU model and memory ------------------------------------------------------------------


def test_gpu_model_matches_part_of_the_nvml_name_in_any_case() -> None:
    a100 = {"uuid": "a", "name": A100[0], "memory_mb": A100[1], "index": 0}
    h100 = {"uuid": "h", "name": H100[0], "memory_mb": H100[1], "index": 0}
    for model in ("a100", "A100", "A100-SXM4", "nvidia a100"):
        spec = make_job(1, gpus=1, gpu_model=model).spec
        assert spec.wants_gpu(a100), model
        assert not spec.wants_gpu(h100), model


def test_a_gpu_model_job_goes_to_the_worker_with_that_model() -> None:
    workers = [
        make_worker("h", count=1, model=H100),  # best fit would pick it for a plain job
        make_worker("a", count=2, model=A100),
    ]
    result = scheduler.plan([make_job(1, gpus=1, gpu_model="a100")], workers)
    assert placed(result) == [(1, "a", ["a-0"])]


def test_a_gpu_model_no_worker_offers_is_never_given_another_model() -> None:
    result = scheduler.plan([make_job(1, gpus=1, gpu_model="a100")], [make_worker("h", model=H100)])
    assert placed(result) == []
    assert result.reasons == {1: "no connected worker with its labels has 1 GPU of model 'a100'"}


def test_gpu_memory_counts_gigabytes_of_ten_to_the_ninth_bytes() -> None:
    eighty = {"uuid": "a", "name": A100[0], "memory_mb": 81559, "index": 0}  # 85.5e9 bytes
    forty = {"uuid": "b", "name": A100_40[0], "memory_mb": 40960, "index": 0}  # 42.9e9 bytes
    assert make_job(1, gpus=1, gpu_memory_gb=80).spec.wants_gpu(eighty)
    assert not make_job(1, gpus=1, gpu_memory_gb=85.6).spec.wants_gpu(eighty)
    assert make_job(1, gpus=1, gpu_memory_gb=85.5).spec.wants_gpu(eighty)
    assert not make_job(1, gpus=1, gpu_memory_gb=86).spec.wants_gpu(eighty)
    assert make_job(1, gpus=1, gpu_memory_gb=42.9).spec.wants_gpu(forty)
    assert not make_job(1, gpus=1, gpu_memory_gb=43).spec.wants_gpu(forty)
    assert not make_job(1, gpus=1, gpu_memory_gb=48).spec.wants_gpu(forty)


def test_an_eighty_gb_card_runs_an_eighty_gb_job_and_a_forty_gb_card_does_not_run_48() -> None:
    result = scheduler.plan([make_job(1, gpus=1, gpu_memory_gb=80)], [make_worker("a", model=A100)])
    assert placed(result) == [(1, "a", ["a-0"])]
    result = scheduler.plan(
        [make_job(2, gpus=1, gpu_memory_gb=48)], [make_worker("b", model=A100_40)]
    )
    assert placed(result) == []
    assert result.reasons == {2: "no connected worker with its labels has 1 GPU with 48 GB or more"}


def test_jobs_route_to_the_worker_with_the_gpus_they_ask_for() -> None:
    workers = [make_worker("a100", count=2, model=A100), make_worker("t4", count=2, model=T4)]
    queue = [
        make_job(1, gpus=1, gpu_model="t4"),
        make_job(2, gpus=1, gpu_memory_gb=40),
        make_job(3, gpus=1, gpu_model="A100", gpu_memory_gb=80),
        make_job(4, gpus=1, gpu_memory_gb=16),
        make_job(5, gpus=1, gpu_model="v100"),
    ]
    result = scheduler.plan(queue, workers)
    assert placed(result) == [
        (1, "t4", ["t4-0"]),
        (2, "a100", ["a100-0"]),
        (3, "a100", ["a100-1"]),
        (4, "t4", ["t4-1"]),
    ]
    assert result.reasons == {5: "no connected worker with its labels has 1 GPU of model 'v100'"}


def test_an_impossible_gpu_model_gets_a_reason_naming_it() -> None:
    workers = [make_worker("a100", model=A100), make_worker("t4", model=T4)]
    queue = [
        make_job(1, gpus=1, gpu_model="V100"),
        make_job(2, gpus=2, gpu_model="V100", gpu_memory_gb=32),
    ]
    result = scheduler.plan(queue, workers)
    assert placed(result) == []
    assert result.reasons == {
        1: "no connected worker with its labels has 1 GPU of model 'V100'",
        2: "no connected worker with its labels has 2 GPUs of model 'V100' with 32 GB or more",
    }
    assert result.reserved == {}


def test_a_gpu_model_job_gets_only_the_matching_gpus_of_a_mixed_worker() -> None:
    gpus = [
        {"uuid": "t4-a", "name": T4[0], "memory_mb": T4[1], "index": 0},
        {"uuid": "a100-a", "name": A100[0], "memory_mb": A100[1], "index": 1},
        {"uuid": "t4-b", "name": T4[0], "memory_mb": T4[1], "index": 2},
        {"uuid": "a100-b", "name": A100[0], "memory_mb": A100[1], "index": 3},
    ]
    worker = make_worker("mixed", gpus=gpus)
    queue = [
        make_job(1, gpus=3, gpu_model="a100"),  # only 2 A100s: never
        make_job(2, gpus=2, gpu_model="a100"),
        make_job(3, gpus=2),
    ]
    result = scheduler.plan(queue, [worker])
    assert placed(result) == [
        (2, "mixed", ["a100-a", "a100-b"]),
        (3, "mixed", ["t4-a", "t4-b"]),
    ]
    assert result.reasons == {1: "no connected worker with its labels has 3 GPUs of model 'a100'"}


# --- best fit ------------------------------------------------------------------------------


def test_best_fit_keeps_a_whole_worker_for_a_big_job() -> None:
    workers = [make_worker("alpha", free=4), make_worker("beta", free=1)]
    queue = [make_job(1, gpus=1), make_job(2, gpus=4)]
    result = scheduler.plan(queue, workers)
    assert placed(result) == [
        (1, "beta", ["beta-0"]),
        (2, "alpha", ["alpha-0", "alpha-1", "alpha-2", "alpha-3"]),
    ]


def test_best_fit_counts_only_the_gpus_that_suit_the_job() -> None:
    mixed = [
        {"uuid": "alpha-t4-0", "name": T4[0], "memory_mb": T4[1], "index": 0},
        {"uuid": "alpha-t4-1", "name": T4[0], "memory_mb": T4[1], "index": 1},
        {"uuid": "alpha-t4-2", "name": T4[0], "memory_mb": T4[1], "index": 2},
        {"uuid": "alpha-a100", "name": A100[0], "memory_mb": A100[1], "index": 3},
    ]
    workers = [make_worker("alpha", gpus=mixed), make_worker("beta", count=2, model=A100)]
    result = scheduler.plan([make_job(1, gpus=1, gpu_model="a100")], workers)
    assert placed(result) == [(1, "alpha", ["alpha-a100"])]


def test_best_fit_breaks_ties_by_worker_name() -> None:
    workers = [make_worker("zeta", free=2), make_worker("eta", free=2)]
    assert placed(scheduler.plan([make_job(1, gpus=1)], workers)) == [(1, "eta", ["eta-0"])]


# --- no workers, determinism ---------------------------------------------------------------


def test_without_workers_every_job_is_told_no_worker_is_connected() -> None:
    queue = [make_job(1), make_job(2, gpus=4), make_job(3, gpus=1, labels={"zone": "eu"})]
    result = scheduler.plan(queue, [])
    assert placed(result) == []
    assert result.reserved == {}
    assert result.reasons == {
        1: "no worker is connected",
        2: "no worker is connected",
        3: "no worker is connected",
    }


def test_an_empty_queue_gives_an_empty_plan() -> None:
    assert scheduler.plan([], [make_worker("w1")]) == Plan()


def test_the_plan_is_deterministic_and_leaves_its_input_alone() -> None:
    workers = [
        make_worker("w1", free=2, slots=3),
        make_worker("w2", count=2, labels={"zone": "eu"}),
        make_worker("w3", count=4, model=T4, free=["w3-3", "w3-0"], mounts=("datasets",)),
    ]
    queue = [
        make_job(7, gpus=4, priority=5),
        make_job(2, gpus=1),
        make_job(3),
        make_job(4, gpus=1, gpu_model="t4", mounts=["datasets"]),
        make_job(5, gpus=2, labels={"zone": "eu"}),
        make_job(6, gpus=1),
        make_job(1, gpus=1, gpu_model="v100"),
    ]
    before = (copy.deepcopy(queue), copy.deepcopy(workers))
    first = scheduler.plan(queue, workers)
    second = scheduler.plan(queue, workers)
    assert first == second
    assert placed(first) == placed(second)
    assert (queue, workers) == before
    assert placed(first) == [
        (2, "w3", ["w3-0"]),  # w2 and w3 have two free each: the T4s have less memory
        (3, "w1", []),  # none of w1's free GPUs is free for others: they are held for 7
        (4, "w3", ["w3-3"]),
        (5, "w2", ["w2-0", "w2-1"]),
    ]
    assert first.reserved == {"w1": 7}
    assert first.reasons == {
        7: not_enough(2, 4, "w1"),
        6: "waiting behind job 7: the GPUs of w1 are held for it",
        1: "no connected worker with its labels has 1 GPU of model 'v100'",
    }


def test_a_reserved_worker_still_gives_out_the_gpus_its_holder_cannot_use() -> None:
    # 4 A100s (2 free) and 2 free T4s on one box: a 4-A100 job holds the A100s only.
    gpus = make_gpus("box-a", 4, A100) + make_gpus("box-t", 2, T4, first_index=4)
    worker = make_worker("box", gpus=gpus, free=["box-a-0", "box-a-1", "box-t-4", "box-t-5"])
    queue = [
        make_job(1, gpus=4, gpu_model="A100"),
        make_job(2, gpus=1),  # any GPU: only a T4 is free for it
        make_job(3, gpus=1, gpu_model="t4"),
        make_job(4, gpus=1, gpu_model="a100"),  # behind the holder: waits
    ]
    result = scheduler.plan(queue, [worker])
    assert placed(result) == [(2, "box", ["box-t-4"]), (3, "box", ["box-t-5"])]
    assert result.reserved == {"box": 1}
    assert result.reasons[4] == "waiting behind job 1: the GPUs of box are held for it"


# --- the whole queue, shape by shape -------------------------------------------------------


def read_from(queue: list[models.Job], reads: list[tuple[str, int]]) -> reading.Read:
    """A `read` for plan_queue over this queue that notes each read (shape, count)."""

    def read(
        shape: str, priority: int, submitters: Sequence[str | None] | None, count: int
    ) -> list[models.Job]:
        reads.append((shape, count))
        jobs = [
            job
            for job in sorted(queue, key=lambda job: job.id)
            if job.spec.needs.shape == shape
            and job.spec.priority == priority
            and (submitters is None or job.spec.submitter in submitters)
        ]
        return jobs[:count]

    return read


def shapes_of(queue: list[models.Job]) -> dict[str, models.Needs]:
    return {job.spec.needs.shape: job.spec.needs for job in queue}


def groups_of(queue: list[models.Job]) -> list[QueueGroup]:
    """The queue's groups, as store.queue_groups gives them."""
    groups: dict[tuple[str, int, str | None], list[int]] = {}
    for job in queue:
        key = (job.spec.needs.shape, job.spec.priority, job.spec.submitter)
        groups.setdefault(key, []).append(job.id)
    return [QueueGroup(*key, len(ids), min(ids), max(ids)) for key, ids in groups.items()]


def plan_queue(
    queue: list[models.Job],
    workers: list[WorkerView],
    reads: list[tuple[str, int]] | None = None,
    matches: scheduler.Matches | None = None,
    sharing: fairshare.Snapshot | None = None,
) -> Plan:
    """reading.plan_queue over this queue, noting its reads in `reads`."""
    read = read_from(queue, [] if reads is None else reads)
    return reading.plan_queue(groups_of(queue), shapes_of(queue), read, workers, matches, sharing)


def random_case(rng: random.Random) -> tuple[list[models.Job], list[WorkerView]]:
    """A queue drawn from a few kinds of job (some that no worker can run) and 1-3 workers."""
    kinds = []
    for _ in range(rng.randint(1, 6)):
        gpus = rng.choice([0, 1, 1, 2, 3, 4, 64])
        fields: dict[str, Any] = {"gpus": gpus}
        fields["labels"] = rng.choice([{}, {}, {"zone": "eu"}, {"zone": "us"}, {"pool": "x"}])
        if gpus and rng.random() < 0.3:
            fields["gpu_model"] = rng.choice(["A100", "T4"])
        docker: dict[str, Any] = {"image": "busybox"}
        if rng.random() < 0.5:
            docker["command"] = ["true"]
        if rng.random() < 0.2:
            docker["mounts"] = ["datasets"]
        kinds.append({**fields, "docker": docker})
    jobs = [
        make_job(i, priority=rng.choice([0, 0, 1, 5]), **rng.choice(kinds))
        for i in range(1, rng.randint(0, 40) + 1)
    ]
    workers = []
    for index in range(rng.randint(1, 3)):
        gpus = make_gpus(f"w{index}", rng.randint(0, 4), rng.choice([A100, T4]))
        free = [gpu["uuid"] for gpu in gpus if rng.random() < 0.6]
        worker = WorkerView(
            name=f"w{index}",
            gpus=gpus,
            free=free,
            slots=rng.randint(0, 3),
            labels=rng.choice([{}, {"zone": "eu"}, {"zone": "us"}]),
            mounts=frozenset(rng.choice([(), ("datasets",)])),
            runtime=rng.choice(["docker", "docker", "process"]),
        )
        workers.append(worker)
    return sorted(jobs, key=lambda job: (-job.spec.priority, job.id)), workers


def test_plan_shapes_makes_the_plan_of_the_whole_queue_reading_only_part_of_it() -> None:
    rng = random.Random(19)
    skipped = 0  # jobs planned by their shape's reason rather than one by one, over all cases
    for case in range(500):
        queue, workers = random_case(rng)
        whole = scheduler.plan(queue, workers)
        reads: list[tuple[str, int]] = []
        matches = scheduler.Matches()
        result = plan_queue(queue, workers, reads, matches)
        again = plan_queue(queue, workers, None, matches)
        assert again == result, case  # the second from the matches kept from the first
        assert placed(result) == placed(whole), case
        assert result.reserved == whole.reserved, case
        for job in queue:
            shape = job.spec.needs.shape
            if job.id in result.reasons:
                assert result.reasons[job.id] == whole.reasons[job.id], case
            elif job.id in whole.reasons:
                assert result.shape_reasons[shape] == whole.reasons[job.id], case
                skipped += 1
        # a shape that no worker can run is never read
        assert all(any(w.can_ever_run(shapes_of(queue)[s]) for w in workers) for s, _ in reads)
    assert skipped > 1000


def test_500_jobs_no_worker_can_run_are_not_read_and_do_not_hold_back_one_that_can() -> None:
    queue = [make_job(i, gpus=64, priority=5) for i in range(1, 251)]
    queue += [make_job(i, gpus=1, labels={"pool": "x"}) for i in range(251, 501)]
    queue.append(make_job(501, gpus=1))
    reads: list[tuple[str, int]] = []
    workers = [make_worker("w1", count=2, slots=2)]
    result = plan_queue(queue, workers, reads)
    assert placed(result) == [(501, "w1", ["w1-0"])]
    assert result.reserved == {}
    assert reads == [(queue[-1].spec.needs.shape, 2 + 1 + 1)]  # slots, workers, one more
    assert result.shape_reasons == {
        queue[0].spec.needs.shape: "no connected worker with its labels has 64 GPUs",
        queue[250].spec.needs.shape: "no connected worker has the labels pool=x",
    }


def test_the_jobs_of_a_shape_past_those_planned_share_the_last_ones_reason() -> None:
    queue = [make_job(1, gpus=4)] + [make_job(i, gpus=1) for i in range(2, 100)]
    reads: list[tuple[str, int]] = []
    workers = [make_worker("w1", free=2, slots=4)]
    result = plan_queue(queue, workers, reads)
    assert placed(result) == []
    # Read: the jobs that could start (4-GPU: none fit in 2 free GPUs; 1-GPU: 2), the workers
    # they could hold (w1), and one more.
    assert reads == [(queue[0].spec.needs.shape, 0 + 1 + 1), (queue[1].spec.needs.shape, 4)]
    behind = "waiting behind job 1: the GPUs of w1 are held for it"
    assert result.reasons == {1: not_enough(2, 4, "w1"), **{i: behind for i in range(2, 6)}}
    assert result.shape_reasons == {queue[1].spec.needs.shape: behind}


def test_kept_matches_are_found_again_when_a_worker_changes() -> None:
    queue = [make_job(1, gpus=1, labels={"zone": "eu"}), make_job(2, gpus=8)]
    matches = scheduler.Matches()
    result = plan_queue(queue, [make_worker("w1")], None, matches)
    assert placed(result) == []
    eu = make_worker("w1", labels={"zone": "eu"})
    result = plan_queue(queue, [eu], None, matches)
    assert placed(result) == [(1, "w1", ["w1-0"])]
    bigger = make_worker("w2", count=8, free=0)
    result = plan_queue(queue, [eu, bigger], None, matches)
    assert result.reasons[2] == none_free(8, "w2")
    result = plan_queue(queue, [], None, matches)
    assert set(result.shape_reasons.values()) == {"no worker is connected"}


# --- the plan against the rule written the plain way ---------------------------------------


def plain_plan(queue: list[models.Job], workers: list[WorkerView]) -> Plan:
    """The scheduling rule written as plainly as it reads (each job looks at every worker):
    what scheduler.plan, which keeps heaps of workers to be fast, must agree with."""
    result = Plan()
    free = {w.name: list(w.free) for w in workers}
    slots = {w.name: w.slots for w in workers}
    info = {w.name: {gpu["uuid"]: gpu for gpu in w.gpus} for w in workers}
    holders: dict[str, models.Needs] = {}
    position = {job.id: index for index, job in enumerate(queue)}

    def suitable(worker: WorkerView, needs: models.Needs) -> list[str]:
        ordered = sorted(worker.gpus, key=lambda gpu: gpu.get("index", 0))
        return [g["uuid"] for g in ordered if g["uuid"] in free[worker.name] and needs.wants_gpu(g)]

    for job in queue:
        needs = job.spec.needs
        able = [w for w in workers if w.can_ever_run(needs)]
        if not able:
            result.reasons[job.id] = scheduler._no_worker(needs, workers)
            continue
        fits = []
        for worker in able:
            holder = holders.get(worker.name)
            if slots[worker.name] < (2 if holder else 1):
                continue
            found = suitable(worker, needs)
            if holder is not None:
                found = [u for u in found if not holder.wants_gpu(info[worker.name][u])]
            if len(found) >= needs.gpus:
                memory = sum(info[worker.name][u].get("memory_mb", 0) for u in found)
                fits.append((len(found), memory, worker.name, found))
        if fits:
            *_, name, found = min(fits, key=lambda fit: fit[:3])
            result.assignments.append(scheduler.Assignment(job, name, found[: needs.gpus]))
            free[name] = [u for u in free[name] if u not in found[: needs.gpus]]
            slots[name] -= 1
            continue
        if needs.gpus == 0:
            names = scheduler._listed([w.name for w in able])
            result.reasons[job.id] = f"waiting for a free job slot (max_jobs) on {names}"
            continue
        open_workers = [w for w in able if w.name not in result.reserved and suitable(w, needs)]
        if not open_workers:
            holders_ids = [result.reserved[w.name] for w in able if w.name in result.reserved]
            if not holders_ids:
                names = [w.name for w in able]
                where = names[0] if len(names) == 1 else f"any of {scheduler._listed(names)}"
                result.reasons[job.id] = none_free(needs.gpus, where)
                continue
            holder_id = min(holders_ids, key=position.__getitem__)
            held = scheduler._listed(
                [w.name for w in able if result.reserved.get(w.name) == holder_id]
            )
            reason = f"waiting behind job {holder_id}: the GPUs of {held} are held for it"
            result.reasons[job.id] = reason
            continue
        counts = {w.name: len(suitable(w, needs)) for w in open_workers}
        chosen = min(open_workers, key=lambda w: (-counts[w.name], w.name))
        result.reserved[chosen.name] = job.id
        holders[chosen.name] = needs
        if counts[chosen.name] >= needs.gpus:
            reason = f"waiting for a free job slot (max_jobs) on {chosen.name}"
        else:
            reason = not_enough(counts[chosen.name], needs.gpus, chosen.name)
        result.reasons[job.id] = reason
    return result


def big_case(rng: random.Random) -> tuple[list[models.Job], list[WorkerView]]:
    """A queue of up to 300 jobs of a few kinds on up to 40 workers of 0-8 GPUs, many free:
    many starts and reservations in one round."""
    kinds = [{"gpus": g} for g in (0, 1, 1, 2, 4, 8)] + [{"gpus": 1, "gpu_model": "T4"}]
    kinds.append({"gpus": 2, "labels": {"zone": "eu"}})
    jobs = [
        make_job(i, priority=rng.choice([0, 0, 1]), **rng.choice(kinds))
        for i in range(1, rng.randint(1, 300) + 1)
    ]
    workers = []
    for index in range(rng.randint(1, 40)):
        gpus = make_gpus(f"w{index}", rng.randint(0, 8), rng.choice([A100, T4, A100_40]))
        free = [gpu["uuid"] for gpu in gpus if rng.random() < 0.7]
        labels = rng.choice([{}, {"zone": "eu"}])
        workers.append(WorkerView(f"w{index}", gpus, free, rng.randint(0, 6), labels))
    return sorted(jobs, key=lambda job: (-job.spec.priority, job.id)), workers


def test_the_plan_is_the_rule_written_the_plain_way() -> None:
    rng = random.Random(25)
    for case in range(300):
        queue, workers = random_case(rng) if case % 2 else big_case(rng)
        fast, plain = scheduler.plan(queue, workers), plain_plan(queue, workers)
        assert placed(fast) == placed(plain), case
        assert fast.reserved == plain.reserved, case
        assert fast.reasons == plain.reasons, case
