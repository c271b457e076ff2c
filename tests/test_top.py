"""`gpubox top`: the lines it makes from the API's answers, and the real command against a
real coordinator with a process-runtime worker on made-up GPUs whose readings the test sets."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gpubox import cli
from gpubox.cli import top
from gpubox.worker import gpu
from tests.conftest import Cluster, wait_until

NOW = datetime(2025, 3, 1, 12, 0, 3, tzinfo=UTC)
HEADER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  GPUs busy \d+/\d+  mean utilization ")


def rows(output: str) -> dict[tuple[str, str], dict[str, str]]:
    """The first table in `output`: (worker, GPU index) → column title → cell. Columns are
    two spaces or more apart; a cell holds at most single spaces ("80 %")."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("WORKER "))
    titles = lines[start].split()
    found = {}
    for line in lines[start + 1 :]:
        if not line.strip() or HEADER.match(line):
            break
        cells = dict(zip(titles, re.split(r"\s{2,}", line.strip()), strict=True))
        found[(cells["WORKER"], cells["GPU"])] = cells
    return found


def worker(name: str, gpus: list[dict[str, Any]], connected: bool = True) -> dict[str, Any]:
    """A worker as GET /workers shows it."""
    return {"name": name, "connected": connected, "gpus": gpus, "running_jobs": []}


def fake_gpu(uuid: str, index: int, **readings: Any) -> dict[str, Any]:
    return {"uuid": uuid, "name": "Fake GPU", "memory_mb": 16384, "index": index, **readings}


# --- the lines, from the API's answers ------------------------------------------------------


def test_frame_joins_each_gpu_to_the_job_holding_it() -> None:
    idle = fake_gpu("GPU-8f6a2c1e-aaaa", 1, utilization=20, memory_used_mb=100, power_w=None)
    busy = fake_gpu("GPU-0b1d9e77-bbbb", 0, utilization=90, memory_used_mb=15000, power_w=301.4)
    workers = [worker("box-a", [idle, busy])]
    jobs = [
        {"id": 7, "name": "trainer", "submitter": "alice", "result": {"gpus": [busy["uuid"]]}},
        {"id": 8, "name": "cpu-only", "submitter": None, "result": {"gpus": []}},
    ]
    lines = top.frame(workers, jobs, NOW)
    assert lines[0] == "2025-03-01 12:00:03  GPUs busy 1/2  mean utilization 55 %"
    assert lines[1].split() == [title for title, _ in top.COLUMNS]
    table = rows("\n".join(lines))
    assert list(table) == [("box-a", "0"), ("box-a", "1")]  # by worker, then index
    assert table[("box-a", "0")] == {
        "WORKER": "box-a",
        "GPU": "0",
        "UUID": "GPU-0b1d9e77",
        "UTIL": "90 %",
        "MEMORY": "15000/16384 MiB",
        "POWER": "301 W",
        "JOB": "7",
        "SUBMITTER": "alice",
        "NAME": "trainer",
    }
    free = table[("box-a", "1")]
    assert (free["UTIL"], free["POWER"], free["JOB"], free["SUBMITTER"], free["NAME"]) == (
        "20 %",
        "-",
        "-",
        "-",
        "-",
    )


def test_a_gpu_without_readings_and_a_worker_not_connected_show_dashes() -> None:
    workers = [
        worker("box-a", [fake_gpu("GPU-a", 0)]),  # connected, no heartbeat yet
        worker("box-b", [fake_gpu("GPU-b", 0, utilization=None)], connected=False),
    ]
    jobs = [{"id": 3, "name": "x", "result": {"gpus": ["GPU-b"]}}]  # no submitter recorded
    lines = top.frame(workers, jobs, NOW)
    assert lines[0].endswith("GPUs busy 1/2  mean utilization -")
    table = rows("\n".join(lines))
    assert table[("box-a", "0")]["UTIL"] == "-"
    assert table[("box-a", "0")]["MEMORY"] == "-/16384 MiB"
    lost = table[("box-b (lost)", "0")]
    assert (lost["UTIL"], lost["POWER"], lost["JOB"], lost["SUBMITTER"]) == ("-", "-", "3", "-")


def test_no_gpus_says_so() -> None:
    lines = top.frame([worker("cpu-box", [])], [], NOW)
    assert lines == [
        "2025-03-01 12:00:03  GPUs busy 0/0  mean utilization -",
        "no GPUs: no worker the coordinator knows offers any",
    ]


def test_a_job_name_cannot_drive_the_terminal() -> None:
    jobs = [{"id": 1, "name": "x\x1b[2J\ny", "submitter": "\x07", "result": {"gpus": ["GPU-a"]}}]
    text = "\n".join(top.frame([worker("box", [fake_gpu("GPU-a", 0)])], jobs, NOW))
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("\n") == 2 and "x\\x1b[2J\\ny" in text


def test_screen_redraws_a_terminal_in_place_and_prints_plain_lines_elsewhere() -> None:
    lines = ["header", "a" * 100, "b", "c"]
    assert top.screen(lines, tty=False) == "header\n" + "a" * 100 + "\nb\nc\n"
    drawn = top.screen(lines, tty=True, columns=80, rows=24)
    assert drawn == top.CLEAR + "header\n" + "a" * 80 + "\nb\nc"  # no newline: nothing scrolls
    # Too many lines for the window: the first ones, and how many more there are.
    assert top.screen(lines, tty=True, columns=80, rows=3).split("\n") == [
        top.CLEAR + "header",
        "a" * 80,
        "… 2 more lines (a taller window shows them)",
    ]


# --- the command, against a real coordinator -------------------------------------------------


@pytest.fixture()
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """A coordinator with one process-runtime worker offering two made-up GPUs."""
    made = make_cluster(workers=0)
    made.add_worker(runtime="process", fake_gpus="2")
    return made


def run_top(url: str, token: str, *args: str) -> Result:
    return CliRunner().invoke(cli.main, ["top", "--url", url, "--token", token, *args])


def test_once_shows_each_gpu_its_readings_and_its_job(cluster: Cluster) -> None:
    job = cluster.submit("ignored", ["sleep", "30"], gpus=1, name="trainer")
    try:
        running = cluster.wait(job["id"], ("RUNNING",))
        [held] = running["result"]["gpus"]
        gpu.write_fake_readings(
            cluster.coordinator.config.state_dir,
            {
                held: {"utilization": 80, "memory_used_mb": 1000, "power_w": 150.0},
                "*": {"utilization": 0, "memory_used_mb": 3},  # no power reading
            },
        )

        def readings() -> dict[str, tuple[Any, Any]]:
            gpus = cluster.client.workers()["workers"][0]["gpus"]
            return {g["uuid"]: (g.get("utilization"), g.get("memory_used_mb")) for g in gpus}

        wait_until(
            lambda: sorted(readings().values()) == [(0, 3), (80, 1000)],
            10,
            lambda: f"the readings at the coordinator (last {readings()})",
        )
        result = run_top(cluster.url, cluster.token, "--once")
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout  # not a terminal: plain lines
        assert HEADER.match(result.stdout)
        assert result.stdout.splitlines()[0].endswith("GPUs busy 1/2  mean utilization 40 %")
        table = rows(result.stdout)
        assert set(table) == {("worker-1", "0"), ("worker-1", "1")}
        for (_, index), cells in table.items():
            uuid = f"GPU-fake-worker-1-{int(index):04d}"
            assert cells["UUID"] == uuid[: top.SHORT_UUID]
            if uuid == held:
                assert cells["UTIL"] == "80 %" and cells["MEMORY"] == "1000/16384 MiB"
                assert cells["POWER"] == "150 W"
                assert (cells["JOB"], cells["NAME"]) == (str(job["id"]), "trainer")
                assert cells["SUBMITTER"] == (running["submitter"] or "-")
            else:
                assert cells["UTIL"] == "0 %" and cells["MEMORY"] == "3/16384 MiB"
                assert (cells["POWER"], cells["JOB"], cells["NAME"]) == ("-", "-", "-")
    finally:
        cluster.client.cancel(job["id"])


def test_iterations_print_that_many_refreshes(cluster: Cluster) -> None:
    started = time.monotonic()
    result = run_top(cluster.url, cluster.token, "-n", "2", "--interval", "0.2")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 0.2
    assert "\x1b" not in result.stdout
    refreshes = result.stdout.split("\n\n")  # a blank line between refreshes
    assert len(refreshes) == 2
    for refresh in refreshes:
        assert HEADER.match(refresh)
        assert set(rows(refresh)) == {("worker-1", "0"), ("worker-1", "1")}


def test_an_unreachable_coordinator_is_one_line_and_status_69() -> None:
    result = run_top("http://127.0.0.1:1", "any-token", "--once")
    assert result.exit_code == 69
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: cannot reach the coordinator at http://127.0.0.1:1")


def test_a_bad_token_is_one_line_and_status_77(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(workers=0)
    result = run_top(cluster.url, "not-a-token", "--once")
    assert result.exit_code == 77
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ") and line.endswith("[HTTP 401]")


def test_a_terminal_is_redrawn_in_place_until_ctrl_c(cluster: Cluster) -> None:
    # The real command on a pseudo-terminal: it clears the screen for each refresh, and
    # Ctrl-C (SIGINT) ends it with status 0 and no traceback.
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubox", "top", "--url", cluster.url, "--token", cluster.token]
        + ["--interval", "0.2"],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(top.CLEAR.encode()) < 2 and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert seen.count(top.CLEAR.encode()) >= 2, seen
    first = seen.decode().split(top.CLEAR)[1]  # whole: the second refresh came after it
    assert HEADER.match(first) and "worker-1" in first
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
