"""Attacks a job's submitter could make on the worker's box, each made for real (issue 19):
root on the host through a writable mount, unbounded containers, the engine's image pull
pointed at services only the box can reach, and the smaller ones (reserved environment
variables, anonymous volumes left behind, control characters in the worker's log).

Real coordinator, real worker, real containers from the local busybox image. The mount
tests mount tmpfs filesystems, and run a program as nobody: they need root.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpubox import config as cfg
from gpubox import errors, logfmt, protocol
from gpubox.client import ApiError
from gpubox.worker import policy
from gpubox.worker.docker_runtime import LABEL, WORKER_LABEL, DockerRuntime
from gpubox.worker.policy import ContainerPolicy
from tests.conftest import IMAGE, Cluster, wait_until
from tests.conftest import wire_job as make_wire_job

pytestmark = pytest.mark.timeout(300)

WAIT_S = 120
MiB = 1024**2
SECRET = "SECRET-BODY-of-an-internal-service"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts filesystems and runs programs as nobody: needs root")


@pytest.fixture()
def open_dir() -> Iterator[Path]:
    """An empty folder that every user may enter (tmp_path's parents only root may enter):
    the attack runs a program from it as nobody."""
    path = Path(tempfile.mkdtemp(prefix="gpubox-hardening-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` with `options` (like "nosuid,nodev"), unmounted after."""
    needs_root()
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"{options},size=16m", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def euid_probe() -> bytes:
    """A 136-byte x86-64 Linux program that exits with its effective uid modulo 256: 0 when
    it runs as root, 254 as nobody (65534). A copy of /bin/busybox will not do: busybox
    drops a setuid bit's privileges by itself for the applets that do not need them."""
    base = 0x400000
    # mov eax, 107 (geteuid); syscall; mov edi, eax; mov eax, 60 (exit); syscall
    code = bytes.fromhex("b86b0000000f0589c7b83c0000000f05")
    size = 64 + 56 + len(code)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, base + 120, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + segment + code


def start_worker(cluster: Cluster, **settings: Any) -> str:
    """Start a worker with a name no other test uses (tests of other checkouts may share this
    Docker engine, and remove the containers of workers by name); its name."""
    name = f"hardening-{uuid.uuid4().hex[:8]}"
    cluster.add_worker(name=name, **settings)
    return name


def leave_root_shell(cluster: Cluster, folder: Path) -> tuple[int, bool, list[str]]:
    """The attack of issue 19, finding 4: a job writes a program into the writable mount
    "scratch" (at /scratch), makes it setuid root, and makes a device file anyone may open.
    What nobody gets on the host: the program's exit code (0: it ran as root), whether the
    device file opened, and the job's output."""
    if platform.machine() != "x86_64":
        pytest.skip("the probe program is x86-64 code")
    payload = base64.b64encode(euid_probe()).decode()
    script = (
        f"echo {payload} | base64 -d > /scratch/rootsh && chmod 4755 /scratch/rootsh;"
        " mknod /scratch/zero c 1 5 && chmod 666 /scratch/zero; ls -ln /scratch"
    )
    job = cluster.submit(IMAGE, ["sh", "-c", script], docker={"mounts": ["scratch"]})
    done = cluster.wait(job["id"], timeout_s=WAIT_S)
    lines = [r["line"] for r in cluster.lines(job["id"])]
    assert done["status"] in ("FINISHED", "ERROR") and (folder / "rootsh").exists(), lines
    nobody = ["runuser", "-u", "nobody", "--"]
    euid = subprocess.run([*nobody, str(folder / "rootsh")], check=False).returncode
    assert euid in (0, 65534 % 256), f"the probe did not run as nobody: exit code {euid}"
    opened = (folder / "zero").exists() and (
        subprocess.run([*nobody, "head", "-c", "1", str(folder / "zero")], check=False)
    ).returncode == 0
    return euid, opened, lines


def wire_job(command: list[str], **container: Any) -> protocol.WireJob:
    """A job as a worker receives it, with an id no other test uses."""
    return make_wire_job(
        name="hardening-test", command=command, container={"mounts": [], **container}
    )


@pytest.fixture()
def worker_name(docker_client: docker.DockerClient) -> Iterator[str]:
    """A worker name of this test alone; its containers are removed afterwards."""
    name = f"htest-{uuid.uuid4().hex[:10]}"
    yield name
    for container in docker_client.api.containers(
        all=True, filters={"label": f"io.gpubox.worker={name}"}
    ):
        docker_client.api.remove_container(container["Id"], force=True, v=True)


# --- finding 4: root on the host through a writable mount -------------------------------------


@pytest.mark.slow
@pytest.mark.docker
def test_writable_mount_where_setuid_works_is_refused_at_worker_start(
    make_cluster: Callable[..., Cluster], open_dir: Path
):
    with tmpfs(open_dir / "plain", "rw") as plain:
        cluster = make_cluster(workers=0)
        try:
            start_worker(cluster, mounts=f"scratch={plain}:/scratch:rw")
        except errors.ConfigError as exc:
            message = str(exc)
        else:
            euid, opened, lines = leave_root_shell(cluster, plain)
            pytest.fail(
                f"the worker took a writable mount on a filesystem without nosuid,nodev; a job"
                f" left a program there that ran as euid {euid} (0: root) for nobody, and a"
                f" device file that {'opened' if opened else 'did not open'}: {lines}"
            )
        assert message.startswith(f"mounts: scratch: jobs may write to {plain}, but ")
        assert "without nosuid,nodev" in message
        assert f"mount -o remount,bind,nosuid,nodev {plain}" in message
        assert f"{plain} {plain} none bind,nosuid,nodev 0 0" in message
        assert "\n" not in message
        # Read-only, the same folder is fine: a job cannot leave anything there.
        start_worker(cluster, mounts=f"data={plain}")


def test_writable_mount_needs_both_nosuid_and_nodev_also_below_it(tmp_path: Path):
    for options, lacking in (("nodev", "nosuid"), ("nosuid", "nodev")):
        folder = tmp_path / options
        with tmpfs(folder, options), pytest.raises(errors.ConfigError) as refused:
            cfg.check_mount_folders(cfg.parse_mounts(f"s={folder}:rw"))
        assert f"its filesystem is mounted without {lacking}, so" in str(refused.value)
    with tmpfs(tmp_path / "safe", "nosuid,nodev") as folder:
        cfg.check_mount_folders(cfg.parse_mounts(f"s={folder}:rw"))
        # A filesystem mounted inside it reaches the container too.
        with tmpfs(folder / "inner", "rw") as inner:
            with pytest.raises(errors.ConfigError, match=f"{inner}, mounted inside it"):
                cfg.check_mount_folders(cfg.parse_mounts(f"s={folder}:rw"))
            cfg.check_mount_folders(cfg.parse_mounts(f"s={folder}"))  # read-only: fine


def test_the_worker_command_refuses_such_a_mount_in_one_line(tmp_path: Path):
    with tmpfs(tmp_path / "plain", "rw") as plain:
        ran = subprocess.run(
            [sys.executable, "-m", "gpubox", "worker", "--mount", f"scratch={plain}:rw"],
            env={
                **os.environ,
                "GPUBOX_STATE_DIR": str(tmp_path / "state"),
                "GPUBOX_GPUS": "none",
                "GPUBOX_COORDINATOR": "tcp://127.0.0.1:9",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert ran.returncode == 2, ran
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and "scratch" in lines[0] and "nosuid,nodev" in lines[0], ran.stderr


@pytest.mark.slow
@pytest.mark.docker
def test_a_job_cannot_leave_a_working_setuid_program_or_device_in_a_writable_mount(
    make_cluster: Callable[..., Cluster], nosuid_dir: Path
):
    needs_root()
    cluster = make_cluster(workers=0)
    start_worker(cluster, mounts=f"scratch={nosuid_dir}:/scratch:rw")
    euid, opened, lines = leave_root_shell(cluster, nosuid_dir)
    assert os.stat(nosuid_dir / "rootsh").st_mode & 0o4000  # the job did set the bit…
    assert os.stat(nosuid_dir / "rootsh").st_uid == 0
    assert euid == 65534 % 256, (euid, lines)  # …and it gives nobody nothing
    assert not (nosuid_dir / "zero").exists() and not opened, lines  # no CAP_MKNOD
    assert any("mknod" in line and "not permitted" in line for line in lines), lines


# --- finding 7: containers without limits -----------------------------------------------------


@pytest.mark.docker
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
@pytest.mark.docker
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
@pytest.mark.docker
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
        ({"registries": ""}, "registries"),
        ({"registries": "http://x"}, "registries"),
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
        "registries": "public, Registry.corp:5000",
    }
    made = ContainerPolicy.from_config(cfg.load(cfg.WorkerConfig, settings))
    assert made == ContainerPolicy(
        100, 16 * 1024**3, ("MKNOD", "NET_RAW"), ("public", "registry.corp:5000")
    )
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


# --- finding 8: the engine's image pull pointed at the box's own services ----------------------


class Recorder(http.server.ThreadingHTTPServer):
    """A web server on 127.0.0.1 that answers every request 404 with SECRET as its body,
    and records the paths asked for."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.paths.append(self.path)
                body = SECRET.encode()
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.docker
def test_an_image_from_a_loopback_registry_is_refused_before_any_request(
    make_cluster: Callable[..., Cluster], recorder: Recorder
):
    port = recorder.server_address[1]
    cluster = make_cluster(workers=0)
    start_worker(cluster)
    for image in (f"127.0.0.1:{port}/probe:1", f"localhost:{port}/probe:1"):
        job = cluster.submit(image, ["true"])
        done = cluster.wait(job["id"], timeout_s=WAIT_S)
        assert done["status"] == "ERROR", done
        error = done["result"]["error"]
        assert error.startswith(f"could not pull image {image!r}: registry "), error
        assert "not allowed on this worker" in error and SECRET not in error
    assert recorder.paths == []


@pytest.mark.slow
@pytest.mark.docker
def test_a_pull_from_an_allowed_registry_never_echoes_what_it_answered(
    make_cluster: Callable[..., Cluster], recorder: Recorder
):
    port = recorder.server_address[1]
    cluster = make_cluster(workers=0)
    start_worker(cluster, registries=f"public,127.0.0.1:{port}")
    image = f"127.0.0.1:{port}/probe:1"
    job = cluster.submit(image, ["true"])
    done = cluster.wait(job["id"], timeout_s=WAIT_S)
    assert done["status"] == "ERROR", done
    assert recorder.paths, "the engine did not try the allowed registry"
    assert done["result"]["error"] == f"could not pull image {image!r}: registry answered 404"


def test_registry_of_an_image_follows_dockers_rule():
    cases = {
        "busybox": "docker.io",
        "busybox:1.36": "docker.io",
        "nvidia/cuda:12.4.1-base": "docker.io",
        "docker.io/library/busybox": "docker.io",
        "nvcr.io/nvidia/pytorch:24.01-py3": "nvcr.io",
        "localhost/x": "localhost",
        "localhost:5000/x": "localhost:5000",
        "127.0.0.1:8470/probe:1": "127.0.0.1:8470",
        "[::1]:5000/x": "[::1]:5000",
        "Upper/x": "upper",
        "x@sha256:" + "0" * 64: "docker.io",
    }
    assert {image: policy.registry_of(image) for image in cases} == cases


@pytest.mark.parametrize(
    ("registries", "image", "allowed"),
    [
        (("public",), "busybox", True),
        (("public",), "8.8.8.8:5000/x", True),
        (("public",), "127.0.0.1:5000/x", False),
        (("public",), "127.1/x", False),
        (("public",), "0.0.0.0:5000/x", False),
        (("public",), "10.1.2.3/x", False),
        (("public",), "192.168.0.1/x", False),
        (("public",), "172.16.0.1/x", False),
        (("public",), "100.64.0.1/x", False),
        (("public",), "169.254.169.254/latest", False),
        (("public",), "[::1]:5000/x", False),
        (("public",), "[::ffff:127.0.0.1]:5000/x", False),
        (("public",), "[fe80::1]/x", False),
        (("public",), "[fd00::1]/x", False),
        (("public",), "localhost:5000/x", False),
        (("public",), "no-such-host.invalid/x", False),
        (("public", "10.1.2.3"), "10.1.2.3:5000/x", True),
        (("public", "10.1.2.3:5000"), "10.1.2.3:5001/x", False),
        (("*.corp.example",), "reg.corp.example:5000/x", True),
        (("*.corp.example",), "busybox", False),
        (("*.corp.example",), "8.8.8.8/x", False),
        (("docker.io", "nvcr.io"), "busybox", True),
        (("docker.io", "nvcr.io"), "nvcr.io/nvidia/x", True),
        (("*",), "127.0.0.1:5000/x", True),
    ],
)
def test_registries_setting(registries: tuple[str, ...], image: str, allowed: bool):
    refusal = ContainerPolicy(registries=registries).registry_refusal(image)
    assert (refusal is None) == allowed, refusal


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (
            f"error parsing HTTP 404 response body: invalid character 'S': \"{SECRET}\"",
            "registry answered 404",
        ),
        (
            'Get "http://10.0.0.1:81/v2/": dial tcp 10.0.0.1:81: connect: connection refused',
            "connection refused",
        ),
        ("dial tcp: lookup x.invalid on 10.0.0.53:53: no such host", "registry host not found"),
        ("manifest for nvcr.io/x:1 not found: manifest unknown: manifest unknown", "not found"),
        (
            "pull access denied for x, repository does not exist or may require 'docker login'",
            "not found, or access denied (check the name and docker.auth)",
        ),
        (
            'Get "https://r/v2/": http: server gave HTTP response to HTTPS client',
            "the registry does not speak HTTPS",
        ),
        ("received unexpected HTTP status: 503 Service Unavailable", "registry answered 503"),
        (f"something new: {SECRET}", "pull failed (the worker's log has Docker's message)"),
    ],
)
def test_a_failed_pull_is_told_in_fixed_words(message: str, words: str):
    assert policy.pull_failure(message) == words


# --- the lows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("env", "NVIDIA_DRIVER_CAPABILITIES"),
        ("env", "NVIDIA_MIG_CONFIG_DEVICES"),
        ("secrets", "NVIDIA_VISIBLE_DEVICES"),
        ("env", "CUDA_VISIBLE_DEVICES"),
        ("env", "GPUBOX_WORKER_RUN"),
        ("secrets", "GPUBOX_JOB_ID"),
    ],
)
def test_reserved_environment_names_are_refused_at_submit(
    make_cluster: Callable[..., Cluster], field: str, name: str
):
    cluster = make_cluster(workers=0)
    with pytest.raises(ApiError) as refused:
        cluster.submit(IMAGE, ["true"], docker={field: {name: "all-of-it"}})
    assert (refused.value.status, refused.value.field) == (400, f"docker.{field}")
    assert name in refused.value.message
    # Near misses are the job's own.
    job = cluster.submit(
        IMAGE, ["true"], docker={"env": {"MY_NVIDIA_THING": "1", "CUDA_HOME": "/x"}}
    )
    assert job["docker"]["env"] == {"MY_NVIDIA_THING": "1", "CUDA_HOME": "/x"}


@pytest.mark.slow
@pytest.mark.docker
def test_anonymous_volumes_go_with_the_job_container(
    make_cluster: Callable[..., Cluster], docker_client: docker.DockerClient
):
    base = docker_client.containers.create(IMAGE, ["true"])
    tag = f"gpubox-test-volume:{uuid.uuid4().hex[:12]}"
    base.commit(*tag.split(":"), changes=["VOLUME /data"])
    base.remove()
    try:
        cluster = make_cluster(workers=0)
        name = start_worker(cluster)
        job = cluster.submit(tag, ["sh", "-c", "echo kept > /data/file; sleep 2"])
        labels = [f"{LABEL}={job['id']}", f"{WORKER_LABEL}={name}"]
        found = wait_until(
            lambda: docker_client.api.containers(filters={"label": labels}),
            WAIT_S,
            "the job's container",
        )
        mounts = docker_client.api.inspect_container(found[0]["Id"])["Mounts"]
        volumes = [m["Name"] for m in mounts if m["Type"] == "volume"]
        assert len(volumes) == 1, mounts
        done = cluster.wait(job["id"], timeout_s=WAIT_S)
        assert done["status"] == "FINISHED", (done["result"], cluster.lines(job["id"]))
        wait_until(
            lambda: not docker_client.api.containers(all=True, filters={"label": labels}),
            WAIT_S,
            "the worker to remove the job's container",
        )
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(volumes[0])
    finally:
        docker_client.images.remove(tag, force=True)


def test_a_job_cannot_write_lines_into_the_workers_log(make_cluster: Callable[..., Cluster]):
    # An image with a newline and an escape sequence once reached the worker, which logs the
    # image it pulls (escaped: logfmt.printable, below). It is no image reference Docker
    # takes, so the API now refuses it before any worker sees it.
    cluster = make_cluster(workers=0)
    forged = "2026-12-06T00:00:00.000Z ERROR gpubox.worker.agent: forged"
    with pytest.raises(ApiError) as refused:
        cluster.submit(f"{IMAGE}\n{forged}\x1b[2J", ["true"])
    assert refused.value.status == 400 and refused.value.field == "docker.image"
    assert cluster.client.jobs()["jobs"] == []


def test_printable_escapes_control_characters_only():
    assert logfmt.printable("nvcr.io/x:1 é ✓") == "nvcr.io/x:1 é ✓"
    assert logfmt.printable("a\nb\r\tc\x1b[0m\x7f\x85\u2028") == (
        "a\\nb\\r\\tc\\x1b[0m\\x7f\\x85\\u2028"
    )
