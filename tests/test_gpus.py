"""End to end: GPU scheduling on workers with fake GPUs (real coordinator, real containers).

Fake-GPU workers give containers NVIDIA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER but no device
request, so a container can say which GPUs it was given. Jobs that must stay running wait on a
gate: a file in a folder the worker mounts into them, which the test creates to let them end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpubox.client import ApiError
from gpubox.worker import gpu
from tests.conftest import IMAGE, Cluster, wait_until

pytestmark = pytest.mark.slow

TIMEOUT_S = 60.0  # another suite may share this machine's two cores and its Docker engine
A100 = "NVIDIA A100-SXM4-80GB:81920"
T4 = "Tesla T4:15360"
# Prints the GPUs it was given, then waits for its gate file.
GATED = (
    'echo "$NVIDIA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER";'
    ' until [ -e "/gate/$GATE" ]; do sleep 0.1; done'
)


class Gates:
    """A host folder mounted read-only as /gate; a job ends once its gate file exists."""

    def __init__(self, tmp_path: Path) -> None:
        self.folder = tmp_path / "gates"
        self.folder.mkdir()
        self.mount = f"gate={self.folder}:/gate"

    def submit(self, cluster: Cluster, gate: str, **fields: Any) -> dict[str, Any]:
        return cluster.submit(
            IMAGE,
            ["sh", "-c", GATED],
            name=gate,
            docker={"mounts": ["gate"], "env": {"GATE": gate}},
            **fields,
        )

    def open(self, gate: str) -> None:
        (self.folder / gate).touch()


def uuids(worker: str, count: int) -> list[str]:
    return [f"GPU-fake-{worker}-{i:04d}" for i in range(count)]


def started(cluster: Cluster, job_id: int) -> dict[str, Any]:
    """The job once its container runs (executed_at set) and has printed its first line."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (
            (job := cluster.client.job(job_id))["status"] == "RUNNING"
            and job["result"]["executed_at"]
            and cluster.lines(job_id)
            and job
        ),
        TIMEOUT_S,
        f"job {job_id}'s container to start",
    )


def queued_with(cluster: Cluster, job_id: int, reason: str) -> dict[str, Any]:
    """The job once it is QUEUED with exactly this queue_reason (the last one seen on failure)."""
    seen: dict[str, Any] = {}

    def queued() -> dict[str, Any] | None:
        seen.update(cluster.client.job(job_id))
        return seen if seen["status"] == "QUEUED" and seen["queue_reason"] == reason else None

    return wait_until(  # type: ignore[no-any-return]
        queued,
        TIMEOUT_S,
        lambda: (
            f"job {job_id} to be QUEUED because {reason!r}; it is {seen.get('status')}"
            f" because {seen.get('queue_reason')!r}"
        ),
        every_s=0.05,
    )


def printed(cluster: Cluster, job_id: int) -> list[str]:
    return [record["line"] for record in cluster.lines(job_id)]


def not_enough(free: int, needs: int, worker: str) -> str:
    return (
        f"not enough free GPUs: {free} of the {needs} it needs are free on {worker},"
        " which holds them for this job as others end"
    )


def none_free(needs: int, worker: str) -> str:
    """The reason of a job that holds no worker: none has a GPU free that suits it."""
    return f"not enough free GPUs: 0 of the {needs} it needs are free on {worker}"


@pytest.mark.docker
def test_one_gpu_jobs_share_a_worker_one_gpu_each_and_the_next_waits_for_one(
    make_cluster: Callable[..., Cluster], tmp_path: Path
):
    gates = Gates(tmp_path)
    cluster = make_cluster(workers=0)
    cluster.add_worker(name="quad", fake_gpus="4", max_jobs=8, mounts=gates.mount)
    first = [gates.submit(cluster, f"one-{i}", gpus=1)["id"] for i in range(4)]
    running = [started(cluster, job_id) for job_id in first]

    fifth = gates.submit(cluster, "five", gpus=1)["id"]
    queued_with(cluster, fifth, none_free(1, "quad"))
    # All four at once: each still running (its gate shut) while the fifth waits.
    now = [cluster.client.job(job_id) for job_id in first]
    assert [job["status"] for job in now] == ["RUNNING"] * 4
    assert [job["worker"] for job in now] == ["quad"] * 4
    # One GPU each, taken in index order, and each container saw exactly its own.
    assert [job["result"]["gpus"] for job in running] == [[u] for u in uuids("quad", 4)]
    for job in running:
        assert printed(cluster, job["id"]) == [f"{job['result']['gpus'][0]} PCI_BUS_ID"]

    gates.open("one-1")  # frees GPU-fake-quad-0001
    assert cluster.wait(first[1])["status"] == "FINISHED"
    job = started(cluster, fifth)
    assert job["worker"] == "quad" and job["result"]["gpus"] == ["GPU-fake-quad-0001"]
    assert printed(cluster, fifth) == ["GPU-fake-quad-0001 PCI_BUS_ID"]
    assert job["result"]["executed_at"] >= cluster.client.job(first[1])["result"]["finished_at"]

    for gate in ("one-0", "one-2", "one-3", "five"):
        gates.open(gate)
    for job_id in [*first, fifth]:
        assert cluster.wait(job_id)["status"] == "FINISHED"


@pytest.mark.docker
def test_a_big_job_is_not_overtaken_forever_by_smaller_lower_priority_jobs(
    make_cluster: Callable[..., Cluster], tmp_path: Path
):
    gates = Gates(tmp_path)
    cluster = make_cluster(workers=0)
    cluster.add_worker(name="quad", fake_gpus="4", max_jobs=8, mounts=gates.mount)
    busy = [gates.submit(cluster, f"busy-{i}", gpus=1)["id"] for i in range(4)]
    for job_id in busy:
        started(cluster, job_id)

    big = gates.submit(cluster, "big", gpus=4, priority=1)["id"]
    queued_with(cluster, big, none_free(4, "quad"))
    behind = f"waiting behind job {big}: the GPUs of quad are held for it"
    echo = ["sh", "-c", 'echo "$NVIDIA_VISIBLE_DEVICES"']
    small = [cluster.submit(IMAGE, echo, name="small", gpus=1)["id"]]
    # No GPU of quad is free: it is held for no one yet, so both wait alike.
    queued_with(cluster, small[0], none_free(1, "quad"))

    # A job needing no GPU may use a spare slot meanwhile.
    cpu = cluster.submit(IMAGE, ["echo", "no gpu"], name="cpu")["id"]
    done = cluster.wait(cpu)
    assert done["status"] == "FINISHED" and done["worker"] == "quad"
    assert done["result"]["gpus"] == [] and printed(cluster, cpu) == ["no gpu"]
    assert cluster.client.job(big)["status"] == "QUEUED"

    # The busy jobs end one by one while more small jobs keep arriving; every freed GPU is
    # held for the big job, none goes to a small one.
    for freed, job_id in enumerate(busy, start=1):
        gates.open(f"busy-{freed - 1}")
        assert cluster.wait(job_id)["status"] == "FINISHED"
        if freed < 4:
            queued_with(cluster, big, not_enough(freed, 4, "quad"))
            for small_id in small:
                queued_with(cluster, small_id, behind)
            small.append(cluster.submit(IMAGE, echo, name="small", gpus=1)["id"])
            queued_with(cluster, small[-1], behind)

    job = started(cluster, big)
    assert job["worker"] == "quad" and job["result"]["gpus"] == uuids("quad", 4)
    assert printed(cluster, big) == [",".join(uuids("quad", 4)) + " PCI_BUS_ID"]
    last_busy_end = max(cluster.client.job(j)["result"]["finished_at"] for j in busy)
    assert job["result"]["executed_at"] >= last_busy_end
    assert [cluster.client.job(j)["status"] for j in small] == ["QUEUED"] * len(small)

    gates.open("big")
    big_done = cluster.wait(big)
    assert big_done["status"] == "FINISHED"
    for small_id in small:
        done = cluster.wait(small_id)
        assert done["status"] == "FINISHED" and done["worker"] == "quad"
        assert small_id > big  # submitted behind the big job …
        assert done["result"]["executed_at"] > big_done["result"]["finished_at"]  # … ran after
        assert printed(cluster, small_id) == done["result"]["gpus"]
        assert len(done["result"]["gpus"]) == 1


@pytest.mark.docker
def test_gpu_model_and_memory_route_jobs_to_the_workers_that_have_them(
    make_cluster: Callable[..., Cluster],
):
    cluster = make_cluster(workers=0)
    cluster.add_worker(name="big", fake_gpus=f"2*{A100}")
    cluster.add_worker(name="small", fake_gpus=f"2*{T4}")
    echo = ["sh", "-c", 'echo "$NVIDIA_VISIBLE_DEVICES"']
    # (what the job asks for, gpus 1 unless it says; the workers that may run it)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"gpu_model": "a100"}, {"big"}),  # case-insensitive, part of the NVML name
        ({"gpu_model": "T4"}, {"small"}),
        ({"gpu_memory_gb": 40}, {"big"}),
        ({"gpu_memory_gb": 16.2}, {"big"}),  # 15,360 MiB is 16.1 GB
        ({"gpu_memory_gb": 16}, {"small"}),  # fits both: best fit keeps the A100s
        ({"gpu_model": "tesla", "gpu_memory_gb": 15}, {"small"}),
        ({"gpu_model": "A100", "gpus": 2}, {"big"}),
        ({"gpu_model": "t4", "gpus": 2}, {"small"}),
    ]
    for fields, workers in cases:
        spec = {"gpus": 1, **fields}
        job = cluster.wait(cluster.submit(IMAGE, echo, **spec)["id"])
        assert job["status"] == "FINISHED", (spec, job)
        assert job["worker"] in workers, (spec, job)
        gpus = job["result"]["gpus"]
        assert len(gpus) == spec["gpus"] and set(gpus) <= set(uuids(job["worker"], 2)), spec
        assert printed(cluster, job["id"]) == [",".join(gpus)], spec

    never = {
        "no connected worker with its labels has 1 GPU with 100 GB or more": {
            "gpus": 1,
            "gpu_memory_gb": 100,
        },
        "no connected worker with its labels has 1 GPU of model 'H100'": {
            "gpus": 1,
            "gpu_model": "H100",
        },
        "no connected worker with its labels has 3 GPUs of model 'a100'": {
            "gpus": 3,
            "gpu_model": "a100",
        },
        "no connected worker with its labels has 2 GPUs of model 'T4' with 20 GB or more": {
            "gpus": 2,
            "gpu_model": "T4",
            "gpu_memory_gb": 20,
        },
    }
    waiting = {reason: cluster.submit(IMAGE, echo, **spec)["id"] for reason, spec in never.items()}
    for reason, job_id in waiting.items():
        job = queued_with(cluster, job_id, reason)
        assert job["worker"] is None and job["attempts"] == 0

    for field, value in (("gpu_model", "A100"), ("gpu_memory_gb", 40)):
        with pytest.raises(ApiError) as caught:
            cluster.submit(IMAGE, echo, **{field: value})
        assert (caught.value.status, caught.value.code) == (400, "bad_input")
        assert caught.value.field == field
        assert caught.value.message == f"{field} needs gpus of 1 or more"


@pytest.mark.docker
def test_workers_endpoint_shows_each_gpu_with_its_usage_and_the_mounts(
    make_cluster: Callable[..., Cluster], tmp_path: Path, nosuid_dir: Path
):
    (tmp_path / "data").mkdir()
    cluster = make_cluster(workers=0)
    cluster.add_worker(
        name="box",
        fake_gpus=f"{A100},{T4}",
        mounts=f"scratch={nosuid_dir}:/scratch:rw,data={tmp_path}/data",
    )
    expected = [
        {
            "uuid": "GPU-fake-box-0000",
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_mb": 81920,
            "index": 0,
            "pci_bus_id": "00000000:01:00.0",
            "memory_used_mb": 0,
            "utilization": 0,
            "power_w": None,  # made-up GPUs read none without a readings file
            "temperature_c": None,
        },
        {
            "uuid": "GPU-fake-box-0001",
            "name": "Tesla T4",
            "memory_mb": 15360,
            "index": 1,
            "pci_bus_id": "00000000:02:00.0",
            "memory_used_mb": 0,
            "utilization": 0,
            "power_w": None,  # made-up GPUs read none without a readings file
            "temperature_c": None,
        },
    ]
    # Usage (memory used, utilization, power, temperature) comes with the worker's heartbeats.
    (worker,) = wait_until(
        lambda: (
            (answer := cluster.client.workers()["workers"])
            and all("utilization" in g for g in answer[0]["gpus"])
            and answer
        ),
        TIMEOUT_S,
        "a heartbeat with GPU usage",
    )
    assert worker["name"] == "box" and worker["connected"] is True
    assert worker["gpus"] == expected
    assert worker["mounts"] == ["data", "scratch"]
    assert worker["running_jobs"] == []


# --- `gpubox gpus` ------------------------------------------------------------------------------


def gpus_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBOX_")}
    env.update(
        GPUBOX_FAKE_GPUS=f"2*{A100}",
        GPUBOX_WORKER_NAME="box",
        GPUBOX_STATE_DIR=str(tmp_path / "state"),
    )
    return subprocess.run(
        [sys.executable, "-m", "gpubox", "gpus", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def table(stdout: str) -> list[list[str]]:
    """The command's rows, split into cells (cells are padded, two spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()]


HEADER = ["INDEX", "UUID", "NAME", "MEMORY", "PCI BUS ID", "USED", "UTIL"]


def test_gpus_command_prints_a_row_per_gpu_and_names_a_missing_index(tmp_path: Path):
    shown = gpus_command(tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = table(shown.stdout)
    assert rows[0] == HEADER
    assert [row[:1] + row[2:] for row in rows[1:]] == [
        ["0", "NVIDIA A100-SXM4-80GB", "81920 MiB", "00000000:01:00.0", "0 MiB", "0 %"],
        ["1", "NVIDIA A100-SXM4-80GB", "81920 MiB", "00000000:02:00.0", "0 MiB", "0 %"],
    ]
    # The UUIDs themselves: see test_gpus_command_prints_the_uuids_the_worker_offers.
    assert all(re.fullmatch(r"GPU-fake-(box-)?000[01]", row[1]) for row in rows[1:])
    assert [row[1][-4:] for row in rows[1:]] == ["0000", "0001"]

    second = gpus_command(tmp_path, "--gpus", "1")
    assert second.returncode == 0, second.stderr
    assert table(second.stdout) == [HEADER, rows[2]]

    none = gpus_command(tmp_path, "--gpus", "none")
    assert none.returncode == 0 and none.stdout == ""
    assert "no GPUs offered" in none.stderr

    missing = gpus_command(tmp_path, "--gpus", "0,5")
    assert missing.returncode == 2 and missing.stdout == ""
    assert "gpus: no GPU with index 5 (found 2)" in missing.stderr


def test_gpus_command_prints_the_uuids_the_worker_offers(tmp_path: Path):
    shown = gpus_command(tmp_path)
    assert shown.returncode == 0, shown.stderr
    offered = [g.uuid for g in gpu.FakeGpus(f"2*{A100}", "box").list()]
    assert offered == uuids("box", 2)
    assert [row[1] for row in table(shown.stdout)[1:]] == offered
    assert "GPU-fake-box-0000" in shown.stdout
