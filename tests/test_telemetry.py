"""What jobs did with their GPUs, end to end: made-up GPUs whose readings the test sets,
sampled by a real worker, sent over the real link, stored (both stores), merged past the
bound, summed up when the job ends, served by the API and /metrics; and the idle-GPU policy.
The jobs run on the process runtime: no Docker needed."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gpubox import keys, models
from gpubox.client import ApiError, Client
from gpubox.worker.gpu import write_fake_readings
from tests.conftest import IMAGE, Cluster, wait_until
from tests.test_recovery import FAST, Process, free_port, ok, processes, worker_env

__all__ = ["processes"]  # a fixture, shared with test_recovery

# The store's side is proven on both stores by the summary, the merge and the kill -9 tests
# (and tests/test_telemetry_parts.py): the others run on SQLite only, to keep the suite short.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

# Fast sampling: a reading every 0.1 s, a point every 0.5 s.
FAST_TELEMETRY = {
    "runtime": "process",
    "fake_gpus": "2",
    "telemetry_interval_s": 0.1,
    "telemetry_point_s": 0.5,
}
BUSY = {"utilization": 80, "memory_used_mb": 4096, "power_w": 200.0, "temperature_c": 60}
HALF = {"utilization": 40, "memory_used_mb": 8192, "power_w": 100.0, "temperature_c": 50}


def gpu_uuid(worker: str, index: int) -> str:
    return f"GPU-fake-{worker}-{index:04d}"


def state_of(cluster: Cluster) -> str:
    return cluster.coordinator.config.state_dir


def run_time(job: dict[str, Any]) -> float:
    result = job["result"]
    started = models.parse_time(result["executed_at"])
    ended = models.parse_time(result["finished_at"])
    assert started is not None and ended is not None
    return (ended - started).total_seconds()


def assert_contiguous(points: list[dict[str, Any]], gpu: str) -> list[dict[str, Any]]:
    """The GPU's points, checked to follow each other without a gap or an overlap."""
    mine = sorted((p for p in points if p["gpu"] == gpu), key=lambda p: p["start"])
    assert mine, f"no points for {gpu}"
    for before, after in zip(mine, mine[1:], strict=False):
        assert after["start"] == pytest.approx(before["end"], abs=0.002), (before, after)
    return mine


def test_a_job_ends_with_the_summary_of_the_readings_the_test_set(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0)
    cluster.add_worker(**FAST_TELEMETRY)
    state = state_of(cluster)
    write_fake_readings(state, {gpu_uuid("worker-1", 0): BUSY, gpu_uuid("worker-1", 1): HALF})
    job = cluster.submit("ignored", ["sleep", "3"], gpus=2)
    done = cluster.wait(job["id"])
    assert done["status"] == "FINISHED", done
    summary = done["result"]["telemetry"]
    held = run_time(done)
    # Each GPU was held for the whole run: 2 GPUs x its run time.
    assert summary["gpu_seconds"] == pytest.approx(2 * held, rel=0.05)
    assert summary["util_max"] == 80
    assert summary["util_mean"] == pytest.approx(60, abs=0.5)
    assert summary["memory_max_mb"] == 8192
    assert summary["memory_max_pct"] == pytest.approx(50.0)  # of a 16384 MiB made-up card
    assert summary["energy_wh"] == pytest.approx(300 * held / 3600, rel=0.05)
    first, second = (summary["gpus"][gpu_uuid("worker-1", i)] for i in (0, 1))
    assert first["util_mean"] == first["util_max"] == 80
    assert first["memory_max_mb"] == 4096 and first["memory_max_pct"] == 25.0
    assert first["gpu_seconds"] == pytest.approx(held, rel=0.05)
    assert first["energy_wh"] == pytest.approx(200 * held / 3600, rel=0.05)
    assert second["util_mean"] == 40 and second["memory_max_mb"] == 8192
    # The points the API serves cover the run and add up to the summary.
    points = cluster.client.telemetry(job["id"])["points"]
    for gpu in summary["gpus"]:
        mine = assert_contiguous(points, gpu)
        assert sum(p["end"] - p["start"] for p in mine) == pytest.approx(held, rel=0.05)
        assert {p["attempt"] for p in mine} == {1}
    # `gpubox show` prints it.
    shown = cluster_show(cluster, job["id"])
    assert "GPU use" in shown and "mean 60" in shown and "peak 8192 MiB" in shown, shown


def cluster_show(cluster: Cluster, job_id: int) -> str:
    from click.testing import CliRunner

    from gpubox.cli import main

    result = CliRunner().invoke(
        main, ["show", str(job_id), "--url", cluster.url, "--token", cluster.token]
    )
    assert result.exit_code == 0, result.output
    return result.output


@SQLITE_ONLY
def test_points_arrive_while_the_job_runs_within_2_s_of_their_end(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0)
    cluster.add_worker(**FAST_TELEMETRY)
    write_fake_readings(state_of(cluster), {"*": BUSY})
    job = cluster.submit("ignored", ["sleep", "4"], gpus=1)
    cluster.wait(job["id"], ("RUNNING",))
    since: float | None = None
    late: list[float] = []
    seen = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = cluster.client.telemetry(job["id"], since)
        now = time.time()
        for point in answer["points"]:
            late.append(now - point["end"])
            seen += 1
        since = answer["next"]
        if answer["status"] != "RUNNING":
            break
        time.sleep(0.1)
    assert seen >= 5, seen  # a point every 0.5 s for 4 s
    assert max(late) < 2.0, late


def test_past_the_bound_points_are_merged_and_still_span_the_whole_run(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0, telemetry_max_points=10)
    cluster.add_worker(**{**FAST_TELEMETRY, "telemetry_point_s": 0.2})
    write_fake_readings(state_of(cluster), {"*": BUSY})
    job = cluster.submit("ignored", ["sleep", "5"], gpus=1)
    done = cluster.wait(job["id"])
    points = cluster.client.telemetry(job["id"])["points"]
    mine = assert_contiguous(points, gpu_uuid("worker-1", 0))
    assert len(mine) <= 11, len(mine)  # some 25 points of 0.2 s, merged down to the bound
    assert max(p["end"] - p["start"] for p in mine) > 0.5  # the older ones are coarser
    held = run_time(done)
    assert mine[-1]["end"] - mine[0]["start"] == pytest.approx(held, rel=0.05)
    summary = done["result"]["telemetry"]
    assert summary["util_mean"] == 80 and summary["memory_max_mb"] == 4096
    assert summary["gpu_seconds"] == pytest.approx(held, rel=0.05)


@SQLITE_ONLY
def test_an_idle_job_is_stopped_with_a_warning_first_and_a_busy_one_is_not(
    make_cluster,
) -> None:
    cluster: Cluster = make_cluster(workers=0, idle_timeout=2.0)
    cluster.add_worker(**FAST_TELEMETRY)
    state = state_of(cluster)
    write_fake_readings(state, {"*": BUSY})
    idle = cluster.submit("ignored", ["sleep", "30"], gpus=1, name="idle")  # the default
    busy = cluster.submit("ignored", ["sleep", "4"], gpus=1, name="busy", idle_timeout=2)
    no_gpu = cluster.submit("ignored", ["sleep", "4"], gpus=0, name="cpu")  # never idle
    opted_out = cluster.submit("ignored", ["sleep", "4"], gpus=0, idle_timeout=0)
    idle_gpu = cluster.wait(idle["id"], ("RUNNING",))["result"]["gpus"][0]
    cluster.wait(busy["id"], ("RUNNING",))
    write_fake_readings(state, {"*": BUSY, idle_gpu: {"utilization": 3}})
    stopped = cluster.wait(idle["id"], timeout_s=20)
    assert stopped["status"] == "ERROR"
    assert stopped["result"]["error"] == "idle: its GPUs stayed under 5 % for 2 s"
    lines = [r for r in cluster.lines(idle["id"]) if r["stream"] == models.GPUBOX_STREAM]
    assert len(lines) == 2, lines
    assert "warning: this job's GPUs have stayed under 5 %" in lines[0]["line"]
    assert "stopped: idle: its GPUs stayed under 5 % for 2 s" in lines[1]["line"]
    for job in (busy, no_gpu, opted_out):
        assert cluster.wait(job["id"])["status"] == "FINISHED"


@SQLITE_ONLY
def test_metrics_show_each_gpu_with_its_readings_and_the_job_holding_it(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0)
    cluster.add_worker(**FAST_TELEMETRY)
    write_fake_readings(state_of(cluster), {"*": BUSY})
    job = cluster.submit("ignored", ["sleep", "30"], gpus=1)
    held = cluster.wait(job["id"], ("RUNNING",))["result"]["gpus"][0]
    free = ({gpu_uuid("worker-1", 0), gpu_uuid("worker-1", 1)} - {held}).pop()

    def page() -> str:
        request = urllib.request.Request(
            f"{cluster.url}/metrics", headers={"Authorization": f"Bearer {cluster.token}"}
        )
        with urllib.request.urlopen(request) as answer:
            return str(answer.read().decode())

    labels = f'worker="worker-1",uuid="{held}",job="{job["id"]}"'
    text = wait_until(lambda: f"gpubox_gpu_power_watts{{{labels}}} 200" in (t := page()) and t, 10)
    assert f"gpubox_gpu_utilization_ratio{{{labels}}} 0.8" in text
    assert f"gpubox_gpu_memory_used_bytes{{{labels}}} {4096 * 2**20}" in text
    assert f'gpubox_gpu_power_watts{{worker="worker-1",uuid="{free}",job=""}} 200' in text
    cluster.client.cancel(job["id"])
    cluster.wait(job["id"])


def test_a_coordinator_killed_mid_job_loses_no_point(db_url: str, tmp_path: Path) -> None:
    """kill -9 of the coordinator while a job's points flow: the worker holds what was not
    acknowledged and sends it again, and the stored curve has no gap."""
    state = str(tmp_path / "state")
    http, link = free_port(), free_port()
    keys.init(state)
    env = {**os.environ, **FAST, "GPUBOX_STATE_DIR": state, "GPUBOX_DB": db_url}
    args = ["coordinator", "--http", f"127.0.0.1:{http}", "--bind", f"tcp://127.0.0.1:{link}"]
    coordinator = Process(args, env, tmp_path / "coordinator.log")
    worker = None
    try:
        wait_until(lambda: (Path(state) / "token").exists(), 20, "the coordinator's token")
        client = Client(f"http://127.0.0.1:{http}", (Path(state) / "token").read_text().strip())
        secret = keys.add_worker(state, "tw1")
        worker_env = {
            **env,
            "GPUBOX_WORKER_NAME": "tw1",
            "GPUBOX_COORDINATOR": f"tcp://127.0.0.1:{link}",
            "GPUBOX_KEY_FILE": str(secret),
            "GPUBOX_RUNTIME": "process",
            "GPUBOX_FAKE_GPUS": "1",
            "GPUBOX_TELEMETRY_INTERVAL": "0.1",
            "GPUBOX_TELEMETRY_POINT": "0.3",
        }
        worker = Process(["worker"], worker_env, tmp_path / "worker.log")
        wait_until(lambda: ok(lambda: client.workers()["workers"]), 20, "the worker")
        write_fake_readings(state, {"*": BUSY})
        job = client.submit(
            {"name": "survivor", "gpus": 1, "docker": {"image": "x", "command": ["sleep", "8"]}}
        )
        wait_until(lambda: len(client.telemetry(job["id"])["points"]) >= 3, 20, "points")
        coordinator.kill9()
        time.sleep(1.5)  # points pile up on the worker meanwhile
        coordinator.start()
        done = wait_until(
            lambda: (j := ok(lambda: client.job(job["id"]))) and j["status"] != "RUNNING" and j,
            40,
            "the job to end",
        )
        assert done["status"] == "FINISHED" and done["attempts"] == 1, done
        points = client.telemetry(job["id"])["points"]
        mine = assert_contiguous(points, gpu_uuid("tw1", 0))
        held = run_time(done)
        assert mine[-1]["end"] - mine[0]["start"] == pytest.approx(held, rel=0.05)
        assert done["result"]["telemetry"]["gpu_seconds"] == pytest.approx(held, rel=0.05)
    finally:
        for process in (worker, coordinator):
            if process is not None:
                process.stop()


@SQLITE_ONLY
def test_submit_takes_an_idle_timeout_and_show_prints_it(make_cluster) -> None:
    from click.testing import CliRunner

    from gpubox.cli import main

    cluster: Cluster = make_cluster(workers=0)
    flags = ["--url", cluster.url, "--token", cluster.token]
    runner = CliRunner()
    made = runner.invoke(main, ["submit", "--idle-timeout", "1800", "--json", *flags, "img"])
    assert made.exit_code == 0, made.output
    job = json.loads(made.output)
    assert job["idle_timeout"] == 1800
    assert "idle_timeout 1800 s" in cluster_show(cluster, job["id"])
    never = runner.invoke(main, ["submit", "--idle-timeout", "0", "--json", *flags, "img"])
    assert json.loads(never.output)["idle_timeout"] == 0
    assert "never idle" in cluster_show(cluster, json.loads(never.output)["id"])
    bad = runner.invoke(main, ["submit", "--idle-timeout", "-1", *flags, "img"])
    assert bad.exit_code == 2 and "--idle-timeout" in bad.output
    with pytest.raises(ApiError) as refused:
        cluster.client.submit({"name": "x", "docker": {"image": "i"}, "idle_timeout": "long"})
    assert refused.value.status == 400 and "idle_timeout" in str(refused.value)


# --- with Docker: the runtime most jobs run on ------------------------------------------------


@pytest.mark.docker
@SQLITE_ONLY
def test_an_idle_container_is_stopped_as_an_error(make_cluster) -> None:
    cluster: Cluster = make_cluster(workers=0)
    cluster.add_worker(**{**FAST_TELEMETRY, "runtime": "docker"})
    write_fake_readings(state_of(cluster), {"*": {"utilization": 1}})
    job = cluster.submit(IMAGE, ["sleep", "60"], gpus=1, idle_timeout=2)
    done = cluster.wait(job["id"], timeout_s=30)
    assert done["status"] == "ERROR", done
    assert done["result"]["error"] == "idle: its GPUs stayed under 5 % for 2 s"
    assert done["result"]["exit_code"] in (137, 143)  # SIGTERM, or SIGKILL after the grace
    notes = [r["line"] for r in cluster.lines(job["id"]) if r["stream"] == models.GPUBOX_STREAM]
    assert [n.split(":")[1].strip() for n in notes] == ["warning", "stopped"], notes
    assert done["result"]["telemetry"]["util_max"] == 1


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.serial
@SQLITE_ONLY
def test_a_restarted_worker_goes_on_with_the_points_of_a_job_it_reattaches_to(
    make_cluster, processes, tmp_path
) -> None:
    """The coordinator tells a re-attaching worker the last batch it stored: the points the
    worker makes after its restart are stored, not taken for repeats of the first ones."""
    cluster: Cluster = make_cluster(workers=0)
    state = state_of(cluster)
    env = {
        **worker_env(state, "proc-w1", cluster.coordinator.link_endpoint),
        "GPUBOX_FAKE_GPUS": "1",
        "GPUBOX_TELEMETRY_INTERVAL": "0.1",
        "GPUBOX_TELEMETRY_POINT": "0.3",
    }
    worker = Process(["worker"], env, tmp_path / "worker.log")
    processes.append(worker)
    write_fake_readings(state, {"*": BUSY})
    job = cluster.submit(IMAGE, ["sleep", "10"], gpus=1)
    # Ten batches stored (3 s of points): a worker that numbered its batches from 0 again
    # would see its next ten taken for repeats, and 3 s of its curve dropped.
    wait_until(lambda: len(cluster.client.telemetry(job["id"])["points"]) >= 10, 30, "points")
    worker.kill9()
    restarted_at = time.time()
    worker.start()
    done = cluster.wait(job["id"], timeout_s=60)
    assert done["status"] == "FINISHED" and done["attempts"] == 1, done
    points = cluster.client.telemetry(job["id"])["points"]
    after = assert_contiguous([p for p in points if p["start"] >= restarted_at], points[0]["gpu"])
    # Sampled again from the re-attach on (a start of the worker, its HELLO, the JOB that
    # re-attaches), and each batch stored.
    assert after[0]["start"] - restarted_at < 2.5, (restarted_at, after[0])
    assert max(p["end"] for p in points) == pytest.approx(
        models.parse_time(done["result"]["finished_at"]).timestamp(), abs=1.5
    )
