"""A coordinator whose HTTP API is served by several processes (http_processes), each handed
the one listening socket, beside the process that keeps the broker: submits from many
connections land once each, followers and waiters in every process wake as the broker
stores lines and ends jobs, a cancel through any process reaches its job, and one process
ending ends the coordinator with a non-zero status and loses nothing stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gpubox.client import Client
from tests.conftest import Cluster, wait_until

pytestmark = pytest.mark.timeout(120)
PROCESS_WORKER = {"runtime": "process", "fake_gpus": "2", "max_jobs": 8}


def spec(command: list[str], **fields: Any) -> dict[str, Any]:
    return {"name": command[0], "docker": {"image": "-", "command": command}, **fields}


def serving_pids(port: int) -> set[int]:
    """The processes holding the established connections to this port (from `ss`)."""
    shown = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(part.split("=")[1].split(",")[0]) for part in shown.split("pid")[1:]}


def http_pids() -> set[int]:
    """The HTTP processes of coordinators that this test process started."""
    found = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "gpubox.coordinator.httpproc"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {int(pid) for pid in found.split()}


def test_submits_from_many_connections_land_once_each_in_one_id_sequence(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0, http_processes=3)
    assert len(http_pids()) == 3
    # Each submit on a connection of its own: the kernel spreads them over the processes.
    with ThreadPoolExecutor(12) as pool:
        made = list(
            pool.map(lambda i: cluster.client.submit(spec(["true"], name=f"s{i}")), range(60))
        )
    ids = sorted(job["id"] for job in made)
    assert len(set(ids)) == 60
    listed = cluster.client.jobs(limit=100)["jobs"]
    assert sorted(job["id"] for job in listed) == ids
    assert sorted(job["name"] for job in listed) == sorted(f"s{i}" for i in range(60))
    # Each answer says why its job waits and where it stands, as one process would: both
    # asked of the broker process in one call (a list says why, not where).
    assert all(job["queue_reason"] for job in made)
    assert all(job["queue_place"]["place"] >= 1 for job in made)
    assert all(job["queue_reason"] and not job.get("queue_place") for job in listed)


def test_followers_and_waiters_in_every_process_wake_and_a_cancel_anywhere_lands(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=0, http_processes=2)
    cluster.add_worker(**PROCESS_WORKER)
    port = int(cluster.url.rsplit(":", 1)[1])
    printer = cluster.client.submit(
        spec(["sh", "-c", "sleep 1; for i in 1 2 3; do echo line $i; sleep 0.3; done"])
    )
    seen: dict[int, list[str]] = {}
    waited: dict[int, str] = {}

    def follow(index: int) -> None:
        client = Client(cluster.url, cluster.token)
        seen[index] = [
            record["line"]
            for record in client._records(printer["id"], 0, True)
            if "line" in record and record.get("stream") == "stdout"
        ]

    def wait(index: int) -> None:
        waited[index] = Client(cluster.url, cluster.token).wait(printer["id"])["status"]

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=wait, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    # Both processes hold some of the 16 open streams and long polls.
    wait_until(lambda: len(serving_pids(port)) == 2, 10, "both HTTP processes to serve")
    assert serving_pids(port) == http_pids()
    for thread in threads:
        thread.join(30)
    assert seen == {i: ["line 1", "line 2", "line 3"] for i in range(8)}
    assert waited == {i: "FINISHED" for i in range(8)}

    # A cancel, whichever process takes it, reaches the running job on the worker.
    for _ in range(3):
        sleeper = cluster.client.submit(spec(["sleep", "30"]))
        cluster.wait(sleeper["id"], ("RUNNING",))
        Client(cluster.url, cluster.token).cancel(sleeper["id"])
        assert cluster.wait(sleeper["id"], timeout_s=20)["status"] == "CANCELLED"


def test_the_dashboard_session_holds_across_processes(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A sign-in served by one process is known to the others, and a sign-out by one ends
    the session in all: each request on a connection of its own, over both processes."""
    from tests.test_dashboard import Browser

    cluster = make_cluster(workers=0, http_processes=2)
    browser = Browser(cluster.url)
    browser.sign_in(cluster.token)
    pages = [browser.get("/workers") for _ in range(20)]
    assert [status for status, _, _ in pages] == [200] * 20
    csrf = browser.csrf("/workers")
    assert browser.post("/logout", {"csrf": csrf})[0] == 303
    assert {browser.get("/workers")[0] for _ in range(10)} == {303}  # sent to sign in


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie no one has reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def children_of(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(child) for child in found.split()}


@pytest.mark.slow
def test_one_process_ending_ends_the_coordinator_and_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "GPUBOX_STATE_DIR": str(state), "GPUBOX_HTTP_PROCESSES": "2"}
    env.pop("GPUBOX_DB", None)
    init = [sys.executable, "-m", "gpubox", "keys", "init"]
    subprocess.run(init, env=env, check=True, capture_output=True)
    command = [sys.executable, "-m", "gpubox", "coordinator", "--http", "127.0.0.1:0"]
    command += ["--bind", "tcp://127.0.0.1:0"]

    def start(log: Path) -> tuple[subprocess.Popen[bytes], Client]:
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=env, stderr=out)
        said = wait_until(
            lambda: "coordinator serving HTTP on " in (text := log.read_text()) and text,
            30,
            "the coordinator to serve",
        )
        url = said.split("coordinator serving HTTP on ")[1].split(",")[0]
        return process, Client(url, (state / "token").read_text().strip())

    coordinator, client = start(tmp_path / "first.log")
    children = children_of(coordinator.pid)
    assert len(children) == 2
    made = [client.submit(spec(["true"], name=f"kept-{i}"))["id"] for i in range(20)]
    os.kill(min(children), signal.SIGKILL)
    assert coordinator.wait(30) != 0
    said = (tmp_path / "first.log").read_text()
    assert f"HTTP process 0 (pid {min(children)}) exited with status -9" in said or (
        f"(pid {min(children)}) exited with status -9" in said
    ), said[-2000:]
    wait_until(lambda: all(gone(pid) for pid in children), 10, "its other HTTP process to end")

    # Started again: every job it took is there. Then the broker's process is killed
    # outright: its HTTP processes end with it, none left serving with no broker behind it.
    coordinator, client = start(tmp_path / "second.log")
    assert sorted(job["id"] for job in client.jobs(limit=50)["jobs"]) == made
    children = children_of(coordinator.pid)
    assert len(children) == 2
    coordinator.kill()
    coordinator.wait(10)
    # Each gets SIGTERM at once (PR_SET_PDEATHSIG) and stops as on any SIGTERM: beside the
    # suite's other slow tests on two cores that took longer than 10 s, now and then.
    wait_until(lambda: all(gone(pid) for pid in children), 30, "the HTTP processes to end")
