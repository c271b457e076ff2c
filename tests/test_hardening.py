"""Attacks a job's submitter could make on the worker's box, each made for real (issue 19):
unbounded containers.

Real coordinator, real worker, real containers from the local busybox image.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest

from gpubox import config as cfg
from gpubox import errors
from gpubox.worker.policy import ContainerPolicy
from gpubox.worker.runner import DockerRuntime
from tests.conftest import IMAGE, Cluster

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

WAIT_S = 120
MiB = 1024**2


def start_worker(cluster: Cluster, **settings: Any) -> str:
    """Start a worker with a name no other test uses (tests of other checkouts may share this
    Docker engine, and remove the containers of workers by name); its name."""
    name = f"hardening-{uuid.uuid4().hex[:8]}"
    cluster.add_worker(name=name, **settings)
    return name


def wire_job(command: list[str], **container: Any) -> dict[str, Any]:
    """A job as a worker receives it, with an id no other test uses."""
    return {
        "id": 1_000_000 + uuid.uuid4().int % 1_000_000_000,
        "attempt": 1,
        "name": "hardening-test",
        "image": IMAGE,
        "command": command,
        "env": {},
        "secrets": {},
        "auth": None,
        "gpus": [],
        "timeout": None,
        "first_seq": 1,
        "container": {"mounts": [], **container},
    }


@pytest.fixture()
def worker_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A worker name of this test alone; its containers are removed afterwards."""
    name = f"htest-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_client.api.containers(
        all=True, filters={"label": f"io.gpubox.worker={name}"}
    ):
        docker_client.api.remove_container(container["Id"], force=True, v=True)


# --- finding 7: containers without limits -----------------------------------------------------


def test_job_containers_get_no_new_privileges_a_pids_limit_and_no_mknod(
    docker_client: docker.DockerClient, worker_name: str
):
    runtime = DockerRuntime(worker_name, client=docker_client, gpu_devices=False)
    job = wire_job(["true"])
    container = docker_client.containers.create(IMAGE, **runtime.container_spec(job))
    try:
        container.reload()
        host = container.attrs["HostConfig"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["PidsLimit"] == 4096
        assert host["CapDrop"] == ["MKNOD"]
        assert not host.get("CapAdd") and host["Privileged"] is False
    finally:
        container.remove(force=True)


@pytest.mark.slow
def test_a_fork_bomb_stops_at_the_pids_limit_and_privileges_stay_as_they_were(
    make_cluster: Callable[..., Cluster],
):
    cluster = make_cluster(workers=0)
    start_worker(cluster, pids_limit=64)
    # Start 200 sleeps; a fork refused ends the subshell. Then count and end them with
    # shell builtins only (anything else needs a process, which the limit may not allow).
    script = (
        "( i=0; while [ $i -lt 200 ]; do sleep 60 & echo $! >> /tmp/pids; i=$((i+1)); done )"
        " 2>/dev/null; n=0; while read p; do kill $p; n=$((n+1)); done < /tmp/pids;"
        " echo started $n; grep NoNewPrivs /proc/self/status;"
        " mknod /tmp/zero c 1 5 2>/dev/null && echo mknod worked || echo mknod refused"
    )
    job = cluster.submit(IMAGE, ["sh", "-c", script])
    done = cluster.wait(job["id"], timeout_s=WAIT_S)
    lines = [r["line"] for r in cluster.lines(job["id"])]
    assert done["status"] == "FINISHED", (done, lines)
    started = int(lines[0].split()[1])
    assert 10 < started < 64, lines  # docker-init, sh and the subshell count too
    assert lines[1:] == ["NoNewPrivs:\t1", "mknod refused"]


@pytest.mark.slow
def test_shm_size_over_the_workers_cap_ends_the_job_with_a_clear_error(
    make_cluster: Callable[..., Cluster],
):
    cluster = make_cluster(workers=0)
    start_worker(cluster)  # max_shm_size: half of this host's memory
    big = cluster.submit(IMAGE, ["true"], docker={"shm_size": "1t"})
    small = cluster.submit(IMAGE, ["sh", "-c", "df -k /dev/shm"], docker={"shm_size": "32m"})
    done = cluster.wait(big["id"], timeout_s=WAIT_S)
    assert done["status"] == "ERROR", done
    assert re.fullmatch(
        r"docker\.shm_size of 1024 GiB is more than this worker allows"
        r" \(max_shm_size, [0-9]+ [GM]iB\)",
        done["result"]["error"],
    ), done["result"]
    assert done["result"]["executed_at"] is None
    done = cluster.wait(small["id"], timeout_s=WAIT_S)
    assert done["status"] == "FINISHED", done
    assert cluster.lines(small["id"])[-1]["line"].split()[1] == str(32 * 1024)
    # The worker is still there for the next job.
    again = cluster.submit(IMAGE, ["true"])
    assert cluster.wait(again["id"], timeout_s=WAIT_S)["status"] == "FINISHED"


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        ({"pids_limit": -1}, "pids_limit"),
        ({"max_shm_size": "lots"}, "max_shm_size"),
        ({"max_shm_size": "1k"}, "max_shm_size"),
        ({"cap_drop": "MKNOD,no such"}, "cap_drop"),
    ],
)
def test_bad_limits_are_config_errors_naming_the_setting(settings: dict[str, Any], name: str):
    with pytest.raises(errors.ConfigError, match=f"^{name}: "):
        cfg.load(cfg.WorkerConfig, settings)


def test_limit_settings_become_the_policy():
    settings = {
        "pids_limit": "100",
        "max_shm_size": "16g",
        "cap_drop": "mknod, CAP_NET_RAW",
    }
    made = ContainerPolicy.from_config(cfg.load(cfg.WorkerConfig, settings))
    assert made == ContainerPolicy(100, 16 * 1024**3, ("MKNOD", "NET_RAW"))
    default = ContainerPolicy.from_config(cfg.load(cfg.WorkerConfig))
    assert default == ContainerPolicy()
    assert default.max_shm_size == cfg.half_the_memory() > 0
    assert "pids_limit" not in ContainerPolicy(pids_limit=0).create_options(None)
    small = ContainerPolicy(max_shm_size=64 * MiB)
    assert small.create_options(64 * MiB)["security_opt"] == ["no-new-privileges"]
    with pytest.raises(ValueError) as refused:
        small.create_options(64 * MiB + 1)
    assert str(refused.value) == (
        "docker.shm_size of 67108865 bytes is more than this worker allows (max_shm_size, 64 MiB)"
    )
