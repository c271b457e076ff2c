"""What a job gets from its container: GPUs (device request + environment), host folders by
name, /dev/shm, memory limit, working directory and user; and how submissions of these options
are checked. Real Docker engine, real containers from the local busybox image.

The engine the tests usually run on has no NVIDIA runtime: a container with a GPU device
request can be created there (so its spec is checked on the real engine) but not started. The
parts that start GPU containers run only where the engine has the NVIDIA runtime.
"""

from __future__ import annotations

import io
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpubox import protocol, validate
from gpubox.client import ApiError
from gpubox.config import Mount
from gpubox.worker.docker_runtime import (
    LABEL,
    WORKER_LABEL,
    DockerRuntime,
    JobRefused,
    repo_digest,
)
from tests.conftest import IMAGE, Cluster, wait_until
from tests.conftest import wire_job as make_wire_job

pytestmark = pytest.mark.timeout(300)

# Generous: another suite may be running containers on the same small machine.
WAIT_S = 120
MiB = 1024**2


def has_nvidia_runtime(client: docker.DockerClient) -> bool:
    """Whether this engine can give containers GPUs: an "nvidia" runtime, or the NVIDIA hook
    that dockerd registers as the GPU device driver when it finds it on its PATH (the engine
    here is local)."""
    runtimes = client.info().get("Runtimes") or {}
    return "nvidia" in runtimes or shutil.which("nvidia-container-runtime-hook") is not None


def wire_job(
    gpus: list[str], command: list[str] | None = None, **container: Any
) -> protocol.WireJob:
    """A job as a worker receives it (protocol.wire_job), with an id no other test uses."""
    return make_wire_job(
        name="container-test",
        command=command or ["true"],
        env={"FROM_ENV": "yes"},
        gpus=gpus,
        container={"mounts": [], **container},
    )


@pytest.fixture()
def worker_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A worker name of this test alone; its containers are removed afterwards."""
    name = f"ctest-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{WORKER_LABEL}={name}"}
    ):
        container.remove(force=True)


def env_of(container: Any) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in container.attrs["Config"]["Env"] or [])


# --- the container spec, on the real engine -------------------------------------------------


@pytest.mark.docker
def test_two_gpu_job_container_carries_its_uuids_in_device_request_and_env(
    docker_client: docker.DockerClient, worker_name: str
):
    runtime = DockerRuntime(worker_name, client=docker_client, tee=io.StringIO(), gpu_devices=True)
    job = wire_job(["GPU-aaaa", "GPU-bbbb"])
    spec = runtime.container_spec(job)
    container = docker_client.containers.create(IMAGE, **spec)
    try:
        container.reload()
        requests = container.attrs["HostConfig"]["DeviceRequests"]
        assert len(requests) == 1, requests
        request = requests[0]
        assert request["DeviceIDs"] == ["GPU-aaaa", "GPU-bbbb"]
        assert request["Capabilities"] == [["gpu"]]
        assert request.get("Count") in (0, None)  # the UUIDs, not "any N GPUs"
        assert request.get("Driver") in ("", None)
        env = env_of(container)
        assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["FROM_ENV"] == "yes"
        labels = container.labels
        assert labels[LABEL] == str(job.id)
        assert labels[f"{LABEL}.attempt"] == "1"
        assert labels[f"{LABEL}.gpus"] == "GPU-aaaa,GPU-bbbb"
        assert labels[WORKER_LABEL] == worker_name
        assert container.attrs["HostConfig"]["Init"] is True
        assert container.attrs["Config"]["Cmd"] == ["true"]
        # Starting it needs the NVIDIA runtime and GPUs with these UUIDs, which made-up UUIDs
        # never are: the GPU part runs only where the engine has the NVIDIA runtime, in
        # test_gpu_container_sees_exactly_its_gpus_where_the_engine_has_the_nvidia_runtime.
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_without_gpu_devices_the_container_gets_the_environment_only(
    docker_client: docker.DockerClient, worker_name: str
):
    runtime = DockerRuntime(worker_name, client=docker_client, tee=io.StringIO(), gpu_devices=False)
    spec = runtime.container_spec(wire_job(["GPU-aaaa", "GPU-bbbb"]))
    assert "device_requests" not in spec
    container = docker_client.containers.create(IMAGE, **spec)
    try:
        container.reload()
        assert not container.attrs["HostConfig"].get("DeviceRequests")
        env = env_of(container)
        assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert container.labels[f"{LABEL}.gpus"] == "GPU-aaaa,GPU-bbbb"
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_job_without_gpus_gets_no_device_request_and_sees_no_gpu(
    docker_client: docker.DockerClient, worker_name: str
):
    runtime = DockerRuntime(worker_name, client=docker_client, tee=io.StringIO(), gpu_devices=True)
    spec = runtime.container_spec(wire_job([]))
    assert "device_requests" not in spec
    container = docker_client.containers.create(IMAGE, **spec)
    try:
        container.reload()
        assert not container.attrs["HostConfig"].get("DeviceRequests")
        env = env_of(container)
        # "void": no GPU even where the engine's default runtime is nvidia
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and "CUDA_DEVICE_ORDER" not in env
        assert container.labels[f"{LABEL}.gpus"] == ""
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_container_options_reach_the_engine(
    docker_client: docker.DockerClient, worker_name: str, tmp_path: Path, nosuid_dir: Path
):
    (tmp_path / "d").mkdir()
    mounts = {
        "datasets": Mount("datasets", str(tmp_path / "d"), "/mnt/datasets", read_only=True),
        "scratch": Mount("scratch", str(nosuid_dir), "/scratch", read_only=False),
    }
    runtime = DockerRuntime(
        worker_name, client=docker_client, tee=io.StringIO(), mounts=mounts, gpu_devices=False
    )
    job = wire_job(
        [],
        shm_size=256 * MiB,
        memory=64 * MiB,
        workdir="/tmp/work",
        user="1234:1234",
        mounts=["datasets", "scratch"],
    )
    container = docker_client.containers.create(IMAGE, **runtime.container_spec(job))
    try:
        container.reload()
        host, config = container.attrs["HostConfig"], container.attrs["Config"]
        assert host["ShmSize"] == 256 * MiB
        assert host["Memory"] == 64 * MiB
        assert config["WorkingDir"] == "/tmp/work"
        assert config["User"] == "1234:1234"
        binds = {
            m["Target"]: (m["Source"], m["Type"], m.get("ReadOnly", False)) for m in host["Mounts"]
        }
        assert binds == {
            "/mnt/datasets": (str(tmp_path / "d"), "bind", True),
            "/scratch": (str(nosuid_dir), "bind", False),
        }
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_undeclared_mount_is_refused_before_any_container_exists(
    docker_client: docker.DockerClient, worker_name: str, tmp_path: Path
):
    mounts = {"datasets": Mount("datasets", str(tmp_path), "/mnt/datasets")}
    runtime = DockerRuntime(
        worker_name, client=docker_client, tee=io.StringIO(), mounts=mounts, gpu_devices=False
    )
    with pytest.raises(JobRefused, match="nope"):
        runtime.container_spec(wire_job([], mounts=["datasets", "nope"]))
    events: list[tuple[str, dict]] = []
    runtime.run(
        wire_job([], mounts=["nope"]),
        lambda kind, body: events.append((kind, body)),
        threading.Event(),
    )
    assert [kind for kind, _ in events] == ["done"]
    assert events[0][1]["status"] == "ERROR"
    assert "nope" in events[0][1]["error"]
    assert not docker_client.containers.list(
        all=True, filters={"label": f"{WORKER_LABEL}={worker_name}"}
    )


# --- starting a GPU container ---------------------------------------------------------------


@pytest.mark.docker
def test_gpu_job_on_an_engine_without_the_nvidia_runtime_fails_saying_what_to_install(
    docker_client: docker.DockerClient, worker_name: str
):
    if has_nvidia_runtime(docker_client):
        pytest.skip("this engine has the NVIDIA runtime: GPU containers start here")
    runtime = DockerRuntime(
        worker_name, stop_grace_s=1, client=docker_client, tee=io.StringIO(), gpu_devices=True
    )
    job = wire_job(["GPU-0000-test"], ["sh", "-c", "echo should-not-run"])
    events: list[tuple[str, dict]] = []
    runtime.run(job, lambda kind, body: events.append((kind, body)), threading.Event())
    kinds = [kind for kind, _ in events]
    assert kinds == ["done"], events  # never "started", no lines
    done = events[-1][1]
    assert done["status"] == "ERROR"
    assert "NVIDIA Container Toolkit" in done["error"]
    assert "could not select device driver" in done["error"]
    assert done["exit_code"] is None and done["executed_at"] is None
    assert done["last_seq"] == 0
    left = docker_client.containers.list(
        all=True,
        filters={"label": [f"{LABEL}={job.id}", f"{WORKER_LABEL}={worker_name}"]},
    )
    assert left == []


@pytest.mark.docker
def test_gpu_container_sees_exactly_its_gpus_where_the_engine_has_the_nvidia_runtime(
    docker_client: docker.DockerClient, worker_name: str
):
    if not has_nvidia_runtime(docker_client):
        pytest.skip("the GPU part runs only where the engine has the NVIDIA runtime")
    from gpubox.worker.gpu import NvmlGpus

    gpus = NvmlGpus().list()[:2]
    if not gpus:
        pytest.skip("the engine has the NVIDIA runtime but NVML shows no GPU")
    runtime = DockerRuntime(worker_name, client=docker_client, tee=io.StringIO(), gpu_devices=True)
    script = 'echo "$NVIDIA_VISIBLE_DEVICES"; ls /dev | grep -c "^nvidia[0-9][0-9]*$"'
    job = wire_job([g.uuid for g in gpus], ["sh", "-c", script])
    events: list[tuple[str, dict]] = []
    runtime.run(job, lambda kind, body: events.append((kind, body)), threading.Event())
    done = events[-1][1]
    assert events[-1][0] == "done" and done["status"] == "FINISHED", events
    lines = [line[2] for kind, body in events if kind == "lines" for line in body["lines"]]
    assert lines == [",".join(g.uuid for g in gpus), str(len(gpus))]


# --- end to end: mounts ---------------------------------------------------------------------


@pytest.mark.docker
def test_mounts_end_to_end(make_cluster: Callable[..., Cluster], tmp_path: Path, nosuid_dir: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "file").write_text("hello from the host\n")
    scratch = nosuid_dir
    cluster = make_cluster(workers=0)
    # Without the mount rule the scheduler would pick "aa-bare" (same free GPUs, name first).
    cluster.add_worker(name="aa-bare")
    cluster.add_worker(name="zz-mounts", mounts=f"datasets={data},scratch={scratch}:/scratch:rw")
    wait_until(
        lambda: (
            {w["name"]: w["mounts"] for w in cluster.client.workers()["workers"]}.get("zz-mounts")
            == ["datasets", "scratch"]
        ),
        30,
        "the coordinator to store zz-mounts's mounts",
    )

    plain = cluster.submit(IMAGE, ["true"])
    assert cluster.wait(plain["id"], timeout_s=WAIT_S)["worker"] == "aa-bare"

    read = cluster.submit(IMAGE, ["cat", "/mnt/datasets/file"], docker={"mounts": ["datasets"]})
    write_ro = cluster.submit(IMAGE, ["touch", "/mnt/datasets/x"], docker={"mounts": ["datasets"]})
    write_rw = cluster.submit(
        IMAGE, ["sh", "-c", "echo written > /scratch/out"], docker={"mounts": ["scratch"]}
    )
    assert read["docker"]["mounts"] == ["datasets"]

    done = cluster.wait(read["id"], timeout_s=WAIT_S)
    assert done["status"] == "FINISHED", done
    assert done["worker"] == "zz-mounts"
    assert [r["line"] for r in cluster.lines(read["id"])] == ["hello from the host"]

    done = cluster.wait(write_ro["id"], timeout_s=WAIT_S)
    assert done["status"] == "ERROR", done
    assert done["worker"] == "zz-mounts"
    assert done["result"]["exit_code"] not in (None, 0)
    assert not (data / "x").exists()
    assert any("Read-only" in r["line"] for r in cluster.lines(write_ro["id"]))

    done = cluster.wait(write_rw["id"], timeout_s=WAIT_S)
    assert done["status"] == "FINISHED", done
    assert done["worker"] == "zz-mounts"
    assert (scratch / "out").read_text() == "written\n"

    with pytest.raises(ApiError) as refused:
        cluster.submit(IMAGE, ["true"], docker={"mounts": ["nope"]})
    assert refused.value.status == 400
    assert refused.value.field == "docker.mounts"
    message = refused.value.message
    assert "nope" in message and "datasets" in message and "scratch" in message


# --- end to end: /dev/shm, memory, workdir, user ----------------------------------------------


def run_lines(cluster: Cluster, command: str, **docker_fields: Any) -> list[str]:
    """The output lines of a job running `sh -c command`, which must finish."""
    job = cluster.submit(IMAGE, ["sh", "-c", command], docker=docker_fields)
    done = cluster.wait(job["id"], timeout_s=WAIT_S)
    lines = [r["line"] for r in cluster.lines(job["id"])]
    assert done["status"] == "FINISHED", (done, lines)
    return lines


@pytest.mark.docker
def test_shm_size_sets_the_size_of_dev_shm(cluster: Cluster):
    script = "df -k /dev/shm | tail -n 1"
    sized = run_lines(cluster, script, shm_size="256m")
    default = run_lines(cluster, script)
    assert int(sized[-1].split()[1]) == 256 * 1024, sized
    assert int(default[-1].split()[1]) == 64 * 1024, default  # Docker's default


@pytest.mark.docker
def test_workdir_user_and_memory_limit_apply_inside_the_container(cluster: Cluster):
    script = (
        "pwd; id -u; id -g;"
        " cat /sys/fs/cgroup/memory.max 2>/dev/null"
        " || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
    )
    lines = run_lines(cluster, script, workdir="/tmp/work", user="1234:1234", memory="64m")
    assert lines == ["/tmp/work", "1234", "1234", str(64 * MiB)]
    pwd, uid, gid, memory = run_lines(cluster, script)
    assert (pwd, uid, gid) == ("/", "0", "0")
    assert memory == "max" or int(memory) > 64 * MiB  # unlimited: v2 "max", v1 a huge number


# --- validation at submit -------------------------------------------------------------------

BAD = [
    ({"docker": {"shm_size": "lots"}}, "docker.shm_size"),
    ({"docker": {"shm_size": 10}}, "docker.shm_size"),
    ({"docker": {"shm_size": "0.5m"}}, "docker.shm_size"),
    ({"docker": {"shm_size": True}}, "docker.shm_size"),
    ({"docker": {"memory": "1k"}}, "docker.memory"),
    ({"docker": {"memory": "lots"}}, "docker.memory"),
    ({"docker": {"workdir": "relative/path"}}, "docker.workdir"),
    ({"docker": {"workdir": ""}}, "docker.workdir"),
    ({"docker": {"user": "root; rm -rf /"}}, "docker.user"),
    ({"docker": {"user": 1000}}, "docker.user"),
    ({"docker": {"mounts": "datasets"}}, "docker.mounts"),
    ({"docker": {"mounts": ["Bad Name"]}}, "docker.mounts"),
    ({"docker": {"mounts": ["a", "a"]}}, "docker.mounts"),
    ({"docker": {"mounts": [1]}}, "docker.mounts"),
    ({"docker": {"privileged": True}}, "docker.privileged"),
    ({"docker": {"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}}, "docker.env"),
    ({"docker": {"secrets": {"NVIDIA_VISIBLE_DEVICES": "all0"}}}, "docker.secrets"),
    ({"gpus": 1, "gpu_memory_gb": -1}, "gpu_memory_gb"),
    ({"gpu_memory_gb": -1}, "gpu_memory_gb"),
    ({"gpus": 1, "gpu_memory_gb": 0}, "gpu_memory_gb"),
    ({"gpus": 1, "gpu_memory_gb": "80"}, "gpu_memory_gb"),
    ({"gpus": 1, "gpu_model": ""}, "gpu_model"),
    ({"gpu_model": ""}, "gpu_model"),
    ({"gpu_model": "A100"}, "gpu_model"),
    ({"gpus": 0, "gpu_model": "A100"}, "gpu_model"),
    ({"gpus": 0, "gpu_memory_gb": 40}, "gpu_memory_gb"),
]


def test_bad_container_and_gpu_options_are_400_naming_the_field(
    make_cluster: Callable[..., Cluster],
):
    cluster = make_cluster(workers=0)  # parse errors come before any worker is looked at
    wrong = []
    for fields, field in BAD:
        spec: dict[str, Any] = {"name": "bad", "docker": {"image": IMAGE}}
        spec["docker"].update(fields.get("docker", {}))
        spec.update({k: v for k, v in fields.items() if k != "docker"})
        try:
            job = cluster.client.submit(spec)
        except ApiError as exc:
            if (exc.status, exc.code, exc.field) != (400, "bad_input", field):
                wrong.append((fields, exc.status, exc.code, exc.field, exc.message))
            continue
        wrong.append((fields, "accepted", job["id"]))
    assert wrong == []
    assert cluster.client.jobs()["jobs"] == []


@pytest.mark.docker
def test_valid_container_and_gpu_options_come_back_in_the_job(
    make_cluster: Callable[..., Cluster], tmp_path: Path
):
    cluster = make_cluster(workers=1, worker_settings={"mounts": f"datasets={tmp_path}"})
    wait_until(
        lambda: cluster.client.workers()["workers"][0]["mounts"] == ["datasets"],
        30,
        "the coordinator to store the worker's mounts",
    )
    job = cluster.submit(
        IMAGE,
        ["true"],
        docker={
            "shm_size": "256m",
            "memory": "1g",
            "workdir": "/data/run",
            "user": "1000:1000",
            "mounts": ["datasets"],
        },
        gpus=1,
        gpu_model="A100",
        gpu_memory_gb=40,
    )
    expected_docker = {
        "shm_size": 268435456,
        "memory": 1073741824,
        "workdir": "/data/run",
        "user": "1000:1000",
        "mounts": ["datasets"],
    }
    for shown in (job, cluster.client.job(job["id"])):
        assert {k: shown["docker"][k] for k in expected_docker} == expected_docker
        assert (shown["gpus"], shown["gpu_model"], shown["gpu_memory_gb"]) == (1, "A100", 40)
    # The worker has no GPUs: the job waits, and says why (once a scheduling round has
    # looked at it: under load the first may come after this line).
    shown = wait_until(
        lambda: "A100" in ((j := cluster.client.job(job["id"]))["queue_reason"] or "") and j,
        10,
        "the scheduler's reason",
    )
    assert shown["status"] == "QUEUED"

    plain = cluster.submit(IMAGE, ["true"], docker={"shm_size": 2 * MiB})
    assert plain["docker"]["shm_size"] == 2 * MiB
    assert plain["docker"]["memory"] is None and plain["docker"]["mounts"] == []
    assert plain["docker"]["workdir"] is None and plain["docker"]["user"] is None
    assert plain["gpu_model"] is None and plain["gpu_memory_gb"] is None


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("registry.example.com:5000/team/train:1", "registry.example.com:5000/team/train@sha256:b"),
        ("registry.example.com:5000/team/train", "registry.example.com:5000/team/train@sha256:b"),
        ("mirror.example.com/train@sha256:c", "mirror.example.com/train@sha256:c"),
        ("elsewhere/other:2", "docker.io/library/train@sha256:a"),  # none of its own: the first
    ],
)
def test_the_repo_digest_is_the_named_repositorys(requested: str, expected: str) -> None:
    digests = [
        "docker.io/library/train@sha256:a",
        "registry.example.com:5000/team/train@sha256:b",
        "mirror.example.com/train@sha256:c",
    ]
    assert repo_digest(digests, requested) == expected
    assert repo_digest([], requested) is None


def test_a_job_may_name_its_image_by_digest() -> None:
    image = "registry.example.com:5000/team/train@sha256:" + "a" * 64
    spec = validate.parse_spec({"name": "by-digest", "docker": {"image": image}})
    assert spec.image == image
