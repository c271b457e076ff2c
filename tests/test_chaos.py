"""120 short jobs over three workers while one of them is killed (-9) and started again twice:
every job ends exactly once with every line once, and no container is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import test_recovery
from tests.conftest import IMAGE, Cluster, wait_until
from tests.test_recovery import Process, worker_env

# Serial: beside the other slow tests it took 53-57 s instead of 36, and slowed them past
# their own limits. (It looks only at its own coordinator's containers.)
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(360)]

JOBS = 120
processes = test_recovery.processes  # the fixture that stops worker processes afterwards


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    """One backend is enough here: the store's part is proven on both elsewhere."""
    return f"sqlite:///{tmp_path}/gpubox.db"


def test_120_jobs_while_a_worker_is_killed_twice(
    make_cluster,
    processes,
    docker_client,
    tmp_path,
):
    # Liveness longer than a worker process's restart on a busy 2-core machine (~2-4 s):
    # the victim must come back before its jobs are declared lost.
    cluster: Cluster = make_cluster(workers=2, liveness_s=10.0)
    state = cluster.coordinator.config.state_dir
    env = worker_env(state, "proc-w3", cluster.coordinator.link_endpoint)
    victim = Process(["worker"], {**env, "GPUBOX_LIVENESS": "10"}, tmp_path / "victim.log")
    processes.append(victim)
    jobs = [
        cluster.submit(IMAGE, ["sh", "-c", f"echo job-{i}; sleep 0.1; echo two"])
        for i in range(JOBS)
    ]
    for kill_after in (JOBS // 4, JOBS // 2):
        wait_until(lambda n=kill_after: finished(cluster) >= n, 180, f"{kill_after} jobs done")
        victim.kill9()
        victim.start()
    wait_until(lambda: ended(cluster) == JOBS, 300, "every job to end")
    for index, job in enumerate(jobs):
        done = cluster.client.job(job["id"])
        assert done["status"] == "FINISHED", done
        assert [r["line"] for r in cluster.lines(job["id"])] == [f"job-{index}", "two"]
    ran_on = {cluster.client.job(j["id"])["worker"] for j in jobs}
    assert "proc-w3" in ran_on  # the victim did take part
    workers = ("worker-1", "worker-2", "proc-w3")

    owner = test_recovery.owner_of(state)  # this cluster's, not another test's beside it

    def left() -> list[str]:
        return [
            f"{c['Labels']} {c['State']}"
            for name in workers
            for c in docker_client.api.containers(
                all=True,
                filters={"label": [f"io.gpubox.worker={name}", f"io.gpubox.coordinator={owner}"]},
            )
        ]

    wait_until(lambda: not left(), 30, "no container left")
    assert left() == []


def finished(cluster: Cluster) -> int:
    return sum(1 for _ in iter_status(cluster, "FINISHED"))


def ended(cluster: Cluster) -> int:
    return sum(1 for s in ("FINISHED", "ERROR", "CANCELLED") for _ in iter_status(cluster, s))


def iter_status(cluster: Cluster, status: str):  # type: ignore[no-untyped-def]
    before = None
    while True:
        page = cluster.client.jobs(status=status, limit=1000, before=before)
        yield from page["jobs"]
        before = page["next"]
        if before is None:
            return
