"""gpubox's systemd units started by a real systemd, as an operator installs them.

Each box is a Docker container of a plain Debian 12 (scripts/systemd-image) whose PID 1 is
systemd. Box A gets `scripts/install --role both` and the host's Docker socket; box B a
`--role worker` pointed at A, as README's "Several boxes" says; box C a process-runtime
worker with no Docker at all. The tests drive them from outside: HTTP to A's API, `gpubox`
commands inside the boxes, systemctl, and the journal, which must hold no error after each
step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IMAGE, wait_until
from tests.single_file import build_id, rebuilt

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("gpubox-coordinator.service", "gpubox-worker.service")

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.docker, pytest.mark.systemd]

# systemd as PID 1 in a container. --privileged fails on this kind of VM (its bounding set
# lacks CAP_SYS_RESOURCE, so runc cannot apply "all"): every other capability is added by
# name instead. systemd needs the cgroup tree writable and /run as tmpfs; SIGRTMIN+3 is how
# it is told to shut down.
CAPABILITIES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
]
DOCKER_SOCKET = "/var/run/docker.sock"
# Where a box keeps what is not part of Debian: gpubox's journal and state, and the paths a
# purge must leave as they were before the install.
WATCHED = ("/etc", "/usr", "/var/lib", "/var/cache", "/root", "/home", "/opt")
NOT_OURS = re.compile(r"^/var/lib/(systemd|dpkg|apt|dbus)/|^/var/cache/(ldconfig|debconf)/")


def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


class Box:
    """One Debian box with systemd as PID 1, as a container on the test's network."""

    def __init__(self, image: str, name: str, network: str, docker: bool) -> None:
        self.name = name
        flags = [f"--cap-add={cap}" for cap in CAPABILITIES]
        flags += ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]
        flags += ["--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]
        flags += ["--tmpfs", "/run", "--tmpfs", "/run/lock", "--stop-signal", "SIGRTMIN+3"]
        flags += ["-v", f"{ROOT}:/src:ro", "--hostname", name, "--network", network]
        if docker:
            flags += ["-v", f"{DOCKER_SOCKET}:{DOCKER_SOCKET}"]
        run("docker", "run", "-d", "--name", name, *flags, image, "/sbin/init")

        def system_state() -> str | None:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            return state if state in ("running", "degraded") else None

        state = wait_until(system_state, 60, f"systemd to come up on {name}", every_s=0.3)
        assert state == "running", self.sh("systemctl --failed --no-pager").stdout
        if docker:  # Docker is installed on this box: its group owns the socket
            gid = os.stat(DOCKER_SOCKET).st_gid
            self.sh(f"groupadd -g {gid} docker")
        self.address = run(
            "docker",
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ).stdout.strip()
        self.mark = self.now()

    def sh(
        self, script: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = ["docker", "exec", *(["-i"] if stdin is not None else []), self.name]
        result = subprocess.run(
            [*command, "sh", "-c", script],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name}: {script!r} exited {result.returncode}:\n"
                + result.stdout
                + result.stderr
            )
        return result

    def now(self) -> str:
        return self.sh("date +%s.%N").stdout.strip()

    def journal(self, priority: str = "err") -> str:
        """What gpubox's units logged at this priority or worse since the last look."""
        since, self.mark = self.mark, self.now()
        units = " ".join(f"-u {unit}" for unit in UNITS)
        return self.sh(
            f"journalctl {units} -p {priority} --since @{since} --no-pager -o cat -q"
        ).stdout

    def assert_no_errors(self, step: str) -> None:
        errors = self.journal()
        assert errors == "", f"{self.name}, {step}: the journal holds errors:\n{errors}"

    def main_pid(self, unit: str) -> int:
        return int(self.sh(f"systemctl show -p MainPID --value {unit}").stdout)

    def active(self, unit: str) -> str:
        return self.sh(f"systemctl is-active {unit}", check=False).stdout.strip()

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.sh(f"/src/scripts/install {' '.join(args)}", check=False, timeout=300)

    def files(self) -> set[str]:
        listing = self.sh(f"find {' '.join(WATCHED)} -xdev 2>/dev/null || true").stdout
        return {path for path in listing.splitlines() if not NOT_OURS.match(path + "/")}

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", "-v", self.name], capture_output=True, check=False)


class Api:
    """gpubox's HTTP API on a box, as a CI pipeline calls it."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read().decode()}") from None
        return (
            json.loads(data) if response.headers.get_content_type() == "application/json" else data
        )

    def submit(self, command: str, labels: dict[str, str] | None = None) -> int:
        docker = {"image": IMAGE, "command": ["sh", "-c", command]}
        body = {"name": "systemd-test", "docker": docker, "labels": labels or {}}
        job = self.call("POST", "/api/v1/jobs", body)
        return int(job["id"])

    def wait(self, job_id: int, timeout: float = 90) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            with contextlib.suppress(OSError):  # the coordinator may be restarting
                job: dict[str, Any] = self.call("GET", f"/api/v1/jobs/{job_id}")
                if job["status"] in ("FINISHED", "ERROR", "CANCELLED"):
                    return job
            return None

        return wait_until(ended, timeout, f"job {job_id} to end", every_s=0.2)  # type: ignore[no-any-return]

    def wait_running(self, job_id: int, timeout: float = 60) -> None:
        wait_until(
            lambda: self.call("GET", f"/api/v1/jobs/{job_id}")["status"] == "RUNNING",
            timeout,
            f"job {job_id} to start",
            every_s=0.1,
        )

    def logs(self, job_id: int) -> str:
        return bytes(self.call("GET", f"/api/v1/jobs/{job_id}/logs")).decode()


def counting(lines: int, pause: float = 0.2) -> str:
    """A job's command that prints `line 1` … `line N`, one every `pause` seconds."""
    return f"i=1; while [ $i -le {lines} ]; do echo line $i; i=$((i+1)); sleep {pause}; done"


def expected(lines: int) -> str:
    return "".join(f"line {i}\n" for i in range(1, lines + 1))


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None or run("docker", "info", check=False).returncode != 0:
        pytest.fail("no Docker engine: run scripts/test, which starts one")
    return run(str(ROOT / "scripts" / "systemd-image"), timeout=900).stdout.strip()


@pytest.fixture(scope="module")
def builds(single_file: Path) -> tuple[Path, Path]:
    """Two builds of this checkout (two build ids): the installed one and its upgrade. They
    live inside the checkout, which the boxes see as /src."""
    folder = ROOT / "dist" / "systemd-test"
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "first"
    shutil.copy2(single_file, first)
    second = rebuilt(single_file, folder / "second")
    assert build_id(first) != build_id(second)
    return first, second


@pytest.fixture(scope="module")
def network() -> Iterator[str]:
    name = f"gpubox-systemd-{uuid.uuid4().hex[:8]}"
    run("docker", "network", "create", name)
    yield name
    run("docker", "network", "rm", name, check=False)


@pytest.fixture(scope="module")
def boxes(image: str, network: str) -> Iterator[dict[str, Box]]:
    made: dict[str, Box] = {}
    yield made
    for box in made.values():
        box.remove()
    # Job containers the boxes' workers left on the host's engine, if a test failed midway.
    for box in made.values():
        found = run("docker", "ps", "-aq", "--filter", f"label=io.gpubox.worker={box.name}").stdout
        for container in found.split():
            run("docker", "rm", "-f", "-v", container, check=False)


def new_box(boxes: dict[str, Box], image: str, network: str, role: str, docker: bool) -> Box:
    box = Box(image, f"gpubox-{role}-{uuid.uuid4().hex[:6]}", network, docker)
    boxes[role] = box
    return box


@pytest.fixture(scope="module")
def box_a(
    boxes: dict[str, Box], image: str, network: str, builds: tuple[Path, Path]
) -> tuple[Box, Api, set[str]]:
    """Box A with `scripts/install --role both` done and its API open to the network, a
    submit token made as README says, and the files the box had before the install."""
    box = new_box(boxes, image, network, "a", docker=True)
    before = box.files()
    # As an operator provisions it: the settings first (install never overwrites them).
    box.sh(
        "mkdir -p /etc/gpubox && printf '%s\\n' '[coordinator]' 'state_dir = \"/var/lib/gpubox\"'"
        " 'http = \"0.0.0.0:8470\"' > /etc/gpubox/coordinator.toml"
    )
    result = box.install("--role both", f"--from /src/dist/systemd-test/{builds[0].name}")
    assert result.returncode == 0, result.stdout + result.stderr
    for unit in UNITS:
        assert box.active(unit) == "active", box.sh(
            f"systemctl status {unit} --no-pager", check=False
        ).stdout
    box.assert_no_errors("install --role both")
    made = box.sh(
        "runuser -u gpubox -- gpubox token create ci --config /etc/gpubox/coordinator.toml"
    )
    token = made.stdout.strip().splitlines()[-1].strip()
    api = Api(f"http://{box.address}:8470", token)
    return box, api, before


def first_worker_install(box: Box, build: Path) -> str:
    """`scripts/install --role worker` on a new box; what it said. With no key yet, the
    worker is enabled, not started, and the script says what to set and exits 0."""
    first = box.install("--role worker", f"--from /src/dist/systemd-test/{build.name}")
    assert first.returncode == 0, first.stderr
    assert "not started" in first.stderr and "worker.toml" in first.stderr
    assert box.active(UNITS[1]) == "inactive"
    assert box.sh(f"systemctl is-enabled {UNITS[1]}").stdout.strip() == "enabled"
    return first.stderr


def enroll_worker(a: Box, box: Box, *settings: str, as_root: bool = False) -> None:
    """README, Several boxes: a key pair made on the coordinator's box (by its service user,
    or by root); the secret file and the coordinator's public key copied to the worker's box
    and given to its gpubox user; worker.toml pointed at them; the worker restarted."""
    runner = "" if as_root else "runuser -u gpubox -- "
    a.sh(f"{runner}gpubox keys worker {box.name} --state-dir /var/lib/gpubox")
    # Whoever made it, the service user owns it: its own commands go on working.
    assert a.sh("find /var/lib/gpubox ! -user gpubox").stdout == ""
    listed = a.sh("runuser -u gpubox -- gpubox keys list --state-dir /var/lib/gpubox").stdout
    assert box.name in listed
    secret = a.sh(f"cat /var/lib/gpubox/keys/workers/{box.name}.key_secret").stdout
    box.sh("cat > /etc/gpubox/worker.key_secret", stdin=secret)
    box.sh(
        "cat > /etc/gpubox/coordinator.key",
        stdin=a.sh("cat /var/lib/gpubox/keys/coordinator.key").stdout,
    )
    box.sh("chown gpubox:gpubox /etc/gpubox/*.key* && chmod 600 /etc/gpubox/worker.key_secret")
    lines = [
        "[worker]",
        'state_dir = "/var/lib/gpubox"',
        f'coordinator = "tcp://{a.name}:8471"',
        'coordinator_key = "/etc/gpubox/coordinator.key"',
        'key_file = "/etc/gpubox/worker.key_secret"',
        f'labels = "box={box.name}"',
        *settings,
    ]
    box.sh("cat > /etc/gpubox/worker.toml", stdin="\n".join(lines) + "\n")
    box.sh(f"systemctl restart {UNITS[1]}")
    assert box.active(UNITS[1]) == "active"


def test_both_units_start_under_systemd_and_run_a_job_followed_by_tail(
    box_a: tuple[Box, Api, set[str]],
) -> None:
    box, api, _ = box_a
    job_id = api.submit(counting(10, 0.1))
    tail = box.sh(f"gpubox tail {job_id}", check=False, timeout=120)
    assert (tail.returncode, tail.stdout) == (0, expected(10)), tail.stderr
    assert api.wait(job_id)["status"] == "FINISHED"
    # the job's lines reach the worker's journal, tagged with the job
    journal = box.sh("journalctl -u gpubox-worker --no-pager -o cat -q").stdout
    assert f"job={job_id}" in journal and "line 10" in journal
    # nothing unpacked into the caller's home: the installed gpubox runs from /usr/local/lib
    assert box.sh("ls -A /root").stdout.split().count(".shiv") == 0
    box.assert_no_errors("a job")


@pytest.mark.parametrize("unit", UNITS)
def test_a_restart_mid_job_loses_and_repeats_nothing(
    box_a: tuple[Box, Api, set[str]], unit: str
) -> None:
    box, api, _ = box_a
    job_id = api.submit(counting(40, 0.1))
    api.wait_running(job_id)
    follower = subprocess.Popen(
        ["docker", "exec", box.name, "gpubox", "tail", str(job_id)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    pid = box.main_pid(unit)
    box.sh(f"systemctl restart {unit}")
    assert box.active(unit) == "active" and box.main_pid(unit) != pid
    job = api.wait(job_id)
    assert job["status"] == "FINISHED", job
    assert api.logs(job_id) == expected(40)
    out, err = follower.communicate(timeout=120)
    assert (follower.returncode, out) == (0, expected(40)), err
    box.assert_no_errors(f"restart of {unit} mid-job")
    if unit == "gpubox-coordinator.service":
        # the worker came back holding the job it was running, and the log says so
        said = box.sh("journalctl -u gpubox-coordinator --no-pager -o cat -q").stdout
        assert re.search(r"connected \(\d+ GPUs, 1 jobs? held", said), said[-2000:]
        # with one HELLO, not one per batch it had queued while the coordinator was away
        assert "times in" not in said, said[-2000:]


def test_reload_rereads_the_allow_list_without_a_restart(box_a: tuple[Box, Api, set[str]]) -> None:
    box, api, _ = box_a
    pid = box.main_pid(UNITS[0])
    box.sh("systemctl reload gpubox-coordinator")
    assert box.main_pid(UNITS[0]) == pid and box.active(UNITS[0]) == "active"
    said = ""

    def journal_says() -> bool:  # the journal may take a moment to show the line
        nonlocal said
        said = box.sh("journalctl -u gpubox-coordinator --no-pager -o cat -q -n 20").stdout
        return "on the allow list" in said

    wait_until(journal_says, 10, lambda: f"the journal to say so; it says {said!r}", 0.2)
    assert api.wait(api.submit("echo after reload"))["status"] == "FINISHED"
    box.assert_no_errors("reload")


def test_installing_a_new_build_restarts_the_services_on_it(
    box_a: tuple[Box, Api, set[str]], builds: tuple[Path, Path]
) -> None:
    box, api, _ = box_a
    pids = {unit: box.main_pid(unit) for unit in UNITS}
    again = box.install("--role both", f"--from /src/dist/systemd-test/{builds[0].name}")
    assert again.returncode == 0, again.stderr
    assert {unit: box.main_pid(unit) for unit in UNITS} == pids  # the same build: left alone
    upgrade = box.install("--role both", f"--from /src/dist/systemd-test/{builds[1].name}")
    assert upgrade.returncode == 0, upgrade.stderr
    for unit in UNITS:
        assert f"restarted {unit}" in upgrade.stderr
        pid = box.main_pid(unit)
        assert pid != pids[unit] and box.active(unit) == "active"
        # the running process loaded the new build's libraries, and the old build is gone
        maps = box.sh(f"cat /proc/{pid}/maps").stdout
        assert f"gpubox_{build_id(builds[1])}" in maps
        assert build_id(builds[0]) not in maps
    assert box.sh("ls /usr/local/lib/gpubox/unpacked").stdout.split() == [
        f"gpubox_{build_id(builds[1])}"
    ]
    assert api.wait(api.submit("echo upgraded"))["status"] == "FINISHED"
    box.assert_no_errors("upgrade")


def test_a_second_box_installs_a_worker_and_runs_a_labelled_job(
    boxes: dict[str, Box],
    box_a: tuple[Box, Api, set[str]],
    image: str,
    network: str,
    builds: tuple[Path, Path],
) -> None:
    a, api, _ = box_a
    b = new_box(boxes, image, network, "b", docker=True)
    first_worker_install(b, builds[1])
    enroll_worker(a, b)
    job_id = api.submit("echo from box b; hostname", labels={"box": b.name})
    job = api.wait(job_id)
    assert job["status"] == "FINISHED" and job["worker"] == b.name, job
    assert api.logs(job_id).startswith("from box b\n")
    b.assert_no_errors("worker on a second box")
    a.assert_no_errors("worker on a second box")


def test_a_process_runtime_worker_runs_on_a_box_without_docker(
    boxes: dict[str, Box],
    box_a: tuple[Box, Api, set[str]],
    image: str,
    network: str,
    builds: tuple[Path, Path],
) -> None:
    a, api, _ = box_a
    c = new_box(boxes, image, network, "c", docker=False)
    assert c.sh("getent group docker", check=False).returncode != 0
    assert "no docker group" in first_worker_install(c, builds[1])
    enroll_worker(a, c, 'runtime = "process"', as_root=True)
    # A process worker takes only jobs of tokens allowed to use one (the ci token is not):
    # its jobs run on its host, as the worker's user, gpubox.
    made = a.sh(
        "runuser -u gpubox -- gpubox token create ci-host --allow-process"
        " --config /etc/gpubox/coordinator.toml"
    )
    api = Api(api.url, made.stdout.strip().splitlines()[-1].strip())
    job_id = api.submit("echo from a process; id -un; hostname", labels={"box": c.name})
    job = api.wait(job_id)
    assert job["status"] == "FINISHED" and job["worker"] == c.name, job
    assert api.logs(job_id) == f"from a process\ngpubox\n{c.name}\n"
    c.assert_no_errors("process runtime")


def test_uninstall_then_purge_leaves_the_box_as_it_was(box_a: tuple[Box, Api, set[str]]) -> None:
    box, _, before = box_a
    box.sh("/src/scripts/install --uninstall")
    for unit in UNITS:
        assert box.active(unit) == "inactive"
        assert box.sh(f"systemctl cat {unit}", check=False).returncode != 0
    assert (
        box.sh("test -e /var/lib/gpubox/keys/coordinator.key_secret", check=False).returncode == 0
    )
    box.sh("/src/scripts/install --purge")
    left = box.files() - before
    assert left == set(), sorted(left)
    assert box.sh("getent passwd gpubox; getent group gpubox", check=False).stdout == ""
